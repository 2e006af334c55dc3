//! Rule SQL against IoT Core's documented behaviour: the examples of its SQL reference (SELECT
//! clause, JSON extensions, literals, operators, functions, data types and conversions).

use serde_json::{json, Value as Json};

use super::*;

const CTX: Context = Context {
    topic: "sensors/dev-7/telemetry",
    client_id: Some("dev-7"),
    timestamp_ms: 1_700_000_000_123,
};

/// Applies `sql` to `payload` and returns the JSON selected (None if dropped; panics on
/// failure).
fn run(sql: &str, payload: &str) -> Option<Json> {
    match apply(&Rule::parse(sql).unwrap(), payload.as_bytes()) {
        Applied::Selected(Some(out)) => Some(serde_json::from_slice(&out).unwrap()),
        Applied::Selected(None) => Some(serde_json::from_str(payload).unwrap()),
        Applied::Dropped => None,
        Applied::Failed(e) => panic!("{sql}: failed: {e}"),
    }
}

/// The rule over a payload as the router gives it (not JSON: Undefined).
fn apply(rule: &Rule, payload: &[u8]) -> Applied {
    rule.apply(&Value::parse(payload).unwrap_or(Value::Undefined), &CTX)
}

/// `SELECT VALUE expr` over `payload`.
fn value(expr: &str, payload: &str) -> Option<Json> {
    run(&format!("SELECT VALUE {expr} FROM 'sensors/#'"), payload)
}

const COLOR: &str = r#"{"color":"red", "temperature":50}"#;

#[test]
fn the_select_clause_as_documented() {
    assert_eq!(
        run("SELECT * FROM 'topic/subtopic'", COLOR),
        Some(json!({"color":"red","temperature":50}))
    );
    assert_eq!(
        run("SELECT color FROM 'topic/subtopic'", COLOR),
        Some(json!({"color":"red"}))
    );
    assert_eq!(
        run("SELECT color AS my_color FROM 'topic/subtopic'", COLOR),
        Some(json!({"my_color":"red"}))
    );
    assert_eq!(
        run(
            "SELECT color as my_color, temperature as fahrenheit FROM 'topic/subtopic'",
            COLOR
        ),
        Some(json!({"my_color":"red","fahrenheit":50}))
    );
    assert_eq!(
        run("SELECT *, 15 as speed FROM 'topic/subtopic'", COLOR),
        Some(json!({"color":"red","temperature":50,"speed":15}))
    );
    // A later item replaces a key `*` brought.
    assert_eq!(
        run("SELECT *, upper(color) AS color FROM 'a'", COLOR),
        Some(json!({"color":"RED","temperature":50}))
    );
    assert_eq!(value("color", COLOR), Some(json!("red")));
    assert_eq!(
        value("[color, temperature]", COLOR),
        Some(json!(["red", 50]))
    );
}

#[test]
fn nested_fields_and_json_extensions() {
    let foo = r#"{"foo":{"bar":"RED","bar1":"GREEN","bar2":"BLUE"}}"#;
    assert_eq!(
        run("SELECT foo.bar AS bar.baz FROM 'topic/subtopic'", foo),
        Some(json!({"bar":{"baz":"RED"}}))
    );
    assert_eq!(
        run("SELECT foo.bar FROM 'a'", foo),
        Some(json!({"bar":"RED"}))
    );
    let data = r#"{"mydata":{"item2":{"0":{"my-key":"myValue"}}}}"#;
    assert_eq!(
        run(
            r#"SELECT * FROM 'iot/rules' WHERE get(get(get(mydata,"item2"),"0"),"my-key") = "myValue""#,
            data
        ),
        Some(serde_json::from_str(data).unwrap())
    );
    let device = r#"{"deviceid":"iot123","temp":54.98,"humidity":32.43,"coords":{"latitude":47.615694,"longitude":-122.3359976}}"#;
    assert_eq!(
        run("SELECT temp, coords.latitude AS lat FROM 'topic/#'", device),
        Some(json!({"temp":54.98,"lat":47.615694}))
    );
    // Literals (SQL 2016-03-23).
    assert_eq!(
        run(
            "SELECT {'latitude': get(lat_long, 0),'longitude':get(lat_long, 1)} as lat_long FROM 'topic/subtopic'",
            r#"{"lat_long": [47.606,-122.332]}"#
        ),
        Some(json!({"lat_long":{"latitude":47.606,"longitude":-122.332}}))
    );
    assert_eq!(
        run(
            "SELECT [lat,long] as lat_long FROM 'topic/subtopic'",
            r#"{"lat": 47.696, "long": -122.332}"#
        ),
        Some(json!({"lat_long":[47.696,-122.332]}))
    );
    assert_eq!(
        value("a.b[1].c", r#"{"a":{"b":[{"c":1},{"c":2}]}}"#),
        Some(json!(2))
    );
}

#[test]
fn missing_fields_are_undefined_and_left_out() {
    assert_eq!(
        run("SELECT color, nosuch, a.b.c FROM 'a'", COLOR),
        Some(json!({"color":"red"}))
    );
    // {"foo": null}: foo is Null, bar is Undefined.
    let p = r#"{"foo":null}"#;
    assert_eq!(
        run("SELECT foo, bar FROM 'a'", p),
        Some(json!({"foo":null}))
    );
    assert_eq!(value("foo IS NULL", p), Some(json!(true)));
    assert_eq!(value("bar IS NULL", p), Some(json!(false)));
    assert_eq!(value("bar IS UNDEFINED", p), Some(json!(true)));
    assert_eq!(value("foo IS NOT UNDEFINED", p), Some(json!(true)));
    // Undefined in a comparison is Undefined, so WHERE drops the message.
    assert_eq!(run("SELECT * FROM 'a' WHERE nosuch > 1", COLOR), None);
    assert_eq!(run("SELECT * FROM 'a' WHERE NOT (nosuch > 1)", COLOR), None);
    assert_eq!(value("nosuch", COLOR), None);
    assert_eq!(value("[1, nosuch, 2]", COLOR), Some(json!([1, 2])));
}

#[test]
fn where_selects_and_drops() {
    let sql = "SELECT * FROM 'sensors/+/telemetry' WHERE temperature > 40 AND color = 'red'";
    assert!(run(sql, COLOR).is_some());
    assert!(run(sql, r#"{"color":"red","temperature":30}"#).is_none());
    assert!(run(sql, r#"{"color":"blue","temperature":50}"#).is_none());
    assert!(run(
        "SELECT * FROM 'a' WHERE temperature < 0 OR color <> 'blue'",
        COLOR
    )
    .is_some());
    assert!(run("SELECT * FROM 'a' WHERE color IN ['red', 'green']", COLOR).is_some());
    assert!(run("SELECT * FROM 'a' WHERE temperature IN [1, 2]", COLOR).is_none());
    assert!(run("SELECT * FROM 'a' WHERE 'TRUE'", COLOR).is_some());
    // A WHERE that is not a Boolean is a failure, not a silent drop.
    match apply(
        &Rule::parse("SELECT * FROM 'a' WHERE temperature").unwrap(),
        COLOR.as_bytes(),
    ) {
        Applied::Failed(e) => assert!(e.contains("WHERE gave Int 50, not a Boolean"), "{e}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn operators_convert_as_iot_core_does() {
    let p = r#"{"i":7,"d":2.5,"s":"3","t":"true","x":"abc","whole":10.0}"#;
    assert_eq!(value("i + 1", p), Some(json!(8)));
    assert_eq!(value("i / 2", p), Some(json!(3)), "Int / Int is an Int");
    assert_eq!(value("i % 4", p), Some(json!(3)));
    assert_eq!(value("i / d", p), Some(json!(2.8)));
    assert_eq!(value("i * d", p), Some(json!(17.5)));
    assert_eq!(
        value("s + 1", p),
        Some(json!(4)),
        "a numeric string is converted"
    );
    assert_eq!(
        value("x + 1", p),
        None,
        "a string that is no number: Undefined"
    );
    assert_eq!(value("i / 0", p), None, "division by zero: Undefined");
    assert_eq!(value("-i", p), Some(json!(-7)));
    assert_eq!(value("whole", p), Some(json!(10)), "10.0 is the Int 10");
    assert_eq!(value("i = 7.0", p), Some(json!(true)));
    assert_eq!(value("s = 3", p), Some(json!(true)));
    assert_eq!(value("s = '3'", p), Some(json!(true)));
    assert_eq!(value("x = 3", p), Some(json!(false)));
    assert_eq!(value("x < 'b'", p), Some(json!(true)));
    assert_eq!(value("x < 3", p), None);
    assert_eq!(
        value("t AND true", p),
        Some(json!(true)),
        "\"true\" is a Boolean to AND"
    );
    assert_eq!(value("i AND true", p), None);
    assert_eq!(value("NOT t", p), Some(json!(false)));
    assert_eq!(value("{'a': 1} = {'a': 1.0}", p), Some(json!(true)));
    assert_eq!(value("[1, 'x'] = [1, 'x']", p), Some(json!(true)));
    assert_eq!(
        value("9223372036854775807 + 1", p),
        None,
        "overflow: Undefined"
    );
}

#[test]
fn case_expressions() {
    let sql = "SELECT CASE color WHEN 'green' THEN 'go' WHEN 'red' THEN 'stop' ELSE 'caution' END AS instruction FROM 'topic/subtopic'";
    assert_eq!(run(sql, COLOR), Some(json!({"instruction":"stop"})));
    assert_eq!(
        run(sql, r#"{"color":"yellow"}"#),
        Some(json!({"instruction":"caution"}))
    );
    assert_eq!(
        value("CASE WHEN temperature > 40 THEN 'hot' ELSE 'ok' END", COLOR),
        Some(json!("hot"))
    );
    assert_eq!(value("CASE color WHEN 'blue' THEN 1 END", COLOR), None);
}

#[test]
fn functions() {
    let p = r#"{"n":-1.5,"i":-3,"s":"Hello","a":[1,2,3],"o":{"k":"v"}}"#;
    assert_eq!(value("topic()", p), Some(json!("sensors/dev-7/telemetry")));
    assert_eq!(value("topic(2)", p), Some(json!("dev-7")), "1-based");
    assert_eq!(value("topic(9)", p), None);
    assert_eq!(value("clientid()", p), Some(json!("dev-7")));
    assert_eq!(value("timestamp()", p), Some(json!(1_700_000_000_123i64)));
    let id = value("newuuid()", p).unwrap();
    let id = uuid::Uuid::parse_str(id.as_str().unwrap()).unwrap();
    assert_eq!(id.get_version_num(), 4);
    assert_ne!(value("newuuid()", p), value("newuuid()", p));
    assert_eq!(value("abs(i)", p), Some(json!(3)));
    assert_eq!(value("abs(n)", p), Some(json!(1.5)));
    assert_eq!(
        value("abs('-5.123')", p),
        Some(json!(5.123)),
        "strings are converted"
    );
    assert_eq!(value("abs(s)", p), None);
    assert_eq!(value("round(1.5)", p), Some(json!(2)));
    assert_eq!(value("round(n)", p), Some(json!(-2)));
    assert_eq!(value("round(1.2)", p), Some(json!(1)));
    assert_eq!(value("floor(n)", p), Some(json!(-2)));
    assert_eq!(value("ceil(n)", p), Some(json!(-1)));
    assert_eq!(value("ceil(i)", p), Some(json!(-3)));
    assert_eq!(value("concat(s, ' ', i)", p), Some(json!("Hello -3")));
    assert_eq!(value("s || '!'", p), Some(json!("Hello!")));
    assert_eq!(value("concat(a, [4])", p), Some(json!([1, 2, 3, 4])));
    assert_eq!(value("concat(s, nosuch)", p), None);
    assert_eq!(value("lower(s)", p), Some(json!("hello")));
    assert_eq!(value("upper(s)", p), Some(json!("HELLO")));
    assert_eq!(value("upper(a)", p), None);
    assert_eq!(value("substring(s, 1)", p), Some(json!("ello")));
    assert_eq!(value("substring(s, 1, 3)", p), Some(json!("el")));
    assert_eq!(value("substring(s, 9)", p), Some(json!("")));
    assert_eq!(value("substring('123', 1)", p), Some(json!("23")));
    assert_eq!(value("get(a, 0)", p), Some(json!(1)));
    assert_eq!(value("get(o, 'k')", p), Some(json!("v")));
    assert_eq!(value("get(a, 7)", p), None);
    assert_eq!(value("length(s)", p), Some(json!(5)));
    assert_eq!(value("length(a)", p), Some(json!(3)));
}

#[test]
fn casts() {
    let p = r#"{"d":2.7,"s":"42","f":"1.5","b":true,"x":"abc"}"#;
    assert_eq!(value("cast(d AS Int)", p), Some(json!(2)));
    assert_eq!(value("cast(s AS Int)", p), Some(json!(42)));
    assert_eq!(value("cast(f AS Int)", p), Some(json!(1)));
    assert_eq!(value("cast(b AS Int)", p), Some(json!(1)));
    assert_eq!(value("cast(x AS Int)", p), None);
    assert_eq!(
        value("cast(s AS Decimal)", p),
        Some(json!(42)),
        "whole Decimals are written as Ints"
    );
    assert_eq!(value("cast(f AS Decimal)", p), Some(json!(1.5)));
    assert_eq!(value("cast(b AS Decimal)", p), Some(json!(1)));
    assert_eq!(value("cast(0 AS Boolean)", p), Some(json!(false)));
    assert_eq!(value("cast('TRUE' AS Boolean)", p), Some(json!(true)));
    assert_eq!(value("cast(x AS Boolean)", p), None);
    assert_eq!(value("cast(d AS String)", p), Some(json!("2.7")));
    assert_eq!(value("cast(b AS String)", p), Some(json!("true")));
    assert_eq!(value("cast([1] AS String)", p), Some(json!("[1]")));
}

#[test]
fn payloads_that_are_not_json_objects() {
    let rule = Rule::parse("SELECT * FROM 'a'").unwrap();
    assert_eq!(apply(&rule, b"\x00\xffbinary"), Applied::Selected(None));
    let rule = Rule::parse("SELECT *, topic() AS t FROM 'a'").unwrap();
    assert!(matches!(apply(&rule, b"\x00\xff"), Applied::Failed(e) if e.contains("not JSON")));
    assert!(matches!(apply(&rule, b"[1,2]"), Applied::Failed(e) if e.contains("JSON Array")));
    // Fields of a payload that is not JSON are Undefined; functions still work.
    let rule = Rule::parse("SELECT temperature, topic(2) AS device FROM 'a'").unwrap();
    assert_eq!(
        apply(&rule, b"not json"),
        Applied::Selected(Some(br#"{"device":"dev-7"}"#.to_vec()))
    );
}

#[test]
fn the_from_filter_is_checked() {
    let e = Rule::parse("SELECT * FROM 'a/#/b'").unwrap_err();
    assert_eq!(e.position, 14);
    assert!(e.message.starts_with("FROM:"), "{e}");
    assert_eq!(e.to_string().split(':').next(), Some("at character 15"));
    let r = Rule::parse("SELECT * FROM 'sensors/+/telemetry'").unwrap();
    assert!(r.filter().matches("sensors/d/telemetry"));
}

#[test]
fn the_error_message_has_iot_cores_error_action_shape() {
    let m = error_message(
        "hot",
        "sensors/d/t",
        Some("d"),
        b"{\"t\":1}",
        "WHERE gave Int 1",
    );
    let m: Json = serde_json::from_slice(&m).unwrap();
    assert_eq!(m["ruleName"], "hot");
    assert_eq!(m["topic"], "sensors/d/t");
    assert_eq!(m["clientId"], "d");
    assert_eq!(m["base64OriginalPayload"], "eyJ0IjoxfQ==");
    assert_eq!(m["failures"][0]["errorMessage"], "WHERE gave Int 1");
    assert!(m["cloudwatchTraceId"].as_str().is_some());
}

/// Feeds payloads through a windowed rule as the window stage would (input rows per message,
/// accumulated per group) and closes the window.
fn window(sql: &str, payloads: &[&str]) -> Vec<Json> {
    let rule = Rule::parse(sql).unwrap();
    let w = rule.window().unwrap();
    let mut groups: Vec<(Vec<u8>, Vec<Value>, Vec<window::Acc>)> = Vec::new();
    for p in payloads {
        let Applied::Selected(Some(row)) = apply(&rule, p.as_bytes()) else {
            continue;
        };
        let r = w.parse_row(&row).unwrap();
        let slot = match groups.iter().position(|(k, _, _)| *k == r.key) {
            Some(i) => i,
            None => {
                let keys = r.keys().iter().cloned().map(Value::into_owned).collect();
                groups.push((r.key.clone(), keys, w.accumulators()));
                groups.len() - 1
            }
        };
        for (acc, arg) in groups[slot].2.iter_mut().zip(r.args()) {
            acc.add(arg);
        }
    }
    groups
        .iter()
        .map(
            |(_, keys, accs)| match rule.close(keys, accs, 60_000, false) {
                Applied::Selected(Some(out)) => serde_json::from_slice(&out).unwrap(),
                other => panic!("{other:?}"),
            },
        )
        .collect()
}

#[test]
fn windows_group_and_aggregate() {
    let sql = "SELECT topic(2) AS device, count(*) AS n, count(t) AS with_t, sum(t) AS sum, \
               avg(t) AS avg, min(t) AS min, max(t) AS max, first(t) AS first, last(t) AS last, \
               round(stddev(t) * 1000) AS sd_milli, window_start() AS start, window_end() AS end \
               FROM 'sensors/+/telemetry' \
               GROUP BY topic(2), STEP(ROWTIME BY INTERVAL '60' SECOND)";
    let out = window(
        sql,
        &[
            r#"{"t":2}"#,
            r#"{"t":4}"#,
            r#"{"t":"9"}"#,
            r#"{"x":true}"#,
            r#"{"t":1.5}"#,
        ],
    );
    assert_eq!(
        out,
        [json!({
            "device": "dev-7", "n": 5, "with_t": 4, "sum": 16.5, "avg": 4.125, "min": 1.5,
            "max": "9", "first": 2, "last": 1.5, "sd_milli": 3425, "start": 60_000, "end": 120_000
        })]
    );
    // Groups by a field; a group key may be reshaped; an aggregate inside an expression.
    let out = window(
        "SELECT lower(site) AS site, round(avg(t)) AS t FROM '#' \
         GROUP BY lower(site), STEP(ROWTIME BY INTERVAL '1' MINUTE)",
        &[
            r#"{"site":"A","t":1}"#,
            r#"{"site":"b","t":10}"#,
            r#"{"site":"a","t":2}"#,
        ],
    );
    assert_eq!(out, [json!({"site":"a","t":2}), json!({"site":"b","t":10})]);
    // No key: one group. sum of Ints stays an Int; of nothing, Undefined.
    let out = window(
        "SELECT count(*) AS n, sum(t) AS s, sum(nosuch) AS none FROM '#' GROUP BY STEP(ROWTIME BY INTERVAL '10' SECOND)",
        &[r#"{"t":1}"#, r#"{"t":2}"#],
    );
    assert_eq!(out, [json!({"n":2,"s":3})]);
}

#[test]
fn windowed_rules_are_checked() {
    let e = |sql: &str| Rule::parse(sql).unwrap_err().message;
    let step = "STEP(ROWTIME BY INTERVAL '60' SECOND)";
    assert!(
        e(&format!("SELECT t FROM '#' GROUP BY d, {step}")).contains("t is neither in GROUP BY")
    );
    assert!(e(&format!("SELECT * FROM '#' GROUP BY d, {step}")).contains("not *"));
    assert!(e(&format!(
        "SELECT topic(2) AS d, count(*) FROM '#' GROUP BY d, {step}"
    ))
    .contains("topic() has no single value"));
    assert!(e(&format!(
        "SELECT count(*) FROM '#' WHERE count(*) > 1 GROUP BY {step}"
    ))
    .contains("WHERE"));
    assert!(e(&format!("SELECT sum(avg(t)) FROM '#' GROUP BY {step}")).contains("nested"));
    assert!(e("SELECT avg(t) FROM '#'").contains("need a window"));
}

#[test]
fn rules_say_which_fields_they_read() {
    let f = |sql: &str| Rule::parse(sql).unwrap().fields();
    assert_eq!(
        f("SELECT a.b, get(c, 0) AS x FROM '#' WHERE d > 1 OR e IS NULL"),
        Some(vec!["a".into(), "c".into(), "d".into(), "e".into()])
    );
    assert_eq!(f("SELECT * FROM '#' WHERE t > 1"), Some(vec!["t".into()]));
    assert_eq!(f("SELECT *, x FROM '#'"), None);
    assert_eq!(
        f("SELECT topic(2) AS d, avg(t) FROM '#' GROUP BY topic(2), site, STEP(ROWTIME BY INTERVAL '1' MINUTE)"),
        Some(vec!["site".into(), "t".into()])
    );
    // Parsing only those gives the same results.
    let p = br#"{"t":5,"pad":"xxxxxxxx","nested":{"deep":[1,2,{"x":"y"}]},"u":1.5}"#;
    let only = Value::parse_fields(p, &["t".into(), "u".into()]).unwrap();
    assert_eq!(
        only,
        Value::Object(vec![
            ("t".into(), Value::Int(5)),
            ("u".into(), Value::Decimal(1.5))
        ])
    );
    assert!(
        Value::parse_fields(br#"{"t":5,"pad":[1,}"#, &["t".into()]).is_err(),
        "still checked"
    );
    assert!(
        Value::parse_fields(br#"{"t":5} x"#, &["t".into()]).is_err(),
        "trailing bytes"
    );
    assert_eq!(
        Value::parse_fields(b"[1]", &[]).unwrap(),
        Value::Array(vec![Value::Int(1)])
    );
}

/// Reading only some fields gives what a whole parse gives for them, on randomly damaged
/// documents too (a deterministic generator): the same values, the same errors.
#[test]
fn reading_some_fields_agrees_with_a_whole_parse() {
    let fields: Vec<String> = vec!["t".into(), "dev\u{e9}".into(), "n".into()];
    let seeds: &[&[u8]] = &[
        br#"{"t":21.5,"pad":"0a1b2c3d4e5f","n":{"a":[1,2.5e1,{"b":null}]},"dev\u00e9":"x\"y","t":-0}"#,
        br#" {"x":[true,false,null],"n":"s\u00e9\n","t":10.0,"big":123456789012345678901234} "#,
        br#"[{"t":1},2,"three"]"#,
    ];
    let whole = |doc: &[u8]| -> Result<Value<'static>, ()> {
        match Value::parse(doc).map_err(|_| ())?.into_owned() {
            Value::Object(all) => Ok(Value::Object(
                all.into_iter()
                    .filter(|(k, _)| fields.iter().any(|f| f == k))
                    .collect(),
            )),
            other => Ok(other),
        }
    };
    for doc in crate::templates::json_field::damaged(seeds, 0x2545_f491_4f6c_dd1d, 20_000) {
        let got = Value::parse_fields(&doc, &fields)
            .map(Value::into_owned)
            .map_err(|_| ());
        assert_eq!(got, whole(&doc), "{:?}", String::from_utf8_lossy(&doc));
    }
}
