//! Rule SQL to a syntax tree: `SELECT [VALUE] ... FROM 'topic/filter' [WHERE ...]`, with IoT
//! Core's expressions (operators, `CASE`, `IS [NOT] NULL|UNDEFINED`, `IN`, JSON object and array
//! literals, nested fields, `[n]`, function calls). Hand-written: the `FROM` clause is a quoted
//! MQTT filter, which general SQL parsers take for a string where a table belongs.

use super::functions::Function;
use super::lexer::{tokenize, Tok, Token};
use super::value::Value;
use super::SqlError;

#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Literal(Value<'static>),
    /// A top-level field of the payload.
    Field(String),
    Member(Box<Expr>, String),
    Index(Box<Expr>, Box<Expr>),
    Neg(Box<Expr>),
    Not(Box<Expr>),
    Binary(BinOp, Box<Expr>, Box<Expr>),
    /// `x IS [NOT] NULL` / `x IS [NOT] UNDEFINED`.
    Is {
        expr: Box<Expr>,
        undefined: bool,
        negated: bool,
    },
    In(Box<Expr>, Box<Expr>),
    Case {
        operand: Option<Box<Expr>>,
        whens: Vec<(Expr, Expr)>,
        otherwise: Option<Box<Expr>>,
    },
    Call(Function, Vec<Expr>),
    /// An aggregate over a window's messages (`count(*)` has no argument).
    Aggregate(Aggregate, Option<Box<Expr>>),
    Cast(Box<Expr>, CastType),
    Array(Vec<Expr>),
    Object(Vec<(String, Expr)>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinOp {
    Or,
    And,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Add,
    Sub,
    Mul,
    Div,
    Mod,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aggregate {
    Count,
    Sum,
    Avg,
    Min,
    Max,
    First,
    Last,
    Stddev,
}

impl Aggregate {
    pub const NAMES: [&'static str; 8] = [
        "avg", "count", "first", "last", "max", "min", "stddev", "sum",
    ];

    fn named(name: &str) -> Option<Self> {
        Some(match name.to_ascii_lowercase().as_str() {
            "count" => Aggregate::Count,
            "sum" => Aggregate::Sum,
            "avg" => Aggregate::Avg,
            "min" => Aggregate::Min,
            "max" => Aggregate::Max,
            "first" => Aggregate::First,
            "last" => Aggregate::Last,
            "stddev" => Aggregate::Stddev,
            _ => return None,
        })
    }
}

/// `GROUP BY key, ..., STEP(ROWTIME BY INTERVAL 'n' SECOND)`: a tumbling window of `window_ms`
/// over arrival time (Kinesis Data Analytics' syntax), per distinct key.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupBy {
    pub keys: Vec<Expr>,
    pub window_ms: i64,
    /// Byte offset of `GROUP`, for errors about the grouping.
    pub at: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CastType {
    Int,
    Decimal,
    Boolean,
    String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    /// `*`: every field of the payload.
    Star,
    /// An expression and the key it is written under (its `AS` name, nested when dotted).
    Expr { expr: Expr, name: Vec<String> },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Projection {
    /// `SELECT VALUE expr`: the payload is the value itself, not an object.
    Value(Expr),
    Items(Vec<Item>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Statement {
    pub projection: Projection,
    pub from: String,
    /// Byte offset of the `FROM` string, for errors about the filter.
    pub from_at: usize,
    pub filter: Option<Expr>,
    pub group_by: Option<GroupBy>,
}

pub fn parse(sql: &str) -> Result<Statement, SqlError> {
    let tokens = tokenize(sql)?;
    let mut p = Parser {
        sql,
        tokens,
        pos: 0,
        depth: 0,
    };
    let s = p.statement()?;
    Ok(s)
}

/// How deep expressions may nest, so that a hostile config cannot overflow the stack.
const MAX_DEPTH: usize = 64;

struct Parser<'s> {
    sql: &'s str,
    tokens: Vec<Token>,
    pos: usize,
    depth: usize,
}

impl Parser<'_> {
    /// The current token; past the end, the `End` token.
    fn current(&self) -> &Token {
        &self.tokens[self.pos.min(self.tokens.len() - 1)]
    }
    fn peek(&self) -> &Tok {
        &self.current().tok
    }
    fn at(&self) -> usize {
        self.current().at
    }
    /// Takes the current token; `self.pos -= 1` gives it back.
    fn next(&mut self) -> Token {
        let t = self.current().clone();
        self.pos += 1;
        t
    }
    fn is_kw(&self, kw: &str) -> bool {
        matches!(self.peek(), Tok::Ident(s) if s.eq_ignore_ascii_case(kw))
    }
    fn eat_kw(&mut self, kw: &str) -> bool {
        let yes = self.is_kw(kw);
        if yes {
            self.next();
        }
        yes
    }
    fn expect_kw(&mut self, kw: &str) -> Result<(), SqlError> {
        if self.eat_kw(kw) {
            Ok(())
        } else {
            Err(self.unexpected(&format!("expected {kw}")))
        }
    }
    fn is_sym(&self, sym: &str) -> bool {
        matches!(self.peek(), Tok::Sym(s) if *s == sym)
    }
    fn eat_sym(&mut self, sym: &str) -> bool {
        let yes = self.is_sym(sym);
        if yes {
            self.next();
        }
        yes
    }
    fn expect_sym(&mut self, sym: &str) -> Result<(), SqlError> {
        if self.eat_sym(sym) {
            Ok(())
        } else {
            Err(self.unexpected(&format!("expected \"{sym}\"")))
        }
    }
    fn unexpected(&self, what: &str) -> SqlError {
        let found = match self.peek() {
            Tok::End => "the end".to_string(),
            Tok::Ident(s) | Tok::Number(s) => format!("\"{s}\""),
            Tok::Str(s) => format!("the string '{s}'"),
            Tok::Sym(s) => format!("\"{s}\""),
        };
        SqlError::at(self.at(), format!("{what}, found {found}"))
    }

    fn statement(&mut self) -> Result<Statement, SqlError> {
        self.expect_kw("SELECT")?;
        let projection = if self.eat_kw("VALUE") {
            Projection::Value(self.expr()?)
        } else {
            let mut items = vec![self.item()?];
            while self.eat_sym(",") {
                items.push(self.item()?);
            }
            Projection::Items(items)
        };
        self.expect_kw("FROM")?;
        let from_at = self.at();
        let from = match self.next().tok {
            Tok::Str(s) => s,
            _ => {
                self.pos -= 1;
                return Err(self.unexpected("expected a quoted topic filter after FROM"));
            }
        };
        let filter = if self.eat_kw("WHERE") {
            Some(self.expr()?)
        } else {
            None
        };
        let group_by = if self.is_kw("GROUP") {
            Some(self.group_by()?)
        } else {
            None
        };
        if *self.peek() != Tok::End {
            return Err(self.unexpected("expected the end of the statement"));
        }
        Ok(Statement {
            projection,
            from,
            from_at,
            filter,
            group_by,
        })
    }

    fn group_by(&mut self) -> Result<GroupBy, SqlError> {
        let at = self.at();
        self.expect_kw("GROUP")?;
        self.expect_kw("BY")?;
        let mut keys = Vec::new();
        let mut window_ms = None;
        loop {
            if self.is_kw("STEP") {
                let step_at = self.at();
                self.next();
                if window_ms.is_some() {
                    return Err(SqlError::at(step_at, "only one STEP window per rule"));
                }
                self.expect_sym("(")?;
                self.expect_kw("ROWTIME")?;
                self.expect_kw("BY")?;
                self.expect_kw("INTERVAL")?;
                let n_at = self.at();
                let n = match self.next().tok {
                    Tok::Str(n) | Tok::Number(n) => n,
                    _ => {
                        self.pos -= 1;
                        return Err(self.unexpected("expected the interval, as in '60'"));
                    }
                };
                let n: i64 = n.trim().parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                    SqlError::at(n_at, format!("'{n}' is not a whole number above 0"))
                })?;
                let unit_at = self.at();
                let unit = self.name()?;
                let unit_ms = match unit.to_ascii_uppercase().trim_end_matches('S') {
                    "SECOND" => 1_000,
                    "MINUTE" => 60_000,
                    "HOUR" => 3_600_000,
                    "DAY" => 86_400_000,
                    _ => {
                        return Err(SqlError::at(
                            unit_at,
                            format!("unknown unit {unit}: SECOND, MINUTE, HOUR or DAY"),
                        ));
                    }
                };
                let ms = n
                    .checked_mul(unit_ms)
                    .filter(|ms| *ms <= 7 * 86_400_000)
                    .ok_or_else(|| SqlError::at(n_at, "a window is at most 7 days long"))?;
                self.expect_sym(")")?;
                window_ms = Some(ms);
            } else {
                keys.push(self.expr()?);
            }
            if !self.eat_sym(",") {
                break;
            }
        }
        let window_ms = window_ms.ok_or_else(|| {
            SqlError::at(
                at,
                "GROUP BY needs a window: STEP(ROWTIME BY INTERVAL '60' SECOND)",
            )
        })?;
        Ok(GroupBy {
            keys,
            window_ms,
            at,
        })
    }

    fn item(&mut self) -> Result<Item, SqlError> {
        if self.eat_sym("*") {
            return Ok(Item::Star);
        }
        let start = self.at();
        let expr = self.expr()?;
        let end = self.at();
        let name = if self.eat_kw("AS") {
            let mut name = vec![self.name()?];
            while self.eat_sym(".") {
                name.push(self.name()?);
            }
            name
        } else {
            vec![match &expr {
                Expr::Field(n) | Expr::Member(_, n) => n.clone(),
                // IoT Core names other expressions by themselves; so do we, by their text.
                _ => self.sql[start..end].trim().to_string(),
            }]
        };
        Ok(Item::Expr { expr, name })
    }

    fn name(&mut self) -> Result<String, SqlError> {
        match self.next().tok {
            Tok::Ident(s) | Tok::Str(s) => Ok(s),
            _ => {
                self.pos -= 1;
                Err(self.unexpected("expected a name"))
            }
        }
    }

    fn expr(&mut self) -> Result<Expr, SqlError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(SqlError::at(
                self.at(),
                format!("expressions nest deeper than {MAX_DEPTH}"),
            ));
        }
        let e = self.or();
        self.depth -= 1;
        e
    }

    fn or(&mut self) -> Result<Expr, SqlError> {
        let mut l = self.and()?;
        while self.eat_kw("OR") {
            l = Expr::Binary(BinOp::Or, Box::new(l), Box::new(self.and()?));
        }
        Ok(l)
    }

    fn and(&mut self) -> Result<Expr, SqlError> {
        let mut l = self.not()?;
        while self.eat_kw("AND") {
            l = Expr::Binary(BinOp::And, Box::new(l), Box::new(self.not()?));
        }
        Ok(l)
    }

    fn not(&mut self) -> Result<Expr, SqlError> {
        if self.eat_kw("NOT") {
            self.depth += 1;
            if self.depth > MAX_DEPTH {
                return Err(SqlError::at(self.at(), "NOT nests too deep"));
            }
            let e = self.not();
            self.depth -= 1;
            return Ok(Expr::Not(Box::new(e?)));
        }
        self.comparison()
    }

    fn comparison(&mut self) -> Result<Expr, SqlError> {
        let l = self.additive()?;
        if self.eat_kw("IS") {
            let negated = self.eat_kw("NOT");
            let undefined = if self.eat_kw("NULL") {
                false
            } else if self.eat_kw("UNDEFINED") {
                true
            } else {
                return Err(self.unexpected("expected NULL or UNDEFINED after IS"));
            };
            return Ok(Expr::Is {
                expr: Box::new(l),
                undefined,
                negated,
            });
        }
        if self.eat_kw("IN") {
            return Ok(Expr::In(Box::new(l), Box::new(self.additive()?)));
        }
        let op = match self.peek() {
            Tok::Sym("=") => BinOp::Eq,
            Tok::Sym("<>") | Tok::Sym("!=") => BinOp::Ne,
            Tok::Sym("<") => BinOp::Lt,
            Tok::Sym("<=") => BinOp::Le,
            Tok::Sym(">") => BinOp::Gt,
            Tok::Sym(">=") => BinOp::Ge,
            _ => return Ok(l),
        };
        self.next();
        Ok(Expr::Binary(op, Box::new(l), Box::new(self.additive()?)))
    }

    fn additive(&mut self) -> Result<Expr, SqlError> {
        let mut l = self.multiplicative()?;
        loop {
            let op = match self.peek() {
                Tok::Sym("+") => BinOp::Add,
                Tok::Sym("-") => BinOp::Sub,
                Tok::Sym("||") => {
                    self.next();
                    let r = self.multiplicative()?;
                    l = Expr::Call(Function::Concat, vec![l, r]);
                    continue;
                }
                _ => return Ok(l),
            };
            self.next();
            l = Expr::Binary(op, Box::new(l), Box::new(self.multiplicative()?));
        }
    }

    fn multiplicative(&mut self) -> Result<Expr, SqlError> {
        let mut l = self.unary()?;
        loop {
            let op = match self.peek() {
                Tok::Sym("*") => BinOp::Mul,
                Tok::Sym("/") => BinOp::Div,
                Tok::Sym("%") => BinOp::Mod,
                _ => return Ok(l),
            };
            self.next();
            l = Expr::Binary(op, Box::new(l), Box::new(self.unary()?));
        }
    }

    fn unary(&mut self) -> Result<Expr, SqlError> {
        if self.eat_sym("-") {
            self.depth += 1;
            if self.depth > MAX_DEPTH {
                return Err(SqlError::at(self.at(), "\"-\" nests too deep"));
            }
            let e = self.unary();
            self.depth -= 1;
            return Ok(match e? {
                Expr::Literal(Value::Int(i)) => Expr::Literal(Value::Int(-i)),
                Expr::Literal(Value::Decimal(d)) => Expr::Literal(Value::Decimal(-d)),
                e => Expr::Neg(Box::new(e)),
            });
        }
        self.postfix()
    }

    fn postfix(&mut self) -> Result<Expr, SqlError> {
        let mut e = self.primary()?;
        loop {
            if self.eat_sym(".") {
                e = Expr::Member(Box::new(e), self.name()?);
            } else if self.eat_sym("[") {
                let index = self.expr()?;
                self.expect_sym("]")?;
                e = Expr::Index(Box::new(e), Box::new(index));
            } else {
                return Ok(e);
            }
        }
    }

    fn primary(&mut self) -> Result<Expr, SqlError> {
        let at = self.at();
        let t = self.next();
        Ok(match t.tok {
            Tok::Number(n) => Expr::Literal(if n.contains(['.', 'e', 'E']) {
                Value::number(
                    n.parse()
                        .map_err(|_| SqlError::at(at, format!("{n} is not a number")))?,
                )
            } else {
                match n.parse::<i64>() {
                    Ok(i) => Value::Int(i),
                    Err(_) => Value::Decimal(
                        n.parse()
                            .map_err(|_| SqlError::at(at, format!("{n} is not a number")))?,
                    ),
                }
            }),
            Tok::Str(s) => Expr::Literal(Value::Str(s.into())),
            Tok::Sym("(") => {
                let e = self.expr()?;
                self.expect_sym(")")?;
                e
            }
            Tok::Sym("[") => {
                let mut items = Vec::new();
                if !self.eat_sym("]") {
                    loop {
                        items.push(self.expr()?);
                        if self.eat_sym("]") {
                            break;
                        }
                        self.expect_sym(",")?;
                    }
                }
                Expr::Array(items)
            }
            Tok::Sym("{") => {
                let mut fields = Vec::new();
                if !self.eat_sym("}") {
                    loop {
                        let key = self.name()?;
                        self.expect_sym(":")?;
                        fields.push((key, self.expr()?));
                        if self.eat_sym("}") {
                            break;
                        }
                        self.expect_sym(",")?;
                    }
                }
                Expr::Object(fields)
            }
            Tok::Ident(word) => {
                let kw = word.to_ascii_uppercase();
                match kw.as_str() {
                    "TRUE" => Expr::Literal(Value::Bool(true)),
                    "FALSE" => Expr::Literal(Value::Bool(false)),
                    "NULL" => Expr::Literal(Value::Null),
                    "CASE" => self.case()?,
                    "SELECT" | "FROM" | "WHERE" | "AS" | "AND" | "OR" | "IS" | "IN" | "WHEN"
                    | "THEN" | "ELSE" | "END" => {
                        self.pos -= 1;
                        return Err(self.unexpected("expected an expression"));
                    }
                    _ if self.is_sym("(") => {
                        self.next();
                        self.call(&word, at)?
                    }
                    _ => Expr::Field(word),
                }
            }
            _ => {
                self.pos -= 1;
                return Err(self.unexpected("expected an expression"));
            }
        })
    }

    fn case(&mut self) -> Result<Expr, SqlError> {
        let operand = if self.is_kw("WHEN") {
            None
        } else {
            Some(Box::new(self.expr()?))
        };
        let mut whens = Vec::new();
        while self.eat_kw("WHEN") {
            let w = self.expr()?;
            self.expect_kw("THEN")?;
            whens.push((w, self.expr()?));
        }
        if whens.is_empty() {
            return Err(self.unexpected("expected WHEN"));
        }
        let otherwise = if self.eat_kw("ELSE") {
            Some(Box::new(self.expr()?))
        } else {
            None
        };
        self.expect_kw("END")?;
        Ok(Expr::Case {
            operand,
            whens,
            otherwise,
        })
    }

    fn call(&mut self, name: &str, at: usize) -> Result<Expr, SqlError> {
        if name.eq_ignore_ascii_case("cast") {
            let e = self.expr()?;
            self.expect_kw("AS")?;
            let ty_at = self.at();
            let ty = self.name()?;
            let ty = match ty.to_ascii_lowercase().as_str() {
                "int" => CastType::Int,
                "decimal" => CastType::Decimal,
                "boolean" | "bool" => CastType::Boolean,
                "string" => CastType::String,
                _ => {
                    return Err(SqlError::at(
                        ty_at,
                        format!("cannot cast to {ty}: Int, Decimal, Boolean or String"),
                    ));
                }
            };
            self.expect_sym(")")?;
            return Ok(Expr::Cast(Box::new(e), ty));
        }
        if let Some(agg) = Aggregate::named(name) {
            let arg = if agg == Aggregate::Count && self.eat_sym("*") {
                None
            } else {
                Some(Box::new(self.expr()?))
            };
            self.expect_sym(")")?;
            return Ok(Expr::Aggregate(agg, arg));
        }
        let f = Function::named(name).ok_or_else(|| {
            SqlError::at(
                at,
                format!(
                    "unknown function {name}(); supported: {}, and the aggregates {}",
                    Function::NAMES.join(", "),
                    Aggregate::NAMES.join(", ")
                ),
            )
        })?;
        let mut args = Vec::new();
        if !self.eat_sym(")") {
            loop {
                args.push(self.expr()?);
                if self.eat_sym(")") {
                    break;
                }
                self.expect_sym(",")?;
            }
        }
        let (min, max) = f.arity();
        if args.len() < min || args.len() > max {
            let want = if min == max {
                format!("{min}")
            } else if max == usize::MAX {
                format!("at least {min}")
            } else {
                format!("{min} to {max}")
            };
            return Err(SqlError::at(
                at,
                format!("{name}() takes {want} argument(s), given {}", args.len()),
            ));
        }
        Ok(Expr::Call(f, args))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_parse_into_trees() {
        let s = parse("select a.b.c, t * 2 AS x.y, * FROM 'sensors/+/data' where NOT a IS NULL")
            .unwrap();
        assert_eq!(s.from, "sensors/+/data");
        let Projection::Items(items) = &s.projection else {
            panic!()
        };
        assert_eq!(
            items[0],
            Item::Expr {
                expr: Expr::Member(
                    Box::new(Expr::Member(Box::new(Expr::Field("a".into())), "b".into())),
                    "c".into()
                ),
                name: vec!["c".into()],
            }
        );
        assert!(matches!(&items[1], Item::Expr { name, .. } if name == &["x", "y"]));
        assert_eq!(items[2], Item::Star);
        assert!(matches!(s.filter, Some(Expr::Not(_))));
        // Precedence: * before +, + before =, = before AND, AND before OR.
        let s = parse("SELECT VALUE 1 + 2 * 3 = 7 OR false AND true FROM 'a'").unwrap();
        let Projection::Value(Expr::Binary(BinOp::Or, l, _)) = s.projection else {
            panic!()
        };
        let Expr::Binary(BinOp::Eq, sum, _) = *l else {
            panic!()
        };
        assert!(matches!(*sum, Expr::Binary(BinOp::Add, _, _)));
        // Unnamed expressions are named by their text.
        let s = parse("SELECT topic(2), abs(x)  FROM 'a'").unwrap();
        let Projection::Items(items) = s.projection else {
            panic!()
        };
        assert!(matches!(&items[0], Item::Expr { name, .. } if name == &["topic(2)"]));
        assert!(matches!(&items[1], Item::Expr { name, .. } if name == &["abs(x)"]));
    }

    #[test]
    fn errors_say_where_and_what() {
        let e = |sql: &str| parse(sql).unwrap_err();
        assert_eq!(e("SELECT FROM 'a'").position, 7);
        assert!(e("SELECT FROM 'a'")
            .message
            .contains("expected an expression"));
        assert_eq!(e("SELECT a FROM b").position, 14);
        assert!(e("SELECT a FROM 'x' WHERE").message.contains("the end"));
        let err = e("SELECT nosuch(a) FROM 'x'");
        assert_eq!(err.position, 7);
        assert!(err.message.contains("unknown function nosuch()"), "{err}");
        assert!(e("SELECT abs(a, b) FROM 'x'").message.contains("takes 1"));
        assert!(e("SELECT cast(a AS Date) FROM 'x'")
            .message
            .contains("cannot cast"));
        assert!(e("SELECT a FROM 'x' GROUP BY a")
            .message
            .contains("GROUP BY"));
        assert!(e("SELECT a FROM 'x' y")
            .message
            .contains("end of the statement"));
        let deep = format!("SELECT {}1{} FROM 'x'", "(".repeat(100), ")".repeat(100));
        assert!(e(&deep).message.contains("nest"));
        let deep = format!("SELECT {}1 FROM 'x'", "NOT ".repeat(1000));
        assert!(e(&deep).message.contains("nest"));
        let deep = format!("SELECT {}1 FROM 'x'", "-".repeat(1000));
        assert!(e(&deep).message.contains("nest"));
    }
}
