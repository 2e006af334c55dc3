//! One field of a JSON document, found without building the document: `!{partitionKeyFromQuery:}`
//! reads a dotted path (`device`, `loc.site`) from every record of a batch, and a parsed
//! `serde_json::Value` per record (a map, a string per key) cost more than the rest of the
//! batch's assembly. Everything off the path is skipped, but still checked to be JSON, so the
//! answer is the one `serde_json::from_slice::<Value>` and a lookup would give: the last of
//! duplicate keys wins, trailing characters are an error.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// What is at the path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    /// No such field (or a step of the path is not an object).
    Missing,
    /// A string, number or boolean, as text (numbers as `serde_json` prints them).
    Scalar(String),
    /// null, an object or an array.
    Other,
}

/// Looks up `path` (steps separated by `.`) in `json`; an error if `json` is not one JSON value.
pub fn find(json: &[u8], path: &str) -> Result<Field, serde_json::Error> {
    let steps: Vec<&str> = path.split('.').collect();
    let mut de = serde_json::Deserializer::from_slice(json);
    let found = At(&steps).deserialize(&mut de)?;
    de.end()?;
    Ok(found)
}

/// The rest of the path, from the value being read.
struct At<'p>(&'p [&'p str]);

impl<'de> DeserializeSeed<'de> for At<'_> {
    type Value = Field;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Field, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for At<'_> {
    type Value = Field;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Field, E> {
        Ok(self.scalar(|| v.to_string()))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Field, E> {
        Ok(self.scalar(|| v.to_string()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Field, E> {
        Ok(self.scalar(|| v.to_string()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Field, E> {
        // serde_json never produces a non-finite number; `Other` is only a guard.
        Ok(match serde_json::Number::from_f64(v) {
            Some(n) => self.scalar(|| n.to_string()),
            None => self.leaf(Field::Other),
        })
    }

    fn visit_str<E>(self, v: &str) -> Result<Field, E> {
        Ok(self.scalar(|| v.to_string()))
    }

    fn visit_unit<E>(self) -> Result<Field, E> {
        Ok(self.leaf(Field::Other))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Field, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(self.leaf(Field::Other))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Field, A::Error> {
        let Some((step, rest)) = self.0.split_first() else {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            return Ok(Field::Other);
        };
        let mut found = Field::Missing;
        while let Some(hit) = map.next_key_seed(Is(step))? {
            if hit {
                found = map.next_value_seed(At(rest))?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }
}

impl At<'_> {
    /// A scalar is the answer at the path's end, and a dead end before it.
    fn scalar(&self, text: impl FnOnce() -> String) -> Field {
        if self.0.is_empty() {
            Field::Scalar(text())
        } else {
            Field::Missing
        }
    }

    fn leaf(&self, at_end: Field) -> Field {
        if self.0.is_empty() {
            at_end
        } else {
            Field::Missing
        }
    }
}

/// Whether an object's key is this step, compared without copying the key.
struct Is<'s>(&'s str);

impl<'de> DeserializeSeed<'de> for Is<'_> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Is<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
        Ok(v == self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a parsed `Value` and a lookup say, the behaviour `find` must keep.
    fn by_value(json: &[u8], path: &str) -> Result<Field, ()> {
        let value: serde_json::Value = serde_json::from_slice(json).map_err(|_| ())?;
        let mut at = &value;
        for step in path.split('.') {
            match at.get(step) {
                Some(v) => at = v,
                None => return Ok(Field::Missing),
            }
        }
        Ok(match at {
            serde_json::Value::String(s) => Field::Scalar(s.clone()),
            serde_json::Value::Number(n) => Field::Scalar(n.to_string()),
            serde_json::Value::Bool(b) => Field::Scalar(b.to_string()),
            _ => Field::Other,
        })
    }

    #[test]
    fn finds_what_a_parsed_document_holds() {
        let docs: &[&[u8]] = &[
            br#"{"device":"d1","loc":{"site":7,"x":[1,{"site":2}]}}"#,
            br#"{"device":"d\u00e9\"1","n":-3,"f":2.50,"e":1e3,"t":true,"z":null}"#,
            br#"{"device":"first","device":"last"}"#,
            br#"{"loc":{"site":1},"loc":5}"#,
            br#"{"loc":[{"site":1}]}"#,
            br#"{"big":18446744073709551615,"neg":-9223372036854775808,"tiny":1e-300}"#,
            br#"  {"a" : { "b" : { "c" : "deep" } } }  "#,
            br#"[1,2,3]"#,
            br#""just a string""#,
            br#"{"device":"d1"} trailing"#,
            br#"{"device":"d1""#,
            br#"{"device":}"#,
            b"not json",
            b"",
        ];
        let paths = [
            "device", "loc.site", "loc", "n", "f", "e", "t", "z", "big", "neg", "tiny", "a.b.c",
            "a.b", "x", "",
        ];
        for doc in docs {
            for path in paths {
                let want = by_value(doc, path);
                let got = find(doc, path).map_err(|_| ());
                assert_eq!(got, want, "{path:?} in {:?}", String::from_utf8_lossy(doc));
            }
        }
    }
}
