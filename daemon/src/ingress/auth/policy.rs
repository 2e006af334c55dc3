//! IoT Core policy documents, evaluated as IoT Core evaluates them: the JSON (`Version`,
//! `Statement` with `Effect`, `Action`, `Resource`), the actions `iot:Connect`, `iot:Publish`,
//! `iot:RetainPublish`, `iot:Subscribe` and `iot:Receive` (and `iot:*`, `*`), resources
//! `client/<client id>`, `topic/<topic>` and `topicfilter/<filter>`, the wildcards `*` (any
//! characters) and `?` (one), MQTT's `+` and `#` taken literally, the policy variables
//! `${iot:ClientId}`, `${iot:Connection.Thing.ThingName}` and
//! `${iot:Certificate.Subject.CommonName}` and the escapes `$(*)`, `$(?)`, `$($)`. An explicit
//! Deny wins; without an Allow the answer is Deny.
//!
//! The gateway is one account in one region: an ARN's region and account are not compared.
//! What the gateway cannot honour is refused when the document is loaded, never ignored:
//! `Condition`, `NotAction`, `NotResource`, unknown variables.

use std::borrow::Cow;
use std::fmt;

use serde_json::Value;

/// What a device asks to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Connect,
    Publish,
    RetainPublish,
    Subscribe,
    Receive,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Connect => "iot:Connect",
            Action::Publish => "iot:Publish",
            Action::RetainPublish => "iot:RetainPublish",
            Action::Subscribe => "iot:Subscribe",
            Action::Receive => "iot:Receive",
        }
    }

    /// The resource type the action's ARN names.
    fn resource_type(self) -> &'static str {
        match self {
            Action::Connect => "client",
            Action::Publish | Action::RetainPublish | Action::Receive => "topic",
            Action::Subscribe => "topicfilter",
        }
    }

    pub const ALL: [Action; 5] = [
        Action::Connect,
        Action::Publish,
        Action::RetainPublish,
        Action::Subscribe,
        Action::Receive,
    ];
}

/// Who is asking: the values of the policy variables.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Principal {
    pub client_id: String,
    /// `${iot:Connection.Thing.ThingName}`: from the certificate (or the username).
    pub thing_name: Option<String>,
    /// `${iot:Certificate.Subject.CommonName}`.
    pub common_name: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variable {
    ClientId,
    ThingName,
    CommonName,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Literal(char),
    Star,
    Question,
    Var(Variable),
}

/// A resource pattern: its type (`topic`, ...; None for `*`) and the pattern after `type/`.
#[derive(Debug, Clone)]
struct Resource {
    kind: Option<String>,
    pattern: Vec<Token>,
    text: String,
}

#[derive(Debug, Clone)]
struct Statement {
    sid: Option<String>,
    effect: Effect,
    actions: Vec<Action>,
    resources: Vec<Resource>,
}

/// One policy document, checked.
#[derive(Debug, Clone)]
pub struct Policy {
    pub name: String,
    statements: Vec<Statement>,
}

/// Why a request was answered as it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// "policy NAME, statement SID/INDEX, resource R" or "no statement allows it".
    pub reason: Cow<'static, str>,
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.allowed { "ALLOW" } else { "DENY" };
        write!(f, "{verdict} ({})", self.reason)
    }
}

/// Reads a string or an array of strings.
fn strings(v: &Value, what: &str) -> Result<Vec<String>, String> {
    match v {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(a) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("{what}: every entry must be a string"))
            })
            .collect(),
        _ => Err(format!("{what} must be a string or an array of strings")),
    }
}

/// Glob match of an IAM-style action pattern, case-insensitive.
fn action_matches(pattern: &str, action: &str) -> bool {
    let p: Vec<Token> = pattern
        .chars()
        .map(|c| match c {
            '*' => Token::Star,
            '?' => Token::Question,
            c => Token::Literal(c.to_ascii_lowercase()),
        })
        .collect();
    glob(&p, &action.to_ascii_lowercase(), &Principal::default()).unwrap_or(false)
}

fn parse_pattern(text: &str) -> Result<Vec<Token>, String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if let Some(r) = rest.strip_prefix("${") {
            let end = r
                .find('}')
                .ok_or_else(|| format!("unterminated policy variable in {text:?}"))?;
            let var = match &r[..end] {
                "iot:ClientId" => Variable::ClientId,
                "iot:Connection.Thing.ThingName" => Variable::ThingName,
                "iot:Certificate.Subject.CommonName" => Variable::CommonName,
                other => {
                    return Err(format!(
                        "policy variable ${{{other}}} is not supported here (supported: \
                         iot:ClientId, iot:Connection.Thing.ThingName, \
                         iot:Certificate.Subject.CommonName)"
                    ))
                }
            };
            out.push(Token::Var(var));
            rest = &r[end + 1..];
        } else if let Some(r) = rest.strip_prefix("$(*)") {
            out.push(Token::Literal('*'));
            rest = r;
        } else if let Some(r) = rest.strip_prefix("$(?)") {
            out.push(Token::Literal('?'));
            rest = r;
        } else if let Some(r) = rest.strip_prefix("$($)") {
            out.push(Token::Literal('$'));
            rest = r;
        } else {
            out.push(match c {
                '*' => Token::Star,
                '?' => Token::Question,
                c => Token::Literal(c),
            });
            rest = &rest[c.len_utf8()..];
        }
    }
    Ok(out)
}

fn parse_resource(text: &str) -> Result<Resource, String> {
    if text == "*" {
        return Ok(Resource {
            kind: None,
            pattern: vec![Token::Star],
            text: text.into(),
        });
    }
    // arn:PARTITION:iot:REGION:ACCOUNT:TYPE/PATTERN
    let parts: Vec<&str> = text.splitn(6, ':').collect();
    let [arn, _partition, service, _region, _account, rest] = parts.as_slice() else {
        return Err(format!(
            "resource {text:?} is not an ARN (arn:aws:iot:REGION:ACCOUNT:topic/...) or \"*\""
        ));
    };
    if *arn != "arn" || !(*service == "iot" || *service == "*") {
        return Err(format!("resource {text:?} is not an AWS IoT ARN"));
    }
    let (kind, pattern) = match rest.split_once('/') {
        Some((k, p)) => (k, p),
        None if *rest == "*" => ("*", "*"),
        None => {
            return Err(format!(
                "resource {text:?}: expected TYPE/NAME after the account"
            ))
        }
    };
    let kind = match kind {
        "*" => None,
        "client" | "topic" | "topicfilter" => Some(kind.to_string()),
        // Thing shadows, jobs and the like are IoT Core services the gateway does not offer:
        // such a statement can match nothing here, which is what IoT Core would do for MQTT.
        "thing" | "thinggroup" | "cert" | "rolealias" | "job" | "jobtemplate" => {
            Some(kind.to_string())
        }
        other => {
            return Err(format!(
                "resource {text:?}: unknown resource type {other:?}"
            ))
        }
    };
    Ok(Resource {
        kind,
        pattern: parse_pattern(pattern)?,
        text: text.into(),
    })
}

impl Policy {
    /// Parses and checks a policy document; errors say which statement and what is wrong.
    pub fn parse(name: &str, json: &str) -> Result<Self, String> {
        let doc: Value = serde_json::from_str(json).map_err(|e| format!("not JSON: {e}"))?;
        let obj = doc
            .as_object()
            .ok_or("a policy document is a JSON object")?;
        for key in obj.keys() {
            if !matches!(key.as_str(), "Version" | "Statement" | "Id") {
                return Err(format!("unknown top-level key {key:?}"));
            }
        }
        if let Some(v) = obj.get("Version") {
            if v.as_str() != Some("2012-10-17") {
                return Err(format!("Version must be \"2012-10-17\", not {v}"));
            }
        }
        let statements = match obj.get("Statement") {
            Some(Value::Array(a)) => a.clone(),
            Some(o @ Value::Object(_)) => vec![o.clone()],
            _ => return Err("Statement must be an object or an array of objects".into()),
        };
        let mut out = Vec::new();
        for (i, s) in statements.iter().enumerate() {
            let at = |e: String| format!("Statement[{i}]: {e}");
            let s = s
                .as_object()
                .ok_or_else(|| at("must be an object".into()))?;
            for key in s.keys() {
                match key.as_str() {
                    "Sid" | "Effect" | "Action" | "Resource" => {}
                    "Condition" | "NotAction" | "NotResource" | "Principal" | "NotPrincipal" => {
                        return Err(at(format!(
                            "{key} is not supported by the gateway (a policy it cannot honour \
                             exactly is refused rather than applied loosely)"
                        )))
                    }
                    other => return Err(at(format!("unknown key {other:?}"))),
                }
            }
            let effect = match s.get("Effect").and_then(Value::as_str) {
                Some("Allow") => Effect::Allow,
                Some("Deny") => Effect::Deny,
                _ => return Err(at("Effect must be \"Allow\" or \"Deny\"".into())),
            };
            let action_patterns = strings(
                s.get("Action")
                    .ok_or_else(|| at("Action is missing".into()))?,
                "Action",
            )
            .map_err(at)?;
            let mut actions = Vec::new();
            for p in &action_patterns {
                let matched: Vec<Action> = Action::ALL
                    .into_iter()
                    .filter(|a| action_matches(p, a.name()))
                    .collect();
                if matched.is_empty() && !p.to_ascii_lowercase().starts_with("iot:") {
                    return Err(at(format!("action {p:?} is not an AWS IoT action")));
                }
                // Other iot: actions (shadows, jobs...) match nothing the gateway does.
                actions.extend(matched);
            }
            actions.sort_by_key(|a| *a as u8);
            actions.dedup();
            let resources = strings(
                s.get("Resource")
                    .ok_or_else(|| at("Resource is missing".into()))?,
                "Resource",
            )
            .map_err(at)?
            .iter()
            .map(|r| parse_resource(r))
            .collect::<Result<Vec<_>, _>>()
            .map_err(at)?;
            out.push(Statement {
                sid: s.get("Sid").and_then(Value::as_str).map(str::to_string),
                effect,
                actions,
                resources,
            });
        }
        Ok(Self {
            name: name.to_string(),
            statements: out,
        })
    }
}

/// Matches `text` against a pattern, variables resolved from `who`. None when a variable has
/// no value (such a resource matches nothing, as in IoT Core).
fn glob(pattern: &[Token], text: &str, who: &Principal) -> Option<bool> {
    // Resolve variables into literals first (their values are never wildcards).
    let mut resolved: Vec<&Token> = Vec::with_capacity(pattern.len());
    let mut owned = Vec::new();
    for t in pattern {
        if let Token::Var(v) = t {
            let value = match v {
                Variable::ClientId => Some(who.client_id.as_str()),
                Variable::ThingName => who.thing_name.as_deref(),
                Variable::CommonName => who.common_name.as_deref(),
            }?;
            owned.push(value.chars().map(Token::Literal).collect::<Vec<_>>());
        }
    }
    let mut values = owned.iter();
    for t in pattern {
        match t {
            Token::Var(_) => resolved.extend(values.next().expect("resolved above").iter()),
            t => resolved.push(t),
        }
    }
    let text: Vec<char> = text.chars().collect();
    // Iterative wildcard match with backtracking to the last star.
    let (mut p, mut s) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while s < text.len() {
        match resolved.get(p) {
            Some(Token::Star) => {
                star = Some((p, s));
                p += 1;
            }
            Some(Token::Question) => {
                p += 1;
                s += 1;
            }
            Some(Token::Literal(c)) if *c == text[s] => {
                p += 1;
                s += 1;
            }
            _ => match star {
                Some((sp, ss)) => {
                    p = sp + 1;
                    s = ss + 1;
                    star = Some((sp, ss + 1));
                }
                None => return Some(false),
            },
        }
    }
    while let Some(Token::Star) = resolved.get(p) {
        p += 1;
    }
    Some(p == resolved.len())
}

/// Evaluates `action` on `name` (a client id, topic or topic filter) for `who` under
/// `policies`: an explicit Deny wins, then any Allow, else Deny.
pub fn evaluate<'a>(
    policies: impl IntoIterator<Item = &'a Policy>,
    who: &Principal,
    action: Action,
    name: &str,
) -> Decision {
    let mut allow = None;
    for policy in policies {
        for (i, s) in policy.statements.iter().enumerate() {
            if !s.actions.contains(&action) {
                continue;
            }
            for r in &s.resources {
                let kind_ok = r
                    .kind
                    .as_deref()
                    .is_none_or(|k| k == action.resource_type());
                let hit = kind_ok && glob(&r.pattern, name, who) == Some(true);
                if !hit {
                    continue;
                }
                let why = format!(
                    "policy {:?}, statement {}, resource {:?}",
                    policy.name,
                    s.sid.clone().unwrap_or_else(|| i.to_string()),
                    r.text
                );
                match s.effect {
                    Effect::Deny => {
                        return Decision {
                            allowed: false,
                            reason: format!("explicit Deny: {why}").into(),
                        }
                    }
                    Effect::Allow => {
                        allow.get_or_insert(why);
                    }
                }
            }
        }
    }
    match allow {
        Some(why) => Decision {
            allowed: true,
            reason: why.into(),
        },
        None => Decision {
            allowed: false,
            reason: "no statement allows it".into(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(client: &str) -> Principal {
        Principal {
            client_id: client.into(),
            thing_name: Some(client.into()),
            common_name: Some(client.into()),
        }
    }

    /// The policy IoT Core's documentation gives for devices that publish and subscribe under
    /// their own client id.
    const DEVICE: &str = r#"{
      "Version": "2012-10-17",
      "Statement": [
        {"Effect": "Allow", "Action": "iot:Connect",
         "Resource": "arn:aws:iot:us-east-1:123456789012:client/${iot:Connection.Thing.ThingName}"},
        {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"],
         "Resource": "arn:aws:iot:us-east-1:123456789012:topic/sensors/${iot:ClientId}/*"},
        {"Effect": "Allow", "Action": "iot:Subscribe",
         "Resource": "arn:aws:iot:us-east-1:123456789012:topicfilter/sensors/${iot:ClientId}/*"},
        {"Sid": "NoSecrets", "Effect": "Deny", "Action": "iot:*",
         "Resource": "arn:aws:iot:us-east-1:123456789012:topic/sensors/*/secret"}
      ]
    }"#;

    fn allowed(p: &Policy, w: &Principal, a: Action, name: &str) -> bool {
        evaluate([p], w, a, name).allowed
    }

    #[test]
    fn a_device_stays_under_its_own_topics() {
        let p = Policy::parse("device", DEVICE).unwrap();
        let a = who("dev-a");
        assert!(allowed(&p, &a, Action::Connect, "dev-a"));
        assert!(!allowed(&p, &a, Action::Connect, "dev-b"));
        assert!(allowed(&p, &a, Action::Publish, "sensors/dev-a/temp"));
        assert!(allowed(&p, &a, Action::Publish, "sensors/dev-a/x/y"));
        assert!(!allowed(&p, &a, Action::Publish, "sensors/dev-b/temp"));
        assert!(!allowed(&p, &a, Action::Publish, "sensors/dev-a"));
        // Retained publishes need iot:RetainPublish as well.
        assert!(!allowed(
            &p,
            &a,
            Action::RetainPublish,
            "sensors/dev-a/temp"
        ));
        // + and # are literal in policies: `#` is not under sensors/dev-a/.
        assert!(!allowed(&p, &a, Action::Subscribe, "#"));
        assert!(!allowed(&p, &a, Action::Subscribe, "sensors/+/temp"));
        assert!(allowed(&p, &a, Action::Subscribe, "sensors/dev-a/#"));
        assert!(allowed(&p, &a, Action::Receive, "sensors/dev-a/temp"));
        assert!(!allowed(&p, &a, Action::Receive, "sensors/dev-b/temp"));
        // The explicit Deny wins over the Allow.
        let d = evaluate([&p], &a, Action::Publish, "sensors/dev-a/secret");
        assert!(!d.allowed);
        assert!(
            d.reason.contains("explicit Deny") && d.reason.contains("NoSecrets"),
            "{d}"
        );
    }

    #[test]
    fn variable_values_are_literal_and_missing_ones_match_nothing() {
        let p = Policy::parse("device", DEVICE).unwrap();
        // A client id holding `*` does not become a wildcard.
        let star = who("*");
        assert!(allowed(&p, &star, Action::Publish, "sensors/*/t"));
        assert!(!allowed(&p, &star, Action::Publish, "sensors/dev-a/t"));
        // No thing name (no certificate, no username): the Connect statement matches nothing.
        let anon = Principal {
            client_id: "dev-a".into(),
            ..Default::default()
        };
        assert!(!allowed(&p, &anon, Action::Connect, "dev-a"));
        assert!(allowed(&p, &anon, Action::Publish, "sensors/dev-a/t"));
    }

    #[test]
    fn wildcards_escapes_and_action_patterns() {
        let p = Policy::parse(
            "p",
            r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"iot:Pub*",
                "Resource":["arn:aws:iot:*:*:topic/a?c/$(*)","arn:aws:iot:*:*:topic/x/*/z"]}}"#,
        )
        .unwrap();
        let w = who("d");
        assert!(allowed(&p, &w, Action::Publish, "abc/*"));
        assert!(!allowed(&p, &w, Action::Publish, "abc/d"));
        assert!(!allowed(&p, &w, Action::Publish, "abbc/*"));
        assert!(allowed(&p, &w, Action::Publish, "x/1/2/z"));
        assert!(!allowed(&p, &w, Action::Subscribe, "x/1/z"));
        // A topic ARN does not authorise a topicfilter action.
        let all = Policy::parse(
            "all",
            r#"{"Statement":[{"Effect":"Allow","Action":"*","Resource":"arn:aws:iot:r:1:topic/*"}]}"#,
        )
        .unwrap();
        assert!(allowed(&all, &w, Action::Receive, "t"));
        assert!(!allowed(&all, &w, Action::Subscribe, "t"));
        assert!(!allowed(&all, &w, Action::Connect, "d"));
        let star = Policy::parse(
            "star",
            r#"{"Statement":[{"Effect":"Allow","Action":"iot:*","Resource":"*"}]}"#,
        )
        .unwrap();
        for a in Action::ALL {
            assert!(allowed(&star, &w, a, "anything/at/all"));
        }
        // No policy: deny.
        assert!(!evaluate([], &w, Action::Publish, "t").allowed);
    }

    #[test]
    fn what_cannot_be_honoured_is_refused_with_the_statement() {
        for (doc, says) in [
            ("[]", "JSON object"),
            (
                r#"{"Statement":[{"Effect":"Allow","Action":"iot:Publish","Resource":"*","Condition":{}}]}"#,
                "Statement[0]: Condition is not supported",
            ),
            (
                r#"{"Statement":[{"Effect":"Maybe","Action":"iot:Publish","Resource":"*"}]}"#,
                "Effect",
            ),
            (
                r#"{"Statement":[{"Effect":"Allow","Action":"s3:GetObject","Resource":"*"}]}"#,
                "not an AWS IoT action",
            ),
            (
                r#"{"Statement":[{"Effect":"Allow","Action":"iot:Publish","Resource":"topic/x"}]}"#,
                "not an ARN",
            ),
            (
                r#"{"Statement":[{"Effect":"Allow","Action":"iot:Publish","Resource":"arn:aws:iot:r:1:topic/${iot:Foo}"}]}"#,
                "${iot:Foo}",
            ),
            (
                r#"{"Statement":[{"Effect":"Allow","Action":"iot:Publish","Resource":"arn:aws:iot:r:1:bucket/x"}]}"#,
                "unknown resource type",
            ),
            (r#"{"Version":"2008-10-17","Statement":[]}"#, "Version"),
        ] {
            let e = Policy::parse("p", doc).unwrap_err();
            assert!(e.contains(says), "{doc}: {e}");
        }
    }
}
