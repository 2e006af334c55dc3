//! Harness for the end-to-end tests: runs the real `edgehose` and `firmware-sim` binaries as
//! processes on loopback ports, with a scratch directory for the buffer and the output, and reads
//! what they produce (objects, metrics, the SQLite file).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Where cargo put the workspace's binaries for this profile (`target/<profile>/`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace's binaries first (`cargo build --workspace`)",
        path.display()
    );
    path
}

/// Milliseconds since the Unix epoch (the baseline relays report arrival times in them).
pub fn epoch_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

/// The baseline relays' summary line: how many messages reached the subscriber, and when the
/// first and the last did (epoch ms).
pub fn relay_summary(received: u64, first: u128, last: u128) -> String {
    format!("{{\"received\":{received},\"first_ms\":{first},\"last_ms\":{last}}}")
}

/// A loopback port that was free a moment ago, never the same one twice in a test process.
///
/// Ports come from below the kernel's ephemeral range (32768-60999 by default), walked from an
/// offset set by the process id: asking the kernel for port 0 twice can return the same port
/// (a gateway once got its MQTT and admin listeners on one port), and an ephemeral port can be
/// taken by any outgoing connection between the pick and the bind.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 10_000;
    const SPAN: u32 = 22_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (std::process::id().wrapping_mul(7919)) % SPAN,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..SPAN {
        let port = (FIRST + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {FIRST}..{}", FIRST + SPAN)
}

/// Waits until `f` returns true, or fails after `timeout`.
pub fn wait_until(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("timed out after {timeout:?} waiting for {what}")
}

/// A plain HTTP/1.0 GET on loopback; returns (status, body).
pub fn http_get(port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no HTTP status")?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Options for a test gateway's config.
#[derive(Debug, Clone)]
pub struct Setup {
    pub buffer_interval: &'static str,
    pub buffer_size: &'static str,
    pub compression: &'static str,
    pub max_size: &'static str,
    pub when_full: &'static str,
    /// Client mode against an external broker on this port.
    pub client_of: Option<u16>,
    /// The embedded rumqttd instead of the front door.
    pub rumqttd: bool,
    pub shutdown_timeout: &'static str,
    /// rumqttd's in-memory log as (segment size, segment count), for the embedded broker.
    pub broker_log: (&'static str, usize),
    /// The `file` destination's root, relative to the scratch directory unless absolute.
    pub root: &'static str,
    /// With `rumqttd`: also listen for MQTT 5 on this port.
    pub listen_v5: Option<u16>,
    /// The body of `[destinations.local]` instead of the `file` destination (for example an
    /// `s3` or `kinesis` one against an emulator).
    pub destination: Option<String>,
    /// Extra environment for the daemon (for example AWS_REGION, AWS_ENDPOINT_URL_S3).
    pub env: Vec<(&'static str, String)>,
    /// Extra lines for `[ingress.frontdoor]` (for example `packet_timeout = "2s"`).
    pub frontdoor: &'static str,
    /// `buffer.synchronous`: "full" (the default) or "normal".
    pub synchronous: &'static str,
    /// More config at the end (streams and destinations beside `telemetry` and `local`).
    pub extra: String,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            buffer_interval: "1s",
            buffer_size: "1MiB",
            compression: "none",
            max_size: "256MiB",
            when_full: "block",
            client_of: None,
            rumqttd: false,
            shutdown_timeout: "20s",
            broker_log: ("16MiB", 4),
            listen_v5: None,
            root: "out",
            destination: None,
            env: Vec::new(),
            frontdoor: "",
            synchronous: "full",
            extra: String::new(),
        }
    }
}

/// One `edgehose run` process with its scratch directory.
pub struct Gateway {
    pub dir: PathBuf,
    pub env: Vec<(&'static str, String)>,
    pub mqtt_port: u16,
    pub admin_port: u16,
    pub config_path: PathBuf,
    child: Option<Child>,
    log_path: PathBuf,
}

impl Gateway {
    pub const BUCKET: &'static str = "telemetry";
    pub const STREAM: &'static str = "edgehose-telemetry";

    /// Writes the config for `setup` into `dir` (kept across restarts) and starts the gateway.
    pub fn start(dir: &Path, setup: &Setup) -> anyhow::Result<Self> {
        let mqtt_port = free_port();
        let admin_port = free_port();
        let ingress = match setup.client_of {
            None if !setup.rumqttd => format!(
                "[ingress]\nmode = \"frontdoor\"\n[ingress.frontdoor]\nlisten = \"127.0.0.1:{mqtt_port}\"\n{}\n",
                setup.frontdoor
            ),
            None => format!(
                "[ingress]\nmode = \"broker\"\n[ingress.broker]\nlisten = \"127.0.0.1:{mqtt_port}\"\n\
                 log_segment_size = \"{}\"\nlog_segment_count = {}\n{}",
                setup.broker_log.0,
                setup.broker_log.1,
                setup
                    .listen_v5
                    .map(|p| format!("listen_v5 = \"127.0.0.1:{p}\"\n"))
                    .unwrap_or_default()
            ),
            Some(port) => format!(
                "[ingress]\nmode = \"client\"\n[ingress.client]\nhost = \"127.0.0.1\"\nport = {port}\n\
                 client_id = \"edgehose-test\"\ntopics = [\"sensors/#\"]\n"
            ),
        };
        let config = format!(
            r#"{ingress}
[buffer]
path = "{dir}/data/edgehose.db"
max_size = "{max_size}"
when_full = "{when_full}"
synchronous = "{synchronous}"

[admin]
listen = "127.0.0.1:{admin_port}"

[shutdown]
timeout = "{shutdown_timeout}"

[streams.telemetry]
topics = ["sensors/+/telemetry"]
partition_key = "${{topic(2)}}"
destinations = ["local"]

[destinations.local]
{destination}
{extra}
"#,
            extra = setup.extra,
            destination = setup.destination.clone().unwrap_or_else(|| format!(
                "type = \"file\"\nroot = \"{root}\"\nbucket = \"{bucket}\"\n\
                 delivery_stream = \"{stream}\"\nbuffer_size = \"{size}\"\n\
                 buffer_interval = \"{interval}\"\ncompression = \"{compression}\"\n",
                bucket = Self::BUCKET,
                stream = Self::STREAM,
                size = setup.buffer_size,
                interval = setup.buffer_interval,
                compression = setup.compression,
                root = dir.join(setup.root).display(),
            )),
            dir = dir.display(),
            max_size = setup.max_size,
            when_full = setup.when_full,
            synchronous = setup.synchronous,
            shutdown_timeout = setup.shutdown_timeout,
        );
        let config_path = dir.join("edgehose.toml");
        std::fs::write(&config_path, config)?;
        let mut gw = Self {
            dir: dir.to_path_buf(),
            env: setup.env.clone(),
            mqtt_port,
            admin_port,
            config_path,
            child: None,
            log_path: dir.join("edgehose.log"),
        };
        gw.spawn()?;
        Ok(gw)
    }

    /// Starts (or restarts) the process and waits for `/healthz`.
    pub fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        let child = Command::new(bin("edgehose"))
            .args(["run", "--config"])
            .arg(&self.config_path)
            .env(
                "EDGEHOSE_LOG",
                "info,rumqttd=warn,rumqttd::router::routing=off,edgehose::ingress::frontdoor::persist=debug",
            )
            // AWS destinations talk to emulators on loopback: fixed test credentials, and no
            // instance-metadata lookups.
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env_remove("AWS_PROFILE")
            .env_remove("AWS_ENDPOINT_URL")
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        let port = self.admin_port;
        let started = wait_until(Duration::from_secs(20), "edgehose /healthz", || {
            http_get(port, "/healthz")
                .map(|(s, _)| s == 200)
                .unwrap_or(false)
        });
        if let Err(e) = started {
            bail!("{e}; log:\n{}", self.log());
        }
        Ok(())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// Peak resident memory of the running daemon (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("the daemon's /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM")
    }

    /// SIGTERM, then waits (bounded) for the exit status.
    pub fn terminate(&mut self) -> anyhow::Result<ExitStatus> {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()?;
        assert!(status.success());
        self.wait(Duration::from_secs(30))
    }

    /// SIGKILL: no chance to flush or commit anything.
    pub fn kill9(&mut self) -> anyhow::Result<()> {
        let mut child = self.child.take().expect("running");
        let killed = child.kill();
        child.wait()?;
        Ok(killed?)
    }

    /// Waits (bounded) for an exit a signal already asked for.
    pub fn terminate_wait(&mut self) -> anyhow::Result<ExitStatus> {
        self.wait(Duration::from_secs(30))
    }

    fn wait(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let mut child = self.child.take().expect("running");
        let end = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > end {
                child.kill().ok();
                bail!(
                    "edgehose did not exit within {timeout:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// All metrics as name{labels} -> value.
    pub fn metrics(&self) -> anyhow::Result<BTreeMap<String, f64>> {
        let (status, body) = http_get(self.admin_port, "/metrics")?;
        if status != 200 {
            bail!("/metrics answered {status}");
        }
        Ok(body
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect())
    }

    pub fn metric(&self, key: &str) -> f64 {
        self.metrics()
            .ok()
            .and_then(|m| m.get(key).copied())
            .unwrap_or(0.0)
    }

    pub fn bucket_dir(&self) -> PathBuf {
        self.dir.join("out").join(Self::BUCKET)
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.join("data/edgehose.db")
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().ok();
            c.wait().ok();
        }
    }
}

/// One delivered object: its key (relative to the bucket) and its records.
#[derive(Debug)]
pub struct Object {
    pub key: String,
    pub records: Vec<Vec<u8>>,
}

/// Reads every object under `bucket`, un-gzipping `.gz` ones, splitting records on newlines.
pub fn read_objects(bucket: &Path) -> anyhow::Result<Vec<Object>> {
    let mut out = Vec::new();
    let mut stack = vec![bucket.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries {
            let path = e?.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let raw = std::fs::read(&path)?;
            let body = if path.extension().is_some_and(|x| x == "gz") {
                let mut d = flate2::read::GzDecoder::new(&raw[..]);
                let mut v = Vec::new();
                d.read_to_end(&mut v)?;
                v
            } else {
                raw
            };
            let key = path.strip_prefix(bucket)?.to_string_lossy().into_owned();
            let records = body
                .split(|&b| b == b'\n')
                .filter(|r| !r.is_empty())
                .map(<[u8]>::to_vec)
                .collect();
            out.push(Object { key, records });
        }
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(out)
}

/// (device, seq) of every record, as firmware-sim writes them.
pub fn device_seqs(objects: &[Object]) -> Vec<(String, u64)> {
    seqs_of(
        objects
            .iter()
            .flat_map(|o| o.records.iter().map(Vec::as_slice)),
    )
}

/// How a delivered set of (device, seq) compares with what the fleet sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub missing: usize,
    /// Extra copies beyond the first of a record.
    pub duplicates: usize,
}

/// Counts missing and duplicated records of `devices` devices `<prefix>-<n>` that sent
/// sequence numbers 0..per_device each.
pub fn tally(seqs: &[(String, u64)], devices: usize, per_device: u64, prefix: &str) -> Tally {
    let mut seen: std::collections::HashMap<(String, u64), usize> = Default::default();
    for s in seqs {
        *seen.entry(s.clone()).or_default() += 1;
    }
    let duplicates = seen.values().map(|n| n - 1).sum();
    let mut missing = 0;
    for d in 0..devices {
        for s in 0..per_device {
            if !seen.contains_key(&(format!("{prefix}-{d}"), s)) {
                missing += 1;
            }
        }
    }
    Tally {
        missing,
        duplicates,
    }
}

/// Every record sent arrived, once.
pub fn assert_exactly_once(seqs: &[(String, u64)], devices: usize, per_device: u64, prefix: &str) {
    let t = tally(seqs, devices, per_device, prefix);
    assert_eq!(t.duplicates, 0, "duplicated records");
    assert_eq!(t.missing, 0, "records missing from the output");
    assert_eq!(seqs.len(), devices * per_device as usize);
}

/// (device, seq) of JSON records.
pub fn seqs_of<'a>(records: impl IntoIterator<Item = &'a [u8]>) -> Vec<(String, u64)> {
    records
        .into_iter()
        .filter_map(|r| {
            let v: serde_json::Value = serde_json::from_slice(r).ok()?;
            Some((v["device"].as_str()?.to_string(), v["seq"].as_u64()?))
        })
        .collect()
}

/// Checks a key against Firehose's layout for the default prefix:
/// `yyyy/MM/dd/HH/<stream>-<version>-yyyy-MM-dd-HH-mm-ss-<uuid><ext>`, with the prefix's hour
/// equal to the name's.
pub fn is_firehose_key(key: &str, stream: &str, ext: &str) -> bool {
    let parts: Vec<&str> = key.split('/').collect();
    if parts.len() != 5 {
        return false;
    }
    let digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit());
    if !(digits(parts[0], 4) && digits(parts[1], 2) && digits(parts[2], 2) && digits(parts[3], 2)) {
        return false;
    }
    let Some(name) = parts[4].strip_prefix(&format!("{stream}-")) else {
        return false;
    };
    let Some(name) = name.strip_suffix(ext) else {
        return false;
    };
    // <version>-yyyy-MM-dd-HH-mm-ss-<uuid: 8-4-4-4-12>
    let f: Vec<&str> = name.split('-').collect();
    if f.len() != 12 || !f[0].bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    let ts_ok = digits(f[1], 4) && [2, 3, 4, 5, 6].iter().all(|&i| digits(f[i], 2));
    let prefix_matches =
        f[1] == parts[0] && f[2] == parts[1] && f[3] == parts[2] && f[4] == parts[3];
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    let uuid_ok = hex(f[7], 8) && hex(f[8], 4) && hex(f[9], 4) && hex(f[10], 4) && hex(f[11], 12);
    ts_ok && prefix_matches && uuid_ok
}

/// Runs firmware-sim to completion and returns its JSON summary.
pub fn run_sim(port: u16, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let out = Command::new(bin("firmware-sim"))
        .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--json"])
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!(
            "firmware-sim failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Publishes `messages` (topic, payload) from one MQTT client at QoS 1 and returns how many
/// were acknowledged. Stops at the first connection error.
pub async fn publish(port: u16, client_id: &str, messages: Vec<(String, Vec<u8>)>) -> usize {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
    opts.set_max_packet_size(4 * 1024 * 1024, 4 * 1024 * 1024);
    let (client, mut eventloop) = AsyncClient::new(opts, 16);
    let total = messages.len();
    tokio::spawn(async move {
        for (topic, payload) in messages {
            if client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let mut acked = 0;
    let end = tokio::time::Instant::now() + Duration::from_secs(30);
    while acked < total {
        match tokio::time::timeout_at(end, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => break,
        }
    }
    acked
}

/// A telemetry payload like firmware-sim's.
pub fn telemetry(device: &str, seq: u64) -> Vec<u8> {
    format!(r#"{{"device":"{device}","seq":{seq},"temperature_c":21.5}}"#).into_bytes()
}

/// Payloads of the records held in a (stopped) gateway's buffer file, in id order (read with
/// the daemon's own reader: segments hold compressed blocks).
pub fn buffered_payloads(db: &Path) -> Vec<Vec<u8>> {
    try_buffered_payloads(db).expect("read the buffer file")
}

/// [`buffered_payloads`], or why the file cannot be read (a power cut with `synchronous =
/// "normal"` can leave a file without its tables).
pub fn try_buffered_payloads(db: &Path) -> anyhow::Result<Vec<Vec<u8>>> {
    use edgehose::buffer::store;
    let conn = store::open_reader(db).context("open the buffer file")?;
    let streams: Vec<i64> = conn
        .prepare("SELECT id FROM streams")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .context("list streams")?;
    let mut out = Vec::new();
    store::scan(&conn, &streams, 0, None, |row| {
        out.push(row.payload.to_vec());
        std::ops::ControlFlow::Continue(())
    })
    .map_err(|e| anyhow::anyhow!("read the buffer: {e}"))?;
    Ok(out)
}

/// (delivered id of the first destination, last record id, number of segments) of a stopped
/// gateway's buffer file.
pub fn delivery_position(db: &Path) -> (i64, i64, i64) {
    use edgehose::buffer::store;
    let conn = store::open_reader(db).expect("open the buffer file");
    let delivered: i64 = conn
        .query_row("SELECT min(delivered_id) FROM destinations", [], |r| {
            r.get(0)
        })
        .expect("read the delivery position");
    let segments = store::segments_exact(&conn).expect("list segments");
    let last = segments.last().map_or(0, |s| s.last_id);
    (delivered, last, segments.len() as i64)
}

/// Records held in a (stopped) gateway's buffer file.
pub fn buffered_records(db: &Path) -> i64 {
    buffered_payloads(db).len() as i64
}

/// A real mosquitto broker on a loopback port, for client mode.
pub struct Mosquitto {
    pub port: u16,
    child: Child,
}

impl Mosquitto {
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        Self::start_with(dir, "allow_anonymous true\n")
    }

    /// Starts mosquitto with `extra` appended to its listener block (TLS files, auth).
    pub fn start_with(dir: &Path, extra: &str) -> anyhow::Result<Self> {
        let exe = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .context(
                "mosquitto is not installed (tests/run.sh installs it: apt-get install mosquitto)",
            )?;
        let port = free_port();
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                // As root, mosquitto would switch to its own user, which cannot read the test's
                // files; elsewhere `user` is ignored.
                "user root\nper_listener_settings false\npersistence false\n\
                 max_queued_messages 1000000\nmax_inflight_messages 100\n\
                 listener {port} 127.0.0.1\n{extra}"
            ),
        )?;
        let child = Command::new(exe)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        wait_until(Duration::from_secs(10), "mosquitto to listen", || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        })?;
        Ok(Self { port, child })
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firehose_key_check() {
        let k = "2026/11/26/10/edgehose-telemetry-1-2026-11-26-10-38-05-93a203f6-ead6-5b60-9485-88c6fc10e5e6";
        assert!(is_firehose_key(k, "edgehose-telemetry", ""));
        assert!(!is_firehose_key(k, "other", ""));
        assert!(!is_firehose_key(
            &k.replace("/10/e", "/11/e"),
            "edgehose-telemetry",
            ""
        ));
        assert!(is_firehose_key(
            &format!("{k}.gz"),
            "edgehose-telemetry",
            ".gz"
        ));
    }
}

/// The Python of the test venv (`tests/run.sh` creates it with paho-mqtt, moto and
/// aws-kinesis-agg).
pub fn venv_python() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = root.join("target/test-venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run tests/run.sh, which creates the test venv",
        python.display()
    );
    python
}

fn aws_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("aws").join(name)
}

/// An object read back from an S3 emulator.
#[derive(Debug, Clone)]
pub struct S3Object {
    pub key: String,
    /// Its Content-Encoding header.
    pub encoding: Option<String>,
    /// Its ETag: `<md5>-<parts>` when it was put by multipart upload.
    pub etag: String,
    /// The body as stored (compressed if it was put compressed).
    pub body: Vec<u8>,
}

/// A record read back from a Kinesis emulator.
#[derive(Debug, Clone)]
pub struct StreamRecord {
    pub shard: String,
    pub key: String,
    pub data: Vec<u8>,
    /// A KPL aggregate (or, de-aggregated, a sub-record of one).
    pub aggregated: bool,
}

/// moto's server mode: S3 and Kinesis emulated in one process on a loopback port.
pub struct Moto {
    pub port: u16,
    child: Option<Child>,
    log: PathBuf,
}

impl Moto {
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        let mut m = Self {
            port: free_port(),
            child: None,
            log: dir.join("moto.log"),
        };
        m.spawn()?;
        Ok(m)
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// (Re)starts on the same port. moto keeps state in memory: a restart starts empty.
    pub fn spawn(&mut self) -> anyhow::Result<()> {
        let python = venv_python();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(python.with_file_name("moto_server"))
            .args(["-H", "127.0.0.1", "-p", &self.port.to_string()])
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting moto_server")?;
        self.child = Some(child);
        let port = self.port;
        wait_until(Duration::from_secs(30), "moto_server", || {
            http_get(port, "/moto-api/").is_ok()
        })
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().ok();
            c.wait().ok();
        }
    }

    /// Runs tests/aws/read_back.py against this emulator (or `endpoint`).
    pub fn call(&self, endpoint: &str, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let out = Command::new(venv_python())
            .arg(aws_script("read_back.py"))
            .arg(args[0])
            .arg(endpoint)
            .args(&args[1..])
            .output()?;
        if !out.status.success() {
            bail!(
                "read_back.py {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    pub fn create_bucket(&self, bucket: &str) -> anyhow::Result<()> {
        self.call(&self.endpoint(), &["create-bucket", bucket])
            .map(|_| ())
    }

    pub fn create_stream(&self, stream: &str, shards: u32) -> anyhow::Result<()> {
        self.call(
            &self.endpoint(),
            &["create-stream", stream, &shards.to_string()],
        )
        .map(|_| ())
    }

    /// Every object of `bucket`, as stored.
    pub fn objects(&self, bucket: &str) -> anyhow::Result<Vec<S3Object>> {
        let v = self.call(&self.endpoint(), &["s3", bucket])?;
        v.as_array()
            .context("a list")?
            .iter()
            .map(|o| {
                Ok(S3Object {
                    key: o["key"].as_str().context("key")?.to_string(),
                    encoding: o["content_encoding"].as_str().map(str::to_string),
                    etag: o["etag"].as_str().unwrap_or_default().to_string(),
                    body: b64(o["body"].as_str().context("body")?)?,
                })
            })
            .collect()
    }

    /// Every record of `stream` from TRIM_HORIZON, shard by shard in stream order. With
    /// `deaggregate`, aws-kinesis-agg expands KPL aggregates into their sub-records.
    pub fn stream_records(
        &self,
        stream: &str,
        deaggregate: bool,
    ) -> anyhow::Result<Vec<StreamRecord>> {
        let mut args = vec!["kinesis", stream];
        if deaggregate {
            args.push("--deaggregate");
        }
        let v = self.call(&self.endpoint(), &args)?;
        v.as_array()
            .context("a list")?
            .iter()
            .map(|r| {
                Ok(StreamRecord {
                    shard: r["shard"].as_str().context("shard")?.to_string(),
                    key: r["partition_key"].as_str().context("key")?.to_string(),
                    data: b64(r["data"].as_str().context("data")?)?,
                    aggregated: r["aggregated"].as_bool().unwrap_or(false),
                })
            })
            .collect()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// tests/aws/fault_proxy.py in front of an emulator.
pub struct FaultProxy {
    pub port: u16,
    child: Child,
}

impl FaultProxy {
    pub fn start(upstream: u16, args: &[&str]) -> anyhow::Result<Self> {
        Self::start_on(free_port(), upstream, args)
    }

    /// Starts on a given port (to come back where a stopped proxy was).
    pub fn start_on(port: u16, upstream: u16, args: &[&str]) -> anyhow::Result<Self> {
        let child = Command::new(venv_python())
            .arg(aws_script("fault_proxy.py"))
            .arg(port.to_string())
            .arg(upstream.to_string())
            .args(args)
            .stdout(Stdio::null())
            .spawn()?;
        let p = Self { port, child };
        wait_until(Duration::from_secs(10), "fault proxy", || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        })?;
        Ok(p)
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn stats(&self) -> anyhow::Result<serde_json::Value> {
        let (_, body) = http_get(self.port, "/__stats")?;
        Ok(serde_json::from_str(&body)?)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

fn b64(text: &str) -> anyhow::Result<Vec<u8>> {
    use base64::Engine;
    Ok(base64::engine::general_purpose::STANDARD.decode(text)?)
}

/// The power-cut shim (`tests/powercut/powercut.c`), built once per test binary into the
/// target directory: with it preloaded, files under `POWERCUT_DIR` keep a durable copy that only
/// fsync updates.
pub fn powercut_lib() -> PathBuf {
    static LIB: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    LIB.get_or_init(|| {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("powercut/powercut.c");
        let out = bin("edgehose")
            .parent()
            .expect("target directory")
            .join(format!("libpowercut-{}.so", std::process::id()));
        let status = Command::new("cc")
            .args(["-Wall", "-Werror", "-shared", "-fPIC", "-O2", "-o"])
            .arg(&out)
            .arg(&src)
            .args(["-ldl", "-lpthread"])
            .status()
            .expect("cc (gcc) builds the power-cut shim");
        assert!(status.success(), "building {}", src.display());
        out
    })
    .clone()
}

/// Environment that makes a gateway's buffer directory (`<dir>/data`) lose, at a power cut,
/// everything not fsynced: the durable copies go to `<dir>/durable`.
pub fn powercut_env(dir: &Path) -> Vec<(&'static str, String)> {
    let shadow = dir.join("durable");
    std::fs::create_dir_all(&shadow).expect("durable copies' directory");
    vec![
        ("LD_PRELOAD", powercut_lib().display().to_string()),
        ("POWERCUT_DIR", dir.join("data").display().to_string()),
        ("POWERCUT_SHADOW", shadow.display().to_string()),
    ]
}

/// After the gateway was killed: replaces the files of `<dir>/data` with what a power cut would
/// have left of them (their durable copies; SQLite's shared-memory index is gone). Returns the
/// bytes that were written but never fsynced, summed over the files.
pub fn powercut_apply(dir: &Path) -> u64 {
    let data = dir.join("data");
    let shadow = dir.join("durable");
    let mut discarded = 0;
    for entry in std::fs::read_dir(&data).expect("buffer directory") {
        let path = entry.expect("entry").path();
        let name = path.file_name().expect("a file name").to_owned();
        let durable = shadow.join(&name);
        if path.to_string_lossy().ends_with("-shm") {
            std::fs::remove_file(&path).expect("remove -shm");
        } else if durable.exists() {
            let real = std::fs::read(&path).expect("read file");
            let kept = std::fs::read(&durable).expect("read durable copy");
            discarded += real
                .iter()
                .zip(kept.iter().chain(std::iter::repeat(&0)))
                .filter(|(a, b)| a != b)
                .count() as u64
                + real.len().saturating_sub(kept.len()) as u64;
            std::fs::write(&path, kept).expect("write the durable copy in place");
        }
        // Any other file was not written through the shim: left as it is.
    }
    std::fs::remove_dir_all(&shadow).expect("remove durable copies");
    discarded
}
