//! The SQL side of windowed rules (`GROUP BY key, ..., STEP(ROWTIME BY INTERVAL 'n' SECOND)`):
//! what each message contributes, how contributions accumulate, and the row a closed window
//! becomes.
//!
//! A message that passes `WHERE` is stored as its *input row*, a JSON array of the group keys'
//! values and the aggregates' arguments, evaluated at ingress (where `topic()` and `clientid()`
//! still mean something). The window stage (`crate::windows`) reads input rows back from the
//! buffer, so the open windows can be rebuilt after a crash from what is committed. The SELECT
//! list is rewritten at parse time: group keys, aggregates and `window_start()`/`window_end()`
//! become fields of a small synthetic document the closed window provides, so the projection
//! is evaluated by the same code as any rule.

use std::borrow::Cow;
use std::cmp::Ordering;

use super::eval::{self, Context};
use super::functions::Function;
use super::parser::{Aggregate, Expr, GroupBy, Item, Projection};
use super::value::Value;
use super::SqlError;

/// One input row read back: its group's key as JSON (which identifies the group) and as
/// values, and the aggregates' arguments (one vector of values, split: the window stage reads
/// every row back, and most rows only add to a group that exists).
pub struct InputRow<'a> {
    pub key: Vec<u8>,
    values: Vec<Value<'a>>,
    split: usize,
}

impl<'a> InputRow<'a> {
    /// The group's key values (its `GROUP BY` expressions).
    pub fn keys(&self) -> &[Value<'a>] {
        &self.values[..self.split]
    }

    /// The aggregates' arguments.
    pub fn args(&self) -> &[Value<'a>] {
        &self.values[self.split..]
    }
}

/// A windowed rule's parts.
#[derive(Debug, Clone)]
pub struct Windowed {
    pub window_ms: i64,
    keys: Vec<Expr>,
    aggregates: Vec<(Aggregate, Option<Expr>)>,
    /// The SELECT list over the synthetic document.
    pub(super) projection: Projection,
}

fn key_field(i: usize) -> String {
    format!("\0k{i}")
}
fn agg_field(i: usize) -> String {
    format!("\0a{i}")
}
const START: &str = "\0ws";
const END: &str = "\0we";

impl Windowed {
    pub(super) fn new(
        projection: &Projection,
        filter: Option<&Expr>,
        group: GroupBy,
    ) -> Result<Self, SqlError> {
        if let Some(f) = filter {
            if contains_aggregate(f) {
                return Err(SqlError::at(group.at, "aggregates cannot be used in WHERE"));
            }
        }
        for k in &group.keys {
            if contains_aggregate(k) {
                return Err(SqlError::at(group.at, "aggregates cannot be grouped by"));
            }
        }
        let mut w = Windowed {
            window_ms: group.window_ms,
            keys: group.keys,
            aggregates: Vec::new(),
            projection: Projection::Items(Vec::new()),
        };
        w.projection = match projection {
            Projection::Value(e) => Projection::Value(w.rewrite(e, group.at)?),
            Projection::Items(items) => {
                let mut out = Vec::new();
                for item in items {
                    match item {
                        Item::Star => {
                            return Err(SqlError::at(
                                group.at,
                                "a windowed rule selects groups and aggregates, not *",
                            ));
                        }
                        Item::Expr { expr, name } => out.push(Item::Expr {
                            expr: w.rewrite(expr, group.at)?,
                            name: name.clone(),
                        }),
                    }
                }
                Projection::Items(out)
            }
        };
        Ok(w)
    }

    /// Replaces group keys, aggregates and the window bounds by fields of the synthetic
    /// document; refuses what has no single value in a window.
    fn rewrite(&mut self, e: &Expr, at: usize) -> Result<Expr, SqlError> {
        if let Some(i) = self.keys.iter().position(|k| k == e) {
            return Ok(Expr::Field(key_field(i)));
        }
        let boxed = |w: &mut Self, e: &Expr| w.rewrite(e, at).map(Box::new);
        Ok(match e {
            Expr::Aggregate(agg, arg) => {
                if arg.as_deref().is_some_and(contains_aggregate) {
                    return Err(SqlError::at(at, "aggregates cannot be nested"));
                }
                let entry = (*agg, arg.as_deref().cloned());
                let i = match self.aggregates.iter().position(|a| *a == entry) {
                    Some(i) => i,
                    None => {
                        self.aggregates.push(entry);
                        self.aggregates.len() - 1
                    }
                };
                Expr::Field(agg_field(i))
            }
            Expr::Call(Function::WindowStart, _) => Expr::Field(START.into()),
            Expr::Call(Function::WindowEnd, _) => Expr::Field(END.into()),
            Expr::Field(name) | Expr::Member(_, name) => {
                return Err(SqlError::at(
                    at,
                    format!("{name} is neither in GROUP BY nor inside an aggregate"),
                ));
            }
            Expr::Call(f @ (Function::Topic | Function::ClientId | Function::Timestamp), _) => {
                return Err(SqlError::at(
                    at,
                    format!(
                        "{}() has no single value in a window: put it in GROUP BY or inside an aggregate",
                        f.name()
                    ),
                ));
            }
            Expr::Literal(_) => e.clone(),
            Expr::Index(b, i) => Expr::Index(boxed(self, b)?, boxed(self, i)?),
            Expr::Neg(x) => Expr::Neg(boxed(self, x)?),
            Expr::Not(x) => Expr::Not(boxed(self, x)?),
            Expr::Binary(op, l, r) => Expr::Binary(*op, boxed(self, l)?, boxed(self, r)?),
            Expr::Is {
                expr,
                undefined,
                negated,
            } => Expr::Is {
                expr: boxed(self, expr)?,
                undefined: *undefined,
                negated: *negated,
            },
            Expr::In(l, r) => Expr::In(boxed(self, l)?, boxed(self, r)?),
            Expr::Case {
                operand,
                whens,
                otherwise,
            } => Expr::Case {
                operand: match operand {
                    Some(o) => Some(boxed(self, o)?),
                    None => None,
                },
                whens: whens
                    .iter()
                    .map(|(w, t)| Ok((self.rewrite(w, at)?, self.rewrite(t, at)?)))
                    .collect::<Result<_, SqlError>>()?,
                otherwise: match otherwise {
                    Some(o) => Some(boxed(self, o)?),
                    None => None,
                },
            },
            Expr::Call(f, args) => Expr::Call(
                *f,
                args.iter()
                    .map(|a| self.rewrite(a, at))
                    .collect::<Result<_, _>>()?,
            ),
            Expr::Cast(x, ty) => Expr::Cast(boxed(self, x)?, *ty),
            Expr::Array(items) => Expr::Array(
                items
                    .iter()
                    .map(|a| self.rewrite(a, at))
                    .collect::<Result<_, _>>()?,
            ),
            Expr::Object(fields) => Expr::Object(
                fields
                    .iter()
                    .map(|(k, v)| Ok((k.clone(), self.rewrite(v, at)?)))
                    .collect::<Result<_, SqlError>>()?,
            ),
        })
    }

    /// A message's input row: the group keys' values, then the aggregates' arguments, as a JSON
    /// array (Undefined stored as null: aggregates skip both).
    pub fn input_row(&self, doc: &Value, ctx: &Context) -> Vec<u8> {
        let mut row = Vec::with_capacity(self.keys.len() + self.aggregates.len());
        for k in &self.keys {
            row.push(defined(eval::eval(k, doc, ctx)));
        }
        for (_, arg) in &self.aggregates {
            row.push(match arg {
                Some(a) => defined(eval::eval(a, doc, ctx)),
                None => Value::Null,
            });
        }
        serde_json::to_vec(&Value::Array(row)).expect("values serialize")
    }

    /// Splits an input row read back from the buffer into the group's key (its values, and
    /// their JSON, which identifies the group) and the aggregates' arguments; None if it is not
    /// one of this rule's rows (the rule changed since it was stored).
    pub fn parse_row<'a>(&self, row: &'a [u8]) -> Option<InputRow<'a>> {
        let Value::Array(values) = Value::parse(row).ok()? else {
            return None;
        };
        if values.len() != self.keys.len() + self.aggregates.len() {
            return None;
        }
        let split = self.keys.len();
        let key = serde_json::to_vec(&values[..split]).ok()?;
        Some(InputRow { key, values, split })
    }

    /// Fresh accumulators for a new group.
    pub fn accumulators(&self) -> Vec<Acc> {
        self.aggregates
            .iter()
            .map(|(agg, arg)| Acc::new(*agg, arg.is_none()))
            .collect()
    }

    /// The synthetic document of a closed window's group: its key values, aggregates and bounds.
    pub fn document<'k>(&self, keys: &[Value<'k>], accs: &[Acc], start_ms: i64) -> Value<'k> {
        let mut fields: Vec<(Cow<str>, Value)> = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            fields.push((key_field(i).into(), k.clone()));
        }
        for (i, a) in accs.iter().enumerate() {
            fields.push((agg_field(i).into(), a.value()));
        }
        fields.push((START.into(), Value::Int(start_ms)));
        fields.push((END.into(), Value::Int(start_ms + self.window_ms)));
        Value::Object(fields)
    }
}

fn defined(v: Value) -> Value {
    if v == Value::Undefined {
        Value::Null
    } else {
        v
    }
}

/// The top-level payload fields `e` reads.
pub(super) fn field_names(e: &Expr, out: &mut Vec<String>) {
    match e {
        Expr::Field(name) => out.push(name.clone()),
        Expr::Literal(_) => {}
        Expr::Member(b, _) | Expr::Neg(b) | Expr::Not(b) | Expr::Cast(b, _) => field_names(b, out),
        Expr::Is { expr, .. } => field_names(expr, out),
        Expr::Aggregate(_, arg) => {
            if let Some(a) = arg {
                field_names(a, out);
            }
        }
        Expr::Index(a, b) | Expr::Binary(_, a, b) | Expr::In(a, b) => {
            field_names(a, out);
            field_names(b, out);
        }
        Expr::Case {
            operand,
            whens,
            otherwise,
        } => {
            for x in operand.iter().chain(otherwise.iter()) {
                field_names(x, out);
            }
            for (w, t) in whens {
                field_names(w, out);
                field_names(t, out);
            }
        }
        Expr::Call(_, args) | Expr::Array(args) => args.iter().for_each(|a| field_names(a, out)),
        Expr::Object(fields) => fields.iter().for_each(|(_, v)| field_names(v, out)),
    }
}

pub(super) fn contains_aggregate(e: &Expr) -> bool {
    match e {
        Expr::Aggregate(..) => true,
        Expr::Literal(_) | Expr::Field(_) => false,
        Expr::Member(b, _) | Expr::Neg(b) | Expr::Not(b) | Expr::Cast(b, _) => {
            contains_aggregate(b)
        }
        Expr::Is { expr, .. } => contains_aggregate(expr),
        Expr::Index(a, b) | Expr::Binary(_, a, b) | Expr::In(a, b) => {
            contains_aggregate(a) || contains_aggregate(b)
        }
        Expr::Case {
            operand,
            whens,
            otherwise,
        } => {
            operand.as_deref().is_some_and(contains_aggregate)
                || whens
                    .iter()
                    .any(|(w, t)| contains_aggregate(w) || contains_aggregate(t))
                || otherwise.as_deref().is_some_and(contains_aggregate)
        }
        Expr::Call(_, args) | Expr::Array(args) => args.iter().any(contains_aggregate),
        Expr::Object(fields) => fields.iter().any(|(_, v)| contains_aggregate(v)),
    }
}

/// One aggregate's running state. Null and Undefined arguments are skipped (as SQL aggregates
/// skip NULL); `count(*)` counts rows.
#[derive(Debug, Clone, PartialEq)]
pub enum Acc {
    Rows(i64),
    Count(i64),
    /// Whole numbers while every value is one (checked), then a Decimal sum.
    Sum {
        int: Option<i64>,
        dec: f64,
        any: bool,
    },
    /// Welford's running mean and squared deviations: avg and (sample) stddev.
    Moments {
        n: i64,
        mean: f64,
        m2: f64,
        stddev: bool,
    },
    Min(Option<Value<'static>>),
    Max(Option<Value<'static>>),
    First(Option<Value<'static>>),
    Last(Option<Value<'static>>),
}

impl Acc {
    fn new(agg: Aggregate, star: bool) -> Self {
        match agg {
            Aggregate::Count if star => Acc::Rows(0),
            Aggregate::Count => Acc::Count(0),
            Aggregate::Sum => Acc::Sum {
                int: Some(0),
                dec: 0.0,
                any: false,
            },
            Aggregate::Avg | Aggregate::Stddev => Acc::Moments {
                n: 0,
                mean: 0.0,
                m2: 0.0,
                stddev: agg == Aggregate::Stddev,
            },
            Aggregate::Min => Acc::Min(None),
            Aggregate::Max => Acc::Max(None),
            Aggregate::First => Acc::First(None),
            Aggregate::Last => Acc::Last(None),
        }
    }

    pub fn add(&mut self, v: &Value) {
        if let Acc::Rows(n) = self {
            *n += 1;
            return;
        }
        if matches!(v, Value::Null | Value::Undefined) {
            return;
        }
        match self {
            Acc::Rows(_) => {}
            Acc::Count(n) => *n += 1,
            Acc::Sum { int, dec, any } => {
                let Some(x) = eval::to_number(v) else { return };
                *any = true;
                match (&x, *int) {
                    (Value::Int(i), Some(acc)) => *int = acc.checked_add(*i),
                    _ => *int = None,
                }
                *dec += eval::to_decimal(&x).unwrap_or(0.0);
            }
            Acc::Moments { n, mean, m2, .. } => {
                let Some(x) = eval::to_decimal(v) else { return };
                *n += 1;
                let delta = x - *mean;
                *mean += delta / *n as f64;
                *m2 += delta * (x - *mean);
            }
            Acc::Min(m) => keep_if(m, v, Ordering::Less),
            Acc::Max(m) => keep_if(m, v, Ordering::Greater),
            Acc::First(f) => {
                if f.is_none() {
                    *f = Some(v.clone().into_owned());
                }
            }
            Acc::Last(l) => *l = Some(v.clone().into_owned()),
        }
    }

    pub fn value(&self) -> Value<'static> {
        match self {
            Acc::Rows(n) | Acc::Count(n) => Value::Int(*n),
            Acc::Sum { any: false, .. } => Value::Undefined,
            Acc::Sum { int: Some(i), .. } => Value::Int(*i),
            Acc::Sum { dec, .. } => Value::number(*dec),
            Acc::Moments { n: 0, .. } => Value::Undefined,
            Acc::Moments {
                stddev: false,
                mean,
                ..
            } => Value::Decimal(*mean),
            Acc::Moments { n: 1, .. } => Value::Undefined,
            Acc::Moments { n, m2, .. } => Value::Decimal((m2 / (*n - 1) as f64).sqrt()),
            Acc::Min(v) | Acc::Max(v) | Acc::First(v) | Acc::Last(v) => {
                v.clone().unwrap_or(Value::Undefined)
            }
        }
    }
}

/// Keeps `v` in `m` if `m` is empty or `v` compares `want` to it.
fn keep_if(m: &mut Option<Value<'static>>, v: &Value, want: Ordering) {
    let replace = match m {
        None => comparable(v),
        Some(cur) => compare(v, cur) == Some(want),
    };
    if replace {
        *m = Some(v.clone().into_owned());
    }
}

/// min and max compare numbers with numbers and strings with strings.
fn comparable(v: &Value) -> bool {
    matches!(v, Value::Int(_) | Value::Decimal(_) | Value::Str(_))
}

fn compare(a: &Value, b: &Value) -> Option<Ordering> {
    match (a, b) {
        (Value::Str(x), Value::Str(y)) => Some(x.cmp(y)),
        (Value::Int(x), Value::Int(y)) => Some(x.cmp(y)),
        _ => eval::to_decimal(a)?.partial_cmp(&eval::to_decimal(b)?),
    }
}
