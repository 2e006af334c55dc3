//! Clients that misbehave on purpose or by accident cannot hold a connection slot for ever,
//! flood the log, or forge journal entries.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use edgehose_tests::*;

/// An MQTT 3.1.1 CONNECT with keep-alive 0 (no keep-alive timeout at all).
fn connect_packet(client_id: &[u8]) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 0];
    body.extend((client_id.len() as u16).to_be_bytes());
    body.extend(client_id);
    let mut p = vec![0x10, body.len() as u8];
    p.extend(body);
    p
}

fn connected(port: u16, client_id: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(&connect_packet(client_id)).unwrap();
    let mut connack = [0u8; 4];
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.read_exact(&mut connack).unwrap();
    assert_eq!(connack[0], 0x20, "CONNACK");
    s
}

#[test]
fn a_half_sent_packet_does_not_hold_its_connection_whatever_the_keep_alive() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup {
        frontdoor: "packet_timeout = \"2s\"",
        ..Setup::default()
    };
    let gw = Gateway::start(dir.path(), &setup).unwrap();
    let mut s = connected(gw.mqtt_port, b"slow");
    // A PUBLISH announcing 100 bytes, of which 10 ever come.
    s.write_all(&[0x30, 100, 0, 5, b'a', b'/', b'b', b'/', b'c', b'x'])
        .unwrap();
    let sent = Instant::now();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut buf = [0u8; 16];
    let n = s.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "the gateway closes the connection");
    let took = sent.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(20),
        "{took:?}"
    );
    wait_until(Duration::from_secs(5), "the log line", || {
        gw.log().contains("a packet was not completed in time")
    })
    .unwrap();
}

#[test]
fn malformed_packets_are_logged_once_a_second_and_client_ids_cannot_forge_log_lines() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(dir.path(), &Setup::default()).unwrap();
    // A client id with a newline and a journal priority prefix.
    let mut s = connected(gw.mqtt_port, b"dev\n<3>forged error");
    s.write_all(&[0xF0, 0x00]).unwrap(); // packet type 15: not in MQTT 3.1.1
    let mut buf = [0u8; 16];
    let _ = s.read(&mut buf);
    // Then 200 more malformed connections as fast as they come.
    let started = Instant::now();
    for i in 0..200 {
        let mut s = connected(gw.mqtt_port, format!("flood-{i}").as_bytes());
        s.write_all(&[0xF0, 0x00]).unwrap();
        let _ = s.read(&mut buf);
    }
    let took = started.elapsed();
    wait_until(Duration::from_secs(5), "the first warning", || {
        gw.log().contains("malformed packet")
    })
    .unwrap();
    let log = gw.log();
    assert!(
        !log.lines().any(|l| l.starts_with("<3>forged")),
        "a client id forged a log line:\n{log}"
    );
    assert!(log.contains("dev\\n<3>forged error"), "escaped:\n{log}");
    let lines = log.matches("malformed packet; disconnecting").count();
    let seconds = took.as_secs() + 2;
    assert!(
        lines as u64 <= seconds,
        "{lines} warnings for 201 malformed packets in {took:?}"
    );
}

#[test]
fn a_session_holds_at_most_fifty_filters() {
    use rumqttc::{
        AsyncClient, Event, MqttOptions, Packet, QoS, SubscribeFilter, SubscribeReasonCode,
    };
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(dir.path(), &Setup::default()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let codes = rt.block_on(async {
        let (client, mut eventloop) =
            AsyncClient::new(MqttOptions::new("greedy", "127.0.0.1", gw.mqtt_port), 10);
        let filters: Vec<SubscribeFilter> = (0..60)
            .map(|i| SubscribeFilter::new(format!("a/{i}/#"), QoS::AtLeastOnce))
            .collect();
        client.subscribe_many(filters).await.unwrap();
        let end = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match tokio::time::timeout_at(end, eventloop.poll()).await {
                Ok(Ok(Event::Incoming(Packet::SubAck(ack)))) => return ack.return_codes,
                Ok(Ok(_)) => {}
                other => panic!("no SUBACK: {other:?}"),
            }
        }
    });
    assert_eq!(codes.len(), 60);
    assert!(codes[..50]
        .iter()
        .all(|c| matches!(c, SubscribeReasonCode::Success(_))));
    assert!(codes[50..]
        .iter()
        .all(|c| *c == SubscribeReasonCode::Failure));
    assert_eq!(gw.metric("edgehose_subscriptions_refused_total"), 10.0);
}

/// MQTT's variable-length remaining length.
fn remaining_length(mut n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return out;
        }
    }
}

#[test]
fn half_sent_packets_share_one_budget_and_well_behaved_devices_carry_on() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup {
        frontdoor: "packet_timeout = \"3s\"\npartial_packet_budget = \"1MiB\"",
        ..Setup::default()
    };
    let gw = Gateway::start(dir.path(), &setup).unwrap();
    // 20 devices each announce a 120 KiB PUBLISH and send 100 KiB of it: ~2 MiB against 1 MiB.
    let mut slow = Vec::new();
    for i in 0..20 {
        let mut s = connected(gw.mqtt_port, format!("slow-{i}").as_bytes());
        let mut p = vec![0x30];
        p.extend(remaining_length(120 * 1024));
        p.extend([0, 3, b'a', b'/', b'b']);
        p.resize(p.len() + 100 * 1024 - 5, b'x');
        // The kernel takes what the gateway does not read yet.
        s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(&p);
        slow.push(s);
    }
    wait_until(
        Duration::from_secs(10),
        "a connection waiting for budget",
        || gw.metric("edgehose_partial_packet_budget_waits_total") >= 1.0,
    )
    .unwrap();
    // A well-behaved device is not held up.
    let started = Instant::now();
    let s = run_sim(
        gw.mqtt_port,
        &["-n", "1", "-m", "100", "--rate", "0", "--first-device", "7"],
    )
    .unwrap();
    assert_eq!(s["acknowledged"], 100);
    assert!(started.elapsed() < Duration::from_secs(10));
    // Every unfinished packet, waiting for budget or not, ends with its connection.
    for mut s in slow {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = [0u8; 16];
        match s.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("the connection stayed open: {other:?}"),
        }
    }
}

#[test]
fn a_client_flooding_its_socket_is_paced_and_others_carry_on() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup {
        frontdoor: "max_bytes_per_second = \"1MiB\"",
        ..Setup::default()
    };
    let gw = Gateway::start(dir.path(), &setup).unwrap();
    // 100 KB QoS 0 messages (valid JSON) as fast as the socket takes them, for 3 s.
    let port = gw.mqtt_port;
    let flood = std::thread::spawn(move || {
        let mut s = connected(port, b"flood");
        let topic = b"sensors/flood/telemetry";
        let payload = format!("{{\"pad\":\"{}\"}}", "x".repeat(100_000));
        let mut body = (topic.len() as u16).to_be_bytes().to_vec();
        body.extend(topic);
        body.extend(payload.as_bytes());
        let mut packet = vec![0x30];
        packet.extend(remaining_length(body.len()));
        packet.extend(body);
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        let start = Instant::now();
        let mut written = 0usize;
        while start.elapsed() < Duration::from_secs(3) {
            s.write_all(&packet)
                .expect("the gateway keeps reading, paced");
            written += packet.len();
        }
        (written, start.elapsed())
    });
    // A well-behaved device publishes meanwhile.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let good: Vec<_> = (0..50)
        .map(|i| ("sensors/good/telemetry".to_string(), telemetry("good", i)))
        .collect();
    let acked = rt.block_on(publish(port, "good", good));
    assert_eq!(acked, 50);
    let (written, took) = flood.join().unwrap();
    // What the gateway took from the flood: at most the rate for the time, plus one second's
    // burst (and what sits in socket buffers does not count: it was not read).
    let received = gw.metric("edgehose_messages_received_total") - 50.0;
    let taken = received * 100_000.0;
    let allowed = (took.as_secs_f64() + 1.5) * 1024.0 * 1024.0;
    assert!(
        taken <= allowed,
        "took {taken} bytes in {took:?}, allowed {allowed}"
    );
    assert!(gw.metric("edgehose_connection_rate_limited_total") >= 1.0);
    assert!(
        written as f64 > taken,
        "the flood was not held back ({written} written)"
    );
}

#[test]
fn one_address_gets_at_most_its_share_of_connections() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup {
        frontdoor: "max_connections_per_address = 2\nlimit_loopback = true",
        ..Setup::default()
    };
    let gw = Gateway::start(dir.path(), &setup).unwrap();
    let _a = connected(gw.mqtt_port, b"a");
    let b = connected(gw.mqtt_port, b"b");
    // The third from 127.0.0.1 is closed at once, without a CONNACK.
    let mut c = TcpStream::connect(("127.0.0.1", gw.mqtt_port)).unwrap();
    let _ = c.write_all(&connect_packet(b"c"));
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 4];
    assert_eq!(
        c.read(&mut buf).unwrap_or(0),
        0,
        "a third connection was served"
    );
    assert_eq!(
        gw.metric("edgehose_auth_refused_total{action=\"accept\",reason=\"per_address_limit\"}"),
        1.0
    );
    // A slot comes back when a connection ends.
    drop(b);
    wait_until(Duration::from_secs(10), "the slot to come back", || {
        TcpStream::connect(("127.0.0.1", gw.mqtt_port))
            .and_then(|mut s| {
                s.write_all(&connect_packet(b"d"))?;
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                let mut connack = [0u8; 4];
                s.read_exact(&mut connack)?;
                Ok(connack[0] == 0x20)
            })
            .unwrap_or(false)
    })
    .unwrap();
}
