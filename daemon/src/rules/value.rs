//! The values rule SQL computes with: IoT Core's types (Int, Decimal, Boolean, String, Array,
//! Object, Null, Undefined), read from a JSON payload without copying its strings (they borrow
//! from the payload unless they hold escapes) and written back to JSON.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};

use crate::templates::json_field::{self, NotJson};

#[derive(Debug, Clone, PartialEq)]
pub enum Value<'a> {
    /// Not a value: a missing field, a function given the wrong types. Left out of the output.
    Undefined,
    Null,
    Bool(bool),
    Int(i64),
    Decimal(f64),
    Str(Cow<'a, str>),
    Array(Vec<Value<'a>>),
    /// In the payload's order; a repeated key: the last one wins on lookup, as in IoT Core.
    Object(Vec<(Cow<'a, str>, Value<'a>)>),
}

impl<'a> Value<'a> {
    /// Parses a JSON document, borrowing its strings.
    pub fn parse(json: &'a [u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(json)
    }

    /// Parses a JSON document keeping, of a top-level object, only the fields named (the rest
    /// is checked and skipped, never built): what rules read of a message.
    pub fn parse_fields(json: &'a [u8], fields: &[String]) -> Result<Self, NotJson> {
        let mut out = Vec::new();
        let object = json_field::object_fields(
            json,
            |k| fields.iter().any(|f| f == k),
            |k, bytes| {
                // Checked as JSON already: serde_json builds the value.
                let v = serde_json::from_slice(bytes).map_err(|_| NotJson {
                    offset: bytes.as_ptr() as usize - json.as_ptr() as usize,
                    reason: "invalid value",
                })?;
                out.push((k, v));
                Ok(())
            },
        )?;
        if object {
            return Ok(Value::Object(out));
        }
        // Not an object: all of it (serde_json's columns count bytes on a one-line document).
        Value::parse(json).map_err(|e| NotJson {
            offset: e.column().saturating_sub(1),
            reason: "not JSON",
        })
    }

    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Undefined => "Undefined",
            Value::Null => "Null",
            Value::Bool(_) => "Boolean",
            Value::Int(_) => "Int",
            Value::Decimal(_) => "Decimal",
            Value::Str(_) => "String",
            Value::Array(_) => "Array",
            Value::Object(_) => "Object",
        }
    }

    pub fn field(&self, name: &str) -> Option<&Value<'a>> {
        match self {
            Value::Object(fields) => fields.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v),
            _ => None,
        }
    }

    /// A whole number as Int (IoT Core's SQL 2016-03-23 treats `10.0` as `10`).
    pub fn number(f: f64) -> Self {
        if f.fract() == 0.0 && f.abs() < 9.0e15 {
            Value::Int(f as i64)
        } else {
            Value::Decimal(f)
        }
    }

    /// Makes every borrowed string owned, to outlive the payload.
    pub fn into_owned(self) -> Value<'static> {
        match self {
            Value::Undefined => Value::Undefined,
            Value::Null => Value::Null,
            Value::Bool(b) => Value::Bool(b),
            Value::Int(i) => Value::Int(i),
            Value::Decimal(d) => Value::Decimal(d),
            Value::Str(s) => Value::Str(Cow::Owned(s.into_owned())),
            Value::Array(a) => Value::Array(a.into_iter().map(Value::into_owned).collect()),
            Value::Object(o) => Value::Object(
                o.into_iter()
                    .map(|(k, v)| (Cow::Owned(k.into_owned()), v.into_owned()))
                    .collect(),
            ),
        }
    }

    /// The text `cast(x AS String)` and `concat` give: strings as they are, numbers and
    /// Booleans as written in JSON, arrays and objects as JSON; Null and Undefined have none.
    pub fn to_text(&self) -> Option<Cow<'a, str>> {
        match self {
            Value::Str(s) => Some(s.clone()),
            Value::Bool(b) => Some(Cow::Borrowed(if *b { "true" } else { "false" })),
            Value::Int(i) => Some(Cow::Owned(i.to_string())),
            Value::Decimal(_) | Value::Array(_) | Value::Object(_) => {
                Some(Cow::Owned(serde_json::to_string(self).ok()?))
            }
            Value::Null | Value::Undefined => None,
        }
    }
}

impl Serialize for Value<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            // Only reached for a top-level value: fields and elements skip it.
            Value::Undefined | Value::Null => s.serialize_unit(),
            Value::Bool(b) => s.serialize_bool(*b),
            Value::Int(i) => s.serialize_i64(*i),
            Value::Decimal(d) if d.is_finite() => s.serialize_f64(*d),
            Value::Decimal(_) => s.serialize_unit(),
            Value::Str(v) => s.serialize_str(v),
            Value::Array(a) => {
                let mut seq = s.serialize_seq(None)?;
                for v in a.iter().filter(|v| **v != Value::Undefined) {
                    seq.serialize_element(v)?;
                }
                seq.end()
            }
            Value::Object(o) => {
                let mut map = s.serialize_map(None)?;
                for (k, v) in o.iter().filter(|(_, v)| *v != Value::Undefined) {
                    map.serialize_entry(k.as_ref(), v)?;
                }
                map.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for Value<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ValueVisitor)
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value<'de>, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value<'de>, E> {
        Ok(Value::Int(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value<'de>, E> {
        Ok(i64::try_from(v).map_or(Value::Decimal(v as f64), Value::Int))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value<'de>, E> {
        Ok(Value::number(v))
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Value<'de>, E> {
        Ok(Value::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value<'de>, E> {
        Ok(Value::Str(Cow::Owned(v.to_string())))
    }
    fn visit_string<E>(self, v: String) -> Result<Value<'de>, E> {
        Ok(Value::Str(Cow::Owned(v)))
    }
    fn visit_unit<E>(self) -> Result<Value<'de>, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value<'de>, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value<'de>, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value<'de>, A::Error> {
        let mut out = Vec::new();
        while let Some(k) = map.next_key::<Key<'de>>()? {
            out.push((k.0, map.next_value()?));
        }
        Ok(Value::Object(out))
    }
}

/// An object key, borrowed when it holds no escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
            fn visit_string<E>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trips_and_borrows_plain_strings() {
        let json = br#"{"a":"plain","b":"es\"c","n":10.0,"d":1.5,"big":18446744073709551615,"x":[1,null,true],"o":{}}"#;
        let v = Value::parse(json).unwrap();
        assert!(matches!(
            v.field("a"),
            Some(Value::Str(Cow::Borrowed("plain")))
        ));
        assert!(matches!(v.field("b"), Some(Value::Str(Cow::Owned(_)))));
        assert_eq!(v.field("n"), Some(&Value::Int(10)));
        assert_eq!(v.field("d"), Some(&Value::Decimal(1.5)));
        assert_eq!(
            serde_json::to_string(&v).unwrap(),
            r#"{"a":"plain","b":"es\"c","n":10,"d":1.5,"big":1.8446744073709552e+19,"x":[1,null,true],"o":{}}"#
        );
        let with_undefined = Value::Object(vec![
            ("u".into(), Value::Undefined),
            (
                "k".into(),
                Value::Array(vec![Value::Undefined, Value::Int(1)]),
            ),
        ]);
        assert_eq!(
            serde_json::to_string(&with_undefined).unwrap(),
            r#"{"k":[1]}"#
        );
    }
}
