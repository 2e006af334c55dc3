//! Evaluating rule SQL expressions over one message, with IoT Core's conversions: operators and
//! functions convert numeric strings to numbers and "true"/"false" to Booleans, and give
//! Undefined for what they cannot use (never an error).

use std::borrow::Cow;
use std::cmp::Ordering;

use super::parser::{BinOp, CastType, Expr};
use super::value::Value;

/// What a rule sees of a message besides its payload.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub topic: &'a str,
    pub client_id: Option<&'a str>,
    /// Arrival time, epoch milliseconds: `timestamp()`.
    pub timestamp_ms: i64,
}

/// A path into the payload (`a`, `a.b`, `a[2].c`) resolved by reference: only the value at its
/// end is copied, not what contains it. None: `expr` is not such a path.
fn lookup<'v, 'a>(expr: &Expr, payload: &'v Value<'a>) -> Option<Option<&'v Value<'a>>> {
    Some(match expr {
        Expr::Field(name) => payload.field(name),
        Expr::Member(base, name) => lookup(base, payload)?.and_then(|v| v.field(name)),
        Expr::Index(base, index) => {
            let Expr::Literal(Value::Int(i)) = **index else {
                return None;
            };
            match lookup(base, payload)? {
                Some(Value::Array(items)) if i >= 0 => items.get(i as usize),
                _ => None,
            }
        }
        _ => return None,
    })
}

pub fn eval<'a>(expr: &Expr, payload: &Value<'a>, ctx: &Context<'a>) -> Value<'a> {
    if let Some(found) = lookup(expr, payload) {
        return found.cloned().unwrap_or(Value::Undefined);
    }
    match expr {
        Expr::Literal(v) => v.clone(),
        // Resolved by `lookup` above, whatever the payload.
        Expr::Field(_) => unreachable!("a field is a path"),
        // What `lookup` leaves: a member of a computed value (`get(a, 0).b`).
        Expr::Member(base, name) => match eval(base, payload, ctx) {
            Value::Object(fields) => fields
                .into_iter()
                .rev()
                .find(|(k, _)| k == name)
                .map_or(Value::Undefined, |(_, v)| v),
            _ => Value::Undefined,
        },
        Expr::Index(base, index) => match (eval(base, payload, ctx), eval(index, payload, ctx)) {
            (Value::Array(items), i) => match to_number(&i) {
                Some(Value::Int(i)) if i >= 0 => items
                    .into_iter()
                    .nth(i as usize)
                    .unwrap_or(Value::Undefined),
                _ => Value::Undefined,
            },
            _ => Value::Undefined,
        },
        Expr::Neg(e) => match to_number(&eval(e, payload, ctx)) {
            Some(Value::Int(i)) => i.checked_neg().map_or(Value::Undefined, Value::Int),
            Some(Value::Decimal(d)) => Value::Decimal(-d),
            _ => Value::Undefined,
        },
        Expr::Not(e) => match to_bool(&eval(e, payload, ctx)) {
            Some(b) => Value::Bool(!b),
            None => Value::Undefined,
        },
        Expr::Binary(op, l, r) => binary(*op, eval(l, payload, ctx), eval(r, payload, ctx)),
        Expr::Is {
            expr,
            undefined,
            negated,
        } => {
            let v = eval(expr, payload, ctx);
            let is = if *undefined {
                v == Value::Undefined
            } else {
                v == Value::Null
            };
            Value::Bool(is != *negated)
        }
        Expr::In(needle, haystack) => {
            let needle = eval(needle, payload, ctx);
            match (needle, eval(haystack, payload, ctx)) {
                (Value::Undefined, _) => Value::Undefined,
                (n, Value::Array(items)) => {
                    Value::Bool(items.iter().any(|i| equal(&n, i) == Some(true)))
                }
                _ => Value::Undefined,
            }
        }
        Expr::Case {
            operand,
            whens,
            otherwise,
        } => {
            let operand = operand.as_ref().map(|o| eval(o, payload, ctx));
            for (when, then) in whens {
                let w = eval(when, payload, ctx);
                let hit = match &operand {
                    Some(o) => equal(o, &w) == Some(true),
                    None => to_bool(&w) == Some(true),
                };
                if hit {
                    return eval(then, payload, ctx);
                }
            }
            match otherwise {
                Some(e) => eval(e, payload, ctx),
                None => Value::Undefined,
            }
        }
        // Aggregates are evaluated by the window stage; a rule without GROUP BY has none.
        Expr::Aggregate(..) => Value::Undefined,
        Expr::Call(f, args) => {
            let args = args.iter().map(|a| eval(a, payload, ctx)).collect();
            f.call(args, ctx)
        }
        Expr::Cast(e, ty) => cast(eval(e, payload, ctx), *ty),
        Expr::Array(items) => Value::Array(items.iter().map(|i| eval(i, payload, ctx)).collect()),
        Expr::Object(fields) => Value::Object(
            fields
                .iter()
                .map(|(k, e)| (Cow::Owned(k.clone()), eval(e, payload, ctx)))
                .collect(),
        ),
    }
}

/// A number as Int or Decimal: numbers as they are, strings that hold a number converted.
pub fn to_number<'a>(v: &Value<'a>) -> Option<Value<'a>> {
    match v {
        Value::Int(_) | Value::Decimal(_) => Some(v.clone()),
        Value::Str(s) => {
            let s = s.trim();
            if let Ok(i) = s.parse::<i64>() {
                Some(Value::Int(i))
            } else {
                s.parse::<f64>()
                    .ok()
                    .filter(|d| d.is_finite())
                    .map(Value::Decimal)
            }
        }
        _ => None,
    }
}

pub fn to_decimal(v: &Value) -> Option<f64> {
    match to_number(v)? {
        Value::Int(i) => Some(i as f64),
        Value::Decimal(d) => Some(d),
        _ => None,
    }
}

/// Booleans, and the strings "true"/"false" in any case (what AND, OR and NOT accept).
pub fn to_bool(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::Str(s) if s.eq_ignore_ascii_case("true") => Some(true),
        Value::Str(s) if s.eq_ignore_ascii_case("false") => Some(false),
        _ => None,
    }
}

fn binary<'a>(op: BinOp, l: Value<'a>, r: Value<'a>) -> Value<'a> {
    match op {
        BinOp::And | BinOp::Or => match (to_bool(&l), to_bool(&r)) {
            (Some(a), Some(b)) => Value::Bool(if op == BinOp::And { a && b } else { a || b }),
            _ => Value::Undefined,
        },
        BinOp::Eq => equal(&l, &r).map_or(Value::Undefined, Value::Bool),
        BinOp::Ne => equal(&l, &r).map_or(Value::Undefined, |e| Value::Bool(!e)),
        BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge => match order(&l, &r) {
            Some(o) => Value::Bool(match op {
                BinOp::Lt => o == Ordering::Less,
                BinOp::Le => o != Ordering::Greater,
                BinOp::Gt => o == Ordering::Greater,
                _ => o != Ordering::Less,
            }),
            None => Value::Undefined,
        },
        BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Div | BinOp::Mod => {
            arithmetic(op, &l, &r).unwrap_or(Value::Undefined)
        }
    }
}

fn arithmetic<'a>(op: BinOp, l: &Value, r: &Value) -> Option<Value<'a>> {
    let (l, r) = (to_number(l)?, to_number(r)?);
    if let (Value::Int(a), Value::Int(b)) = (&l, &r) {
        let (a, b) = (*a, *b);
        return match op {
            BinOp::Add => a.checked_add(b),
            BinOp::Sub => a.checked_sub(b),
            BinOp::Mul => a.checked_mul(b),
            // Int / Int is an Int, as in IoT Core; by zero, Undefined.
            BinOp::Div => a.checked_div(b),
            _ => a.checked_rem(b),
        }
        .map(Value::Int);
    }
    let (a, b) = (to_decimal(&l)?, to_decimal(&r)?);
    let d = match op {
        BinOp::Add => a + b,
        BinOp::Sub => a - b,
        BinOp::Mul => a * b,
        BinOp::Div if b != 0.0 => a / b,
        BinOp::Mod if b != 0.0 => a % b,
        _ => return None,
    };
    d.is_finite().then(|| Value::number(d))
}

/// `=`: numbers by value (a numeric string compares as its number), strings, Booleans, Null,
/// arrays and objects structurally; Undefined on either side gives Undefined; other mixes are
/// unequal.
pub fn equal(l: &Value, r: &Value) -> Option<bool> {
    match (l, r) {
        (Value::Undefined, _) | (_, Value::Undefined) => None,
        (Value::Str(a), Value::Str(b)) => Some(a == b),
        (Value::Bool(a), Value::Bool(b)) => Some(a == b),
        (Value::Null, Value::Null) => Some(true),
        (Value::Array(a), Value::Array(b)) => {
            Some(a.len() == b.len() && a.iter().zip(b).all(|(x, y)| equal(x, y) == Some(true)))
        }
        (Value::Object(a), Value::Object(b)) => Some(
            a.len() == b.len()
                && a.iter()
                    .all(|(k, v)| r.field(k).is_some_and(|w| equal(v, w) == Some(true))),
        ),
        _ => match (to_number(l), to_number(r)) {
            (Some(a), Some(b)) if is_number(l) || is_number(r) => {
                Some(order_numbers(&a, &b) == Some(Ordering::Equal))
            }
            _ => Some(false),
        },
    }
}

fn is_number(v: &Value) -> bool {
    matches!(v, Value::Int(_) | Value::Decimal(_))
}

/// `<`, `>`...: numbers (numeric strings against numbers) and strings; anything else Undefined.
fn order(l: &Value, r: &Value) -> Option<Ordering> {
    match (l, r) {
        (Value::Str(a), Value::Str(b)) => Some(a.cmp(b)),
        _ if is_number(l) || is_number(r) => order_numbers(&to_number(l)?, &to_number(r)?),
        _ => None,
    }
}

fn order_numbers(a: &Value, b: &Value) -> Option<Ordering> {
    match (a, b) {
        (Value::Int(a), Value::Int(b)) => Some(a.cmp(b)),
        _ => to_decimal(a)?.partial_cmp(&to_decimal(b)?),
    }
}

/// `cast(x AS type)`, as IoT Core's conversion tables have it.
pub fn cast(v: Value<'_>, ty: CastType) -> Value<'_> {
    match ty {
        CastType::Int => match v {
            Value::Bool(b) => Value::Int(b as i64),
            v => match to_number(&v) {
                Some(Value::Int(i)) => Value::Int(i),
                Some(Value::Decimal(d)) if d.abs() < 9.2e18 => Value::Int(d.trunc() as i64),
                _ => Value::Undefined,
            },
        },
        CastType::Decimal => match v {
            Value::Bool(b) => Value::Int(b as i64),
            v => to_decimal(&v).map_or(Value::Undefined, Value::number),
        },
        CastType::Boolean => match v {
            Value::Int(i) => Value::Bool(i != 0),
            Value::Decimal(d) => Value::Bool(d != 0.0),
            v => to_bool(&v).map_or(Value::Undefined, Value::Bool),
        },
        CastType::String => match v {
            Value::Undefined | Value::Null => Value::Undefined,
            v => v.to_text().map_or(Value::Undefined, Value::Str),
        },
    }
}
