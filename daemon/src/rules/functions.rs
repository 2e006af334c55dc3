//! The IoT Core SQL functions edgehose implements, with IoT Core's rule for wrong arguments:
//! a function given a type it cannot use returns Undefined (never an error).

use std::borrow::Cow;

use super::eval::{to_decimal, to_number, Context};
use super::value::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Function {
    Topic,
    ClientId,
    Timestamp,
    NewUuid,
    Abs,
    Round,
    Floor,
    Ceil,
    Concat,
    Lower,
    Upper,
    Substring,
    Get,
    Length,
    /// A windowed rule's window bounds (epoch ms); Undefined outside one.
    WindowStart,
    WindowEnd,
}

impl Function {
    pub const NAMES: [&'static str; 17] = [
        "abs",
        "cast",
        "ceil",
        "clientid",
        "concat",
        "floor",
        "get",
        "length",
        "lower",
        "newuuid",
        "round",
        "substring",
        "timestamp",
        "topic",
        "upper",
        "window_end",
        "window_start",
    ];

    pub fn name(self) -> &'static str {
        match self {
            Function::Topic => "topic",
            Function::ClientId => "clientid",
            Function::Timestamp => "timestamp",
            Function::NewUuid => "newuuid",
            Function::Abs => "abs",
            Function::Round => "round",
            Function::Floor => "floor",
            Function::Ceil => "ceil",
            Function::Concat => "concat",
            Function::Lower => "lower",
            Function::Upper => "upper",
            Function::Substring => "substring",
            Function::Get => "get",
            Function::Length => "length",
            Function::WindowStart => "window_start",
            Function::WindowEnd => "window_end",
        }
    }

    pub fn named(name: &str) -> Option<Self> {
        Some(match name.to_ascii_lowercase().as_str() {
            "topic" => Function::Topic,
            "clientid" => Function::ClientId,
            "timestamp" => Function::Timestamp,
            "newuuid" => Function::NewUuid,
            "abs" => Function::Abs,
            "round" => Function::Round,
            "floor" => Function::Floor,
            "ceil" => Function::Ceil,
            "concat" => Function::Concat,
            "lower" => Function::Lower,
            "upper" => Function::Upper,
            "substring" => Function::Substring,
            "get" => Function::Get,
            "length" => Function::Length,
            "window_start" => Function::WindowStart,
            "window_end" => Function::WindowEnd,
            _ => return None,
        })
    }

    /// (fewest, most) arguments.
    pub fn arity(self) -> (usize, usize) {
        match self {
            Function::ClientId
            | Function::Timestamp
            | Function::NewUuid
            | Function::WindowStart
            | Function::WindowEnd => (0, 0),
            Function::Topic => (0, 1),
            Function::Abs
            | Function::Round
            | Function::Floor
            | Function::Ceil
            | Function::Lower
            | Function::Upper
            | Function::Length => (1, 1),
            Function::Get => (2, 2),
            Function::Substring => (2, 3),
            Function::Concat => (2, usize::MAX),
        }
    }

    pub fn call<'a>(self, args: Vec<Value<'a>>, ctx: &Context<'a>) -> Value<'a> {
        let arg = |i: usize| args.get(i).unwrap_or(&Value::Undefined);
        match self {
            Function::Topic => match args.first() {
                None => Value::Str(Cow::Borrowed(ctx.topic)),
                Some(n) => match to_number(n) {
                    // 1-based; a level past the end is Undefined.
                    Some(Value::Int(n)) if n >= 1 => ctx
                        .topic
                        .split('/')
                        .nth(n as usize - 1)
                        .map_or(Value::Undefined, |l| Value::Str(Cow::Borrowed(l))),
                    _ => Value::Undefined,
                },
            },
            Function::ClientId => ctx
                .client_id
                .map_or(Value::Undefined, |c| Value::Str(Cow::Borrowed(c))),
            Function::Timestamp => Value::Int(ctx.timestamp_ms),
            Function::NewUuid => {
                let bytes: [u8; 16] = rand::random();
                Value::Str(Cow::Owned(
                    uuid::Builder::from_random_bytes(bytes)
                        .into_uuid()
                        .to_string(),
                ))
            }
            Function::Abs => match to_number(arg(0)) {
                Some(Value::Int(i)) => i.checked_abs().map_or(Value::Undefined, Value::Int),
                Some(Value::Decimal(d)) => Value::Decimal(d.abs()),
                _ => Value::Undefined,
            },
            Function::Round => rounded(arg(0), f64::round),
            Function::Floor => rounded(arg(0), f64::floor),
            Function::Ceil => rounded(arg(0), f64::ceil),
            Function::Concat => {
                if args.iter().any(|a| matches!(a, Value::Array(_))) {
                    let mut out = Vec::new();
                    for a in args {
                        match a {
                            Value::Array(items) => out.extend(items),
                            Value::Undefined => return Value::Undefined,
                            v => out.push(v),
                        }
                    }
                    Value::Array(out)
                } else {
                    let mut out = String::new();
                    for a in &args {
                        match a.to_text() {
                            Some(t) => out.push_str(&t),
                            None => return Value::Undefined,
                        }
                    }
                    Value::Str(Cow::Owned(out))
                }
            }
            Function::Lower | Function::Upper => match arg(0) {
                Value::Str(_) | Value::Int(_) | Value::Decimal(_) | Value::Bool(_) => {
                    let t = arg(0).to_text().expect("has text");
                    Value::Str(Cow::Owned(if self == Function::Lower {
                        t.to_lowercase()
                    } else {
                        t.to_uppercase()
                    }))
                }
                _ => Value::Undefined,
            },
            Function::Substring => {
                let Some(text) = arg(0).to_text().filter(|_| {
                    !matches!(arg(0), Value::Array(_) | Value::Object(_) | Value::Null)
                }) else {
                    return Value::Undefined;
                };
                let index = |v: &Value| match to_number(v) {
                    Some(Value::Int(i)) => Some(i),
                    Some(Value::Decimal(d)) => Some(d.trunc() as i64),
                    _ => None,
                };
                let chars = text.chars().count() as i64;
                let Some(start) = index(arg(1)) else {
                    return Value::Undefined;
                };
                let end = match args.get(2) {
                    None => chars,
                    Some(v) => match index(v) {
                        Some(e) => e,
                        None => return Value::Undefined,
                    },
                };
                // 0-based, end exclusive, both clamped to the string.
                let start = start.clamp(0, chars) as usize;
                let end = end.clamp(0, chars) as usize;
                if end <= start {
                    return Value::Str(Cow::Borrowed(""));
                }
                Value::Str(Cow::Owned(
                    text.chars().skip(start).take(end - start).collect(),
                ))
            }
            Function::Get => {
                let mut args = args.into_iter();
                let (Some(container), Some(key)) = (args.next(), args.next()) else {
                    return Value::Undefined;
                };
                match (container, key) {
                    (Value::Array(items), k) => match to_number(&k) {
                        Some(Value::Int(i)) if i >= 0 => items
                            .into_iter()
                            .nth(i as usize)
                            .unwrap_or(Value::Undefined),
                        _ => Value::Undefined,
                    },
                    (Value::Object(fields), Value::Str(k)) => fields
                        .into_iter()
                        .rev()
                        .find(|(name, _)| *name == k)
                        .map_or(Value::Undefined, |(_, v)| v),
                    _ => Value::Undefined,
                }
            }
            Function::WindowStart | Function::WindowEnd => Value::Undefined,
            Function::Length => match arg(0) {
                Value::Str(s) => Value::Int(s.chars().count() as i64),
                Value::Array(a) => Value::Int(a.len() as i64),
                Value::Object(o) => Value::Int(o.len() as i64),
                _ => Value::Undefined,
            },
        }
    }
}

/// round/floor/ceil: a Decimal (or a numeric string) to the Int it rounds to; an Int is itself.
fn rounded<'a>(v: &Value<'a>, f: fn(f64) -> f64) -> Value<'a> {
    match to_number(v) {
        Some(Value::Int(i)) => Value::Int(i),
        Some(_) => match to_decimal(v) {
            Some(d) => {
                let r = f(d);
                if r.is_finite() && r.abs() < 9.2e18 {
                    Value::Int(r as i64)
                } else {
                    Value::Undefined
                }
            }
            None => Value::Undefined,
        },
        None => Value::Undefined,
    }
}
