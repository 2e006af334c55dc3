//! IoT rules at the edge: a stream's `sql` (`SELECT ... FROM 'topic/filter' WHERE ...`, IoT
//! Core's rule SQL) picks, filters and reshapes each message before it is buffered, as IoT
//! Core's rules engine does before its actions.
//!
//! [`Rule::apply`] gives one of three outcomes for a message: the record to buffer
//! ([`Applied::Selected`]), nothing because `WHERE` did not hold ([`Applied::Dropped`],
//! counted), or a failure ([`Applied::Failed`]): a `WHERE` that is not a Boolean, `*` of a
//! payload that is not an object beside other items. A failure goes to the stream's
//! `error_stream` as IoT Core's error-action message ([`error_message`]), or, with none, the
//! message is refused (the device sees it).
//!
//! Evaluation follows IoT Core's SQL (version 2016-03-23): missing fields are Undefined and left
//! out of the output, operators and functions convert numeric strings and "true"/"false" and
//! give Undefined for what they cannot use, `10.0` is the Int `10`. The payload is read once,
//! borrowing its strings ([`value::Value`]); only what is selected is written out.

pub mod eval;
pub mod functions;
pub mod lexer;
pub mod parser;
pub mod value;
pub mod window;

use std::borrow::Cow;
use std::fmt;

use base64::Engine;

use crate::templates::topic::TopicFilter;
pub use eval::Context;
use parser::{Item, Projection, Statement};
use value::Value;

/// A rule SQL statement that does not parse: where (byte offset) and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqlError {
    pub position: usize,
    pub message: String,
}

impl SqlError {
    pub fn at(position: usize, message: impl Into<String>) -> Self {
        Self {
            position,
            message: message.into(),
        }
    }
}

impl fmt::Display for SqlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "at character {}: {}", self.position + 1, self.message)
    }
}

impl std::error::Error for SqlError {}

/// What a rule made of one message.
#[derive(Debug, Clone, PartialEq)]
pub enum Applied {
    /// The record to buffer: `None` is the payload unchanged (`SELECT *`).
    Selected(Option<Vec<u8>>),
    /// `WHERE` was false, Null or Undefined, or `SELECT VALUE` gave Undefined.
    Dropped,
    /// The rule could not make a record of this message; why.
    Failed(String),
}

#[derive(Debug, Clone)]
pub struct Rule {
    statement: Statement,
    filter: TopicFilter,
    /// `SELECT *` alone: the payload passes unchanged (no parse, no copy) unless WHERE reads it.
    passthrough: bool,
    /// `GROUP BY ..., STEP(...)`: a windowed rule.
    window: Option<window::Windowed>,
}

impl Rule {
    pub fn parse(sql: &str) -> Result<Self, SqlError> {
        let statement = parser::parse(sql)?;
        let filter = TopicFilter::parse(&statement.from)
            .map_err(|e| SqlError::at(statement.from_at, format!("FROM: {e}")))?;
        let passthrough = statement.projection == Projection::Items(vec![Item::Star]);
        let window = match statement.group_by.clone() {
            Some(group) => Some(window::Windowed::new(
                &statement.projection,
                statement.filter.as_ref(),
                group,
            )?),
            None => {
                let in_items = match &statement.projection {
                    Projection::Value(e) => window::contains_aggregate(e),
                    Projection::Items(items) => items.iter().any(
                        |i| matches!(i, Item::Expr { expr, .. } if window::contains_aggregate(expr)),
                    ),
                };
                if in_items
                    || statement
                        .filter
                        .as_ref()
                        .is_some_and(window::contains_aggregate)
                {
                    return Err(SqlError::at(
                        0,
                        "aggregates need a window: GROUP BY ..., STEP(ROWTIME BY INTERVAL '60' SECOND)",
                    ));
                }
                None
            }
        };
        Ok(Self {
            statement,
            filter,
            passthrough,
            window,
        })
    }

    /// The top-level payload fields the rule reads; None: all of them (`*`).
    pub fn fields(&self) -> Option<Vec<String>> {
        let mut out = Vec::new();
        let mut exprs: Vec<&parser::Expr> = self.statement.filter.iter().collect();
        match &self.statement.projection {
            // `SELECT *` alone passes the payload as it came: only WHERE reads fields.
            _ if self.passthrough => {}
            Projection::Value(e) => exprs.push(e),
            Projection::Items(items) => {
                for item in items {
                    match item {
                        Item::Star if self.window.is_none() => return None,
                        Item::Star => {}
                        Item::Expr { expr, .. } => exprs.push(expr),
                    }
                }
            }
        }
        if let Some(g) = &self.statement.group_by {
            exprs.extend(&g.keys);
        }
        for e in exprs {
            window::field_names(e, &mut out);
        }
        out.sort();
        out.dedup();
        Some(out)
    }

    /// The window of a windowed rule (its records are input rows, aggregated by the window
    /// stage).
    pub fn window(&self) -> Option<&window::Windowed> {
        self.window.as_ref()
    }

    /// What a windowed rule's closed window makes of one group (its key values and
    /// accumulators).
    /// `inputs_dropped`: some of the window's input rows may have been removed by the buffer's
    /// `drop_oldest` before they were aggregated; an object row then says so in a field of that
    /// name.
    pub fn close(
        &self,
        keys: &[Value],
        accs: &[window::Acc],
        start_ms: i64,
        inputs_dropped: bool,
    ) -> Applied {
        let w = self.window.as_ref().expect("a windowed rule");
        let doc = w.document(keys, accs, start_ms);
        let ctx = Context {
            topic: "",
            client_id: None,
            timestamp_ms: start_ms + w.window_ms,
        };
        project(&w.projection, &doc, &ctx, inputs_dropped)
    }

    /// The `FROM` filter: which topics the rule reads.
    pub fn filter(&self) -> &TopicFilter {
        &self.filter
    }

    /// Whether [`Self::apply`] reads the payload's fields (anything but `SELECT *` alone).
    pub fn reads_payload(&self) -> bool {
        !(self.passthrough && self.statement.filter.is_none())
    }

    /// Applies the rule to a message whose payload parsed as `doc` ([`Value::parse`]; a
    /// payload that is not JSON is `Value::Undefined`: its fields are Undefined, and `SELECT *`
    /// alone passes it as it is, as IoT Core passes binary payloads).
    pub fn apply<'a>(&self, doc: &Value<'a>, ctx: &Context<'a>) -> Applied {
        if !self.reads_payload() {
            return Applied::Selected(None);
        }
        if let Some(cond) = &self.statement.filter {
            match eval::eval(cond, doc, ctx) {
                Value::Bool(true) => {}
                Value::Bool(false) | Value::Null | Value::Undefined => return Applied::Dropped,
                v => match eval::to_bool(&v) {
                    Some(true) => {}
                    Some(false) => return Applied::Dropped,
                    None => {
                        return Applied::Failed(format!(
                            "WHERE gave {} {}, not a Boolean",
                            v.type_name(),
                            shown(&v)
                        ));
                    }
                },
            }
        }
        if let Some(w) = &self.window {
            return Applied::Selected(Some(w.input_row(doc, ctx)));
        }
        if self.passthrough {
            return Applied::Selected(None);
        }
        project(&self.statement.projection, doc, ctx, false)
    }
}

/// The SELECT list over a document.
fn project<'a>(
    projection: &Projection,
    doc: &Value<'a>,
    ctx: &Context<'a>,
    inputs_dropped: bool,
) -> Applied {
    let mut out = match projection {
        Projection::Value(e) => match eval::eval(e, doc, ctx) {
            Value::Undefined => return Applied::Dropped,
            v => v,
        },
        Projection::Items(items) => {
            // One allocation for the usual case (an item a field); a payload's `*` reserves more.
            let mut fields: Vec<(Cow<str>, Value)> = Vec::with_capacity(items.len());
            for item in items {
                match item {
                    Item::Star => match doc {
                        Value::Object(all) => {
                            // Replace only what the items before `*` put (a handful): a
                            // lookup per payload field would be quadratic in a payload
                            // of thousands of keys.
                            let before = fields.len();
                            fields.reserve(all.len());
                            for (k, v) in all {
                                match fields[..before].iter().position(|(f, _)| f == k) {
                                    Some(i) => fields[i].1 = v.clone(),
                                    None => fields.push((k.clone(), v.clone())),
                                }
                            }
                        }
                        Value::Undefined if items.len() == 1 => {
                            return Applied::Selected(None);
                        }
                        other => {
                            return Applied::Failed(format!(
                                "* of a payload that is {} cannot be combined with \
                                 other items",
                                if *other == Value::Undefined {
                                    "not JSON".to_string()
                                } else {
                                    format!("a JSON {}", other.type_name())
                                }
                            ));
                        }
                    },
                    Item::Expr { expr, name } => {
                        let v = eval::eval(expr, doc, ctx);
                        insert(&mut fields, name, v);
                    }
                }
            }
            Value::Object(fields)
        }
    };
    if let (true, Value::Object(fields)) = (inputs_dropped, &mut out) {
        fields.push((Cow::Borrowed("inputs_dropped"), Value::Bool(true)));
    }
    match serde_json::to_vec(&out) {
        Ok(bytes) => Applied::Selected(Some(bytes)),
        Err(e) => Applied::Failed(format!("cannot write the result as JSON: {e}")),
    }
}

/// Puts `v` under `path` in an object's fields, making the objects on the way (`AS a.b`); a
/// key already there is replaced, as a later item overrides `*`.
fn insert<'a>(fields: &mut Vec<(Cow<'a, str>, Value<'a>)>, path: &'a [String], v: Value<'a>) {
    let (first, rest) = path.split_first().expect("a name has at least one part");
    // The last occurrence: a payload's repeated key counts once, its last value (as lookups).
    let slot = match fields.iter().rposition(|(k, _)| k == first) {
        Some(i) => i,
        None => {
            fields.push((Cow::Borrowed(first.as_str()), Value::Undefined));
            fields.len() - 1
        }
    };
    if rest.is_empty() {
        fields[slot].1 = v;
        return;
    }
    if !matches!(fields[slot].1, Value::Object(_)) {
        fields[slot].1 = Value::Object(Vec::new());
    }
    if let Value::Object(inner) = &mut fields[slot].1 {
        insert(inner, rest, v);
    }
}

/// A value for a log line or an error message: JSON, cut short.
fn shown(v: &Value) -> String {
    let mut s = serde_json::to_string(v).unwrap_or_default();
    if let Some((cut, _)) = s.char_indices().nth(100) {
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// The message IoT Core's error action receives when a rule fails: what the stream's
/// `error_stream` gets for each message its rule could not process.
pub fn error_message(
    rule: &str,
    topic: &str,
    client_id: Option<&str>,
    payload: &[u8],
    error: &str,
) -> Vec<u8> {
    let trace: [u8; 16] = rand::random();
    serde_json::to_vec(&serde_json::json!({
        "ruleName": rule,
        "topic": topic,
        "cloudwatchTraceId": uuid::Builder::from_random_bytes(trace).into_uuid().to_string(),
        "clientId": client_id.unwrap_or(""),
        "base64OriginalPayload": base64::engine::general_purpose::STANDARD.encode(payload),
        "failures": [{
            "failedAction": "RuleEvaluation",
            "failedResource": rule,
            "errorMessage": error,
        }],
    }))
    .expect("a JSON object serializes")
}

#[cfg(test)]
mod tests;
