//! One field of a JSON document, found without building the document: `!{partitionKeyFromQuery:}`
//! reads a dotted path (`device`, `loc.site`) from every record of a batch, and a parsed
//! `serde_json::Value` per record (a map, a string per key) cost more than the rest of the
//! batch's assembly. A single pass over the bytes finds the field; everything off the path is
//! skipped but still checked to be JSON, so the answer is the one `serde_json::from_slice::<Value>`
//! and a lookup would give: the last of duplicate keys wins, trailing characters, invalid UTF-8,
//! lone surrogates, numbers out of range and nesting past serde_json's limit are errors. The
//! rare cases (escapes in a key or in the answer, numbers with exponents or hundreds of digits,
//! surrogate escapes) are handed to serde_json itself, so its rules decide them.

use std::borrow::Cow;
use std::fmt;

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

/// Why a document is not JSON, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotJson {
    pub offset: usize,
    pub reason: &'static str,
}

impl fmt::Display for NotJson {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{} at byte {}", self.reason, self.offset)
    }
}

impl std::error::Error for NotJson {}

/// serde_json's nesting limit: it refuses a document whose arrays and objects nest this deep.
const MAX_DEPTH: usize = 128;

/// Looks up `path` (steps separated by `.`) in `json`; an error if `json` is not one JSON value.
pub fn find(json: &[u8], path: &str) -> Result<Field, NotJson> {
    let steps: Vec<&str> = path.split('.').collect();
    find_steps(json, &steps)
}

/// [`find`] with the path already split into its steps (a batch looks up the same path in
/// every record).
pub fn find_steps(json: &[u8], steps: &[&str]) -> Result<Field, NotJson> {
    let mut scan = Scan::new(json)?;
    let found = scan.value(Some(steps), 0)?;
    scan.finish()?;
    Ok(found)
}

/// Calls `each` with (key, the value's bytes) for every field of a top-level object whose key
/// `want`s, in order, duplicates included (rules read a handful of a payload's fields and build
/// only those). The whole document is checked as [`find`] checks it. Ok(false) when the
/// document is not an object: the caller parses it whole.
pub fn object_fields<'a>(
    json: &'a [u8],
    want: impl Fn(&str) -> bool,
    mut each: impl FnMut(Cow<'a, str>, &'a [u8]) -> Result<(), NotJson>,
) -> Result<bool, NotJson> {
    let mut scan = Scan::new(json)?;
    scan.ws();
    if scan.peek() != Some(b'{') {
        return Ok(false);
    }
    scan.members(1, |scan, key| {
        let start = scan.i;
        scan.value(None, 1)?;
        let key = scan.str_of(&key)?;
        if want(&key) {
            each(key, &json[start..scan.i])?;
        }
        Ok(())
    })?;
    scan.finish()?;
    Ok(true)
}

struct Scan<'a> {
    b: &'a [u8],
    i: usize,
}

/// A string's extent: its bytes between the quotes.
struct Str {
    start: usize,
    end: usize,
    /// It holds a backslash escape: its bytes are not its value.
    escaped: bool,
}

impl<'a> Scan<'a> {
    /// A scan of a document, which must be UTF-8 as a whole (serde_json checks its strings;
    /// outside them any non-ASCII byte is an error anyway).
    fn new(b: &'a [u8]) -> Result<Self, NotJson> {
        if let Err(e) = std::str::from_utf8(b) {
            return Err(NotJson {
                offset: e.valid_up_to(),
                reason: "invalid UTF-8",
            });
        }
        Ok(Self { b, i: 0 })
    }

    /// After the document's value: only whitespace may follow.
    fn finish(&mut self) -> Result<(), NotJson> {
        self.ws();
        if self.i != self.b.len() {
            return Err(self.err("trailing characters"));
        }
        Ok(())
    }

    fn err(&self, reason: &'static str) -> NotJson {
        NotJson {
            offset: self.i,
            reason,
        }
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.i += 1;
        }
    }

    fn expect(&mut self, c: u8, reason: &'static str) -> Result<(), NotJson> {
        self.ws();
        if self.peek() != Some(c) {
            return Err(self.err(reason));
        }
        self.i += 1;
        Ok(())
    }

    /// One value. `path`: the steps left when the value is on the path, None when it is only
    /// checked; what it finds matters only on the path.
    fn value(&mut self, path: Option<&[&str]>, depth: usize) -> Result<Field, NotJson> {
        self.ws();
        // What a value other than an object is: the answer at the path's end, a dead end before.
        let leaf = |at_end: Field| match path {
            Some([]) => at_end,
            _ => Field::Missing,
        };
        match self.peek() {
            Some(b'{') => self.object(path, depth + 1),
            Some(b'[') => {
                self.array(depth + 1)?;
                Ok(leaf(Field::Other))
            }
            Some(b'"') => {
                let s = self.string()?;
                Ok(match path {
                    Some([]) => Field::Scalar(self.str_of(&s)?.into_owned()),
                    _ => Field::Missing,
                })
            }
            Some(b't') => {
                self.literal(b"true")?;
                Ok(leaf(Field::Scalar("true".into())))
            }
            Some(b'f') => {
                self.literal(b"false")?;
                Ok(leaf(Field::Scalar("false".into())))
            }
            Some(b'n') => {
                self.literal(b"null")?;
                Ok(leaf(Field::Other))
            }
            Some(b'-' | b'0'..=b'9') => {
                let start = self.i;
                let rare = self.number()?;
                let text = &self.b[start..self.i];
                let answer = matches!(path, Some([]));
                if !(rare || answer) {
                    return Ok(Field::Missing);
                }
                // serde_json decides what the number is (and whether it is out of range).
                match serde_json::from_slice::<serde_json::Number>(text) {
                    Ok(n) if answer => Ok(Field::Scalar(n.to_string())),
                    Ok(_) => Ok(Field::Missing),
                    Err(_) => Err(NotJson {
                        offset: start,
                        reason: "number out of range",
                    }),
                }
            }
            Some(_) => Err(self.err("expected a value")),
            None => Err(self.err("unexpected end")),
        }
    }

    fn object(&mut self, path: Option<&[&str]>, depth: usize) -> Result<Field, NotJson> {
        let mut found = Field::Missing;
        self.members(depth, |scan, key| {
            match path {
                // The last of duplicate keys wins.
                Some([step, rest @ ..]) if scan.is(&key, step)? => {
                    found = scan.value(Some(rest), depth)?
                }
                _ => {
                    scan.value(None, depth)?;
                }
            }
            Ok(())
        })?;
        Ok(match path {
            Some([]) => Field::Other,
            Some(_) => found,
            None => Field::Missing,
        })
    }

    /// Walks an object (at its opening brace): `member` gets each key, after its colon, and
    /// must read the value.
    fn members(
        &mut self,
        depth: usize,
        mut member: impl FnMut(&mut Self, Str) -> Result<(), NotJson>,
    ) -> Result<(), NotJson> {
        if depth >= MAX_DEPTH {
            return Err(self.err("nested too deep"));
        }
        self.i += 1;
        self.ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            return Ok(());
        }
        loop {
            self.ws();
            if self.peek() != Some(b'"') {
                return Err(self.err("expected a key"));
            }
            let key = self.string()?;
            self.expect(b':', "expected ':'")?;
            self.ws();
            member(self, key)?;
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b'}') => {
                    self.i += 1;
                    return Ok(());
                }
                _ => return Err(self.err("expected ',' or '}'")),
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<(), NotJson> {
        if depth >= MAX_DEPTH {
            return Err(self.err("nested too deep"));
        }
        self.i += 1;
        self.ws();
        if self.peek() == Some(b']') {
            self.i += 1;
            return Ok(());
        }
        loop {
            self.value(None, depth)?;
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b']') => {
                    self.i += 1;
                    return Ok(());
                }
                _ => return Err(self.err("expected ',' or ']'")),
            }
        }
    }

    fn literal(&mut self, word: &[u8]) -> Result<(), NotJson> {
        if !self.b[self.i..].starts_with(word) {
            return Err(self.err("expected a value"));
        }
        self.i += word.len();
        Ok(())
    }

    /// Skips a number (JSON's grammar); true if serde_json must look at it: an exponent or
    /// enough digits to pass f64's range.
    fn number(&mut self) -> Result<bool, NotJson> {
        let start = self.i;
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.peek() {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => self.digits(),
            _ => return Err(self.err("invalid number")),
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(self.err("invalid number"));
            }
            self.digits();
        }
        let mut exponent = false;
        if let Some(b'e' | b'E') = self.peek() {
            exponent = true;
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(self.err("invalid number"));
            }
            self.digits();
        }
        Ok(exponent || self.i - start > 300)
    }

    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
    }

    /// Skips a string (at its opening quote).
    fn string(&mut self) -> Result<Str, NotJson> {
        self.i += 1;
        let start = self.i;
        let mut escaped = false;
        let mut surrogate = false;
        loop {
            self.plain();
            match self.peek() {
                Some(b'"') => break,
                Some(b'\\') => {
                    escaped = true;
                    self.i += 1;
                    match self.peek() {
                        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => self.i += 1,
                        Some(b'u') => {
                            self.i += 1;
                            let hex = self.b.get(self.i..self.i + 4).unwrap_or_default();
                            if hex.len() < 4 || !hex.iter().all(u8::is_ascii_hexdigit) {
                                return Err(self.err("invalid \\u escape"));
                            }
                            // A surrogate must pair up: serde_json judges.
                            surrogate |= matches!(hex[0], b'd' | b'D')
                                && matches!(hex[1], b'8'..=b'9' | b'a'..=b'f' | b'A'..=b'F');
                            self.i += 4;
                        }
                        _ => return Err(self.err("invalid escape")),
                    }
                }
                Some(0..=0x1f) => return Err(self.err("control character in a string")),
                Some(_) => self.i += 1,
                None => return Err(self.err("unterminated string")),
            }
        }
        let s = Str {
            start,
            end: self.i,
            escaped,
        };
        self.i += 1;
        if surrogate {
            self.decode(&s)?;
        }
        Ok(s)
    }

    /// Skips the string's bytes up to its next quote, backslash or control character, eight
    /// at a time.
    fn plain(&mut self) {
        const ONES: u64 = 0x0101_0101_0101_0101;
        const HIGH: u64 = 0x8080_8080_8080_8080;
        // The high bit of each byte that is zero (exact for the lowest such byte).
        let zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
        while let Some(chunk) = self.b.get(self.i..self.i + 8) {
            let x = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
            let stop = zero(x ^ (ONES * u64::from(b'"')))
                | zero(x ^ (ONES * u64::from(b'\\')))
                | (x.wrapping_sub(ONES * 0x20) & !x & HIGH);
            if stop != 0 {
                self.i += stop.trailing_zeros() as usize / 8;
                return;
            }
            self.i += 8;
        }
    }

    /// A string's value; serde_json decodes its escapes.
    fn decode(&self, s: &Str) -> Result<String, NotJson> {
        serde_json::from_slice(&self.b[s.start - 1..=s.end]).map_err(|_| NotJson {
            offset: s.start - 1,
            reason: "invalid escape",
        })
    }

    /// A string's value, borrowed when it holds no escapes.
    fn str_of(&self, s: &Str) -> Result<Cow<'a, str>, NotJson> {
        if s.escaped {
            return self.decode(s).map(Cow::Owned);
        }
        // Checked to be UTF-8 as a whole, and a string ends at an (ASCII) quote.
        std::str::from_utf8(&self.b[s.start..s.end])
            .map(Cow::Borrowed)
            .map_err(|_| NotJson {
                offset: s.start,
                reason: "invalid UTF-8",
            })
    }

    /// Whether a key is this step.
    fn is(&self, key: &Str, step: &str) -> Result<bool, NotJson> {
        if key.escaped {
            return Ok(self.decode(key)? == step);
        }
        Ok(&self.b[key.start..key.end] == step.as_bytes())
    }
}

/// `count` documents made from `seeds` by up to three random edits each (a byte removed,
/// replaced or inserted, from JSON's punctuation, digits, escapes, a control byte and invalid
/// UTF-8), from a deterministic generator: what the scanner's tests compare with serde_json.
#[cfg(test)]
pub(crate) fn damaged(seeds: &[&[u8]], seed: u64, count: usize) -> Vec<Vec<u8>> {
    let alphabet = b"{}[]\":,.-+eE0123456789 \\/ubntrfaelsxd\x01\x7f\xc3\xa9";
    let mut x = seed | 1;
    let mut next = move |n: usize| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % n as u64) as usize
    };
    (0..count)
        .map(|_| {
            let mut doc = seeds[next(seeds.len())].to_vec();
            for _ in 0..next(4) {
                let at = next(doc.len() + 1);
                match next(3) {
                    0 if at < doc.len() => {
                        doc.remove(at);
                    }
                    1 if at < doc.len() => doc[at] = alphabet[next(alphabet.len())],
                    _ => doc.insert(at, alphabet[next(alphabet.len())]),
                }
            }
            doc
        })
        .collect()
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
            br#"{"dev\u0069ce":"esc\u00e9\n","device":"x","device":"y\ud83d\ude00"}"#,
            br#"{"device":"\ud800"}"#,
            br#"{"x":"\udc00","device":1}"#,
            br#"{"device":1e400}"#,
            br#"{"x":1e400,"device":1}"#,
            br#"{"device":-0,"n":-0.0,"f":1E+2,"e":1e-400}"#,
            br#"{"device":01}"#,
            br#"{"device":1.}"#,
            br#"{"device":.5}"#,
            br#"{"device":"tab	inside"}"#,
            br#"{"device":"a",}"#,
            br#"{,"device":"a"}"#,
            br#"[1,]"#,
            br#"{"device" "a"}"#,
            br#"{"device":tru}"#,
            br#"{"device":nul,"x":1}"#,
            br#"{"device":"\x"}"#,
            br#"{"device":"\u12"}"#,
            b"{\"device\":\"\xff\"}",
            b"{\"device\":\"ok\"}\xc3",
            b" \t\r\n{\"device\" : true } \n",
        ];
        let paths = [
            "device", "loc.site", "loc", "n", "f", "e", "t", "z", "big", "neg", "tiny", "a.b.c",
            "a.b", "x", "", "device.x",
        ];
        for doc in docs {
            for path in paths {
                let want = by_value(doc, path);
                let got = find(doc, path).map_err(|_| ());
                assert_eq!(got, want, "{path:?} in {:?}", String::from_utf8_lossy(doc));
            }
        }
    }

    #[test]
    fn nesting_stops_where_serde_json_stops() {
        for depth in [1, 100, 126, 127, 128, 129, 200] {
            for (open, close) in [("[", "]"), ("{\"a\":", "}")] {
                let doc = format!("{}1{}", open.repeat(depth), close.repeat(depth));
                let doc = format!("{{\"device\":1,\"x\":{doc}}}");
                for path in ["device", "x", "x.a", "x.a.a"] {
                    let want = by_value(doc.as_bytes(), path);
                    assert_eq!(
                        find(doc.as_bytes(), path).map_err(|_| ()),
                        want,
                        "{depth} {open}"
                    );
                }
            }
        }
    }

    /// Random damage to valid documents (a deterministic generator): whatever the bytes, the
    /// answer is serde_json's.
    #[test]
    fn damaged_documents_get_serde_jsons_answer() {
        let seeds: &[&[u8]] = &[
            br#"{"device":"d-01","seq":12,"t":21.5,"e":-1.5e3,"ok":true,"z":null,"a":[1,"x",{"device":2}],"loc":{"site":"s\u00e9","n":[]}}"#,
            br#"{"loc":{"site":7},"device":"\"q\"","loc":{"site":"late"}}"#,
        ];
        for doc in damaged(seeds, 0x9e37_79b9_7f4a_7c15, 20_000) {
            for path in ["device", "loc.site", "a", "loc"] {
                let want = by_value(&doc, path);
                let got = find(&doc, path).map_err(|_| ());
                assert_eq!(got, want, "{path:?} in {:?}", String::from_utf8_lossy(&doc));
            }
        }
    }
}
