//! Tokens of IoT Core's rule SQL, each with the byte offset it starts at (for error positions).

use super::SqlError;

#[derive(Debug, Clone, PartialEq)]
pub enum Tok {
    /// A name: a keyword (the parser compares case-insensitively), a field or a function.
    Ident(String),
    /// A number as written; the parser decides Int or Decimal.
    Number(String),
    /// A string literal, quoted with `'` or `"` (IoT Core takes both), escapes resolved.
    Str(String),
    Sym(&'static str),
    End,
}

#[derive(Debug, Clone)]
pub struct Token {
    pub tok: Tok,
    pub at: usize,
}

/// Longest first, so that `<=` is not read as `<` and `=`.
const SYMBOLS: [&str; 22] = [
    "<>", "!=", "<=", ">=", "||", "<", ">", ",", ".", "*", "(", ")", "[", "]", "{", "}", ":", "+",
    "-", "/", "%", "=",
];

pub fn tokenize(sql: &str) -> Result<Vec<Token>, SqlError> {
    let bytes = sql.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        let at = i;
        if c.is_ascii_alphabetic() || c == b'_' {
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                i += 1;
            }
            out.push(Token {
                tok: Tok::Ident(sql[at..i].to_string()),
                at,
            });
        } else if c.is_ascii_digit() {
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            if i + 1 < bytes.len() && bytes[i] == b'.' && bytes[i + 1].is_ascii_digit() {
                i += 1;
                while i < bytes.len() && bytes[i].is_ascii_digit() {
                    i += 1;
                }
            }
            if i < bytes.len() && (bytes[i] == b'e' || bytes[i] == b'E') {
                let mut j = i + 1;
                if j < bytes.len() && (bytes[j] == b'+' || bytes[j] == b'-') {
                    j += 1;
                }
                if j < bytes.len() && bytes[j].is_ascii_digit() {
                    i = j;
                    while i < bytes.len() && bytes[i].is_ascii_digit() {
                        i += 1;
                    }
                }
            }
            out.push(Token {
                tok: Tok::Number(sql[at..i].to_string()),
                at,
            });
        } else if c == b'\'' || c == b'"' {
            let quote = c;
            let mut s = String::new();
            i += 1;
            loop {
                let Some(&b) = bytes.get(i) else {
                    return Err(SqlError::at(at, "string not closed"));
                };
                if b == quote {
                    // A doubled quote is a quote, as in SQL.
                    if bytes.get(i + 1) == Some(&quote) {
                        s.push(quote as char);
                        i += 2;
                        continue;
                    }
                    i += 1;
                    break;
                }
                if b == b'\\' {
                    let e = *bytes
                        .get(i + 1)
                        .ok_or_else(|| SqlError::at(i, "string not closed"))?;
                    s.push(match e {
                        b'n' => '\n',
                        b't' => '\t',
                        b'r' => '\r',
                        b'\\' | b'\'' | b'"' | b'/' => e as char,
                        _ => return Err(SqlError::at(i, "unknown escape in string")),
                    });
                    i += 2;
                    continue;
                }
                // Copy one whole UTF-8 character.
                let ch = sql[i..].chars().next().expect("inside the string");
                s.push(ch);
                i += ch.len_utf8();
            }
            out.push(Token {
                tok: Tok::Str(s),
                at,
            });
        } else if let Some(sym) = SYMBOLS.iter().find(|s| sql[i..].starts_with(**s)) {
            i += sym.len();
            out.push(Token {
                tok: Tok::Sym(sym),
                at,
            });
        } else {
            let ch = sql[i..].chars().next().expect("in bounds");
            return Err(SqlError::at(at, format!("unexpected character {ch:?}")));
        }
    }
    out.push(Token {
        tok: Tok::End,
        at: sql.len(),
    });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(s: &str) -> Vec<Tok> {
        tokenize(s).unwrap().into_iter().map(|t| t.tok).collect()
    }

    #[test]
    fn tokens_with_positions() {
        assert_eq!(
            toks("SELECT a.b, 1.5e3 FROM 'x/#' WHERE c <> \"it''s\""),
            [
                Tok::Ident("SELECT".into()),
                Tok::Ident("a".into()),
                Tok::Sym("."),
                Tok::Ident("b".into()),
                Tok::Sym(","),
                Tok::Number("1.5e3".into()),
                Tok::Ident("FROM".into()),
                Tok::Str("x/#".into()),
                Tok::Ident("WHERE".into()),
                Tok::Ident("c".into()),
                Tok::Sym("<>"),
                Tok::Str("it''s".into()),
                Tok::End,
            ]
        );
        assert_eq!(toks("'it''s'"), [Tok::Str("it's".into()), Tok::End]);
        assert_eq!(tokenize("a ; b").unwrap_err().position, 2);
        assert_eq!(tokenize("a = 'open").unwrap_err().position, 4);
    }
}
