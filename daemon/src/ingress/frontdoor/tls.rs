//! The TLS listener's side of a connection: rustls (ring provider, TLS 1.2 and 1.3, the stack
//! the AWS SDK already brings) with the server's certificate, and, for mutual TLS, device
//! certificates verified against the client CA and its CRLs; then a deny list of certificate
//! fingerprints, and the things certificates are attached to (else a certificate's thing is its
//! common name). Everything is read from files at start and again on SIGHUP; a handshake uses
//! what was loaded when it began, so a reload never touches an open connection.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, RwLock};

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::{UnbufferedServerConnection, WebPkiClientVerifier};
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use rustls::{RootCertStore, ServerConfig};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::{error, info};

use super::tls_stream::{Records, TlsStream, TrafficSecret};

use crate::config::{ClientCerts, TlsConfig};
use crate::ingress::auth::{x509, PeerCertificate};

struct Loaded {
    server: Arc<ServerConfig>,
    secrets: Arc<SecretLog>,
    revoked: HashSet<String>,
    /// Certificate fingerprint -> the thing it is attached to.
    things: HashMap<String, String>,
}

/// The TLS listener's certificates and trust, reloadable.
pub struct Tls {
    config: TlsConfig,
    loaded: RwLock<Arc<Loaded>>,
}

/// Why a handshake did not give a usable connection.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("TLS handshake failed: {0}")]
    Failed(std::io::Error),
    #[error("certificate {fingerprint} is on the revoked list")]
    Revoked { fingerprint: String },
}

fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: not PEM certificates", path.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{}: holds no certificate", path.display());
    }
    Ok(certs)
}

fn read_crls(path: &Path) -> anyhow::Result<Vec<CertificateRevocationListDer<'static>>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    if bytes.starts_with(b"-----BEGIN") {
        CertificateRevocationListDer::pem_slice_iter(&bytes)
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("{}: not a PEM CRL", path.display()))
    } else {
        Ok(vec![CertificateRevocationListDer::from(bytes)])
    }
}

/// Reads a deny list: one SHA-256 fingerprint per line (hex, colons allowed, `#` comments).
pub fn read_revoked(path: &Path) -> anyhow::Result<HashSet<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the revoked list {}", path.display()))?;
    let mut out = HashSet::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let fp = x509::parse_fingerprint(line).ok_or_else(|| {
            anyhow::anyhow!(
                "{} line {}: not a SHA-256 fingerprint (64 hex digits)",
                path.display(),
                n + 1
            )
        })?;
        out.insert(fp);
    }
    Ok(out)
}

/// Reads the certificate-to-thing attachments: `FINGERPRINT THING` per line (SHA-256 hex, colons
/// allowed, `#` comments), as IoT Core attaches a certificate to a thing.
pub fn read_things(path: &Path) -> anyhow::Result<HashMap<String, String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the things file {}", path.display()))?;
    let mut out = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let at = || format!("{} line {}", path.display(), n + 1);
        let (fp, thing) = line
            .split_once(char::is_whitespace)
            .ok_or_else(|| anyhow::anyhow!("{}: expected FINGERPRINT THING", at()))?;
        let fp = x509::parse_fingerprint(fp).ok_or_else(|| {
            anyhow::anyhow!("{}: not a SHA-256 fingerprint (64 hex digits)", at())
        })?;
        let thing = thing.trim();
        if thing.is_empty() || thing.len() > 128 || thing.contains(['+', '#', '/']) {
            anyhow::bail!("{}: {thing:?} cannot be a thing name", at());
        }
        if out.insert(fp, thing.to_string()).is_some() {
            anyhow::bail!("{}: the certificate is attached twice", at());
        }
    }
    Ok(out)
}

fn load(cfg: &TlsConfig) -> anyhow::Result<Loaded> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = read_certs(&cfg.cert)?;
    let key = PrivateKeyDer::from_pem_file(&cfg.key)
        .with_context(|| format!("{}: no usable private key (PEM)", cfg.key.display()))?;
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("TLS versions")?;
    let builder = match (&cfg.client_ca, cfg.client_certs) {
        (Some(ca), ClientCerts::Required | ClientCerts::Optional) => {
            let mut roots = RootCertStore::empty();
            for c in read_certs(ca)? {
                roots
                    .add(c)
                    .with_context(|| format!("{}: not a usable CA certificate", ca.display()))?;
            }
            let mut crls = Vec::new();
            for path in &cfg.crl {
                crls.extend(read_crls(path)?);
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .with_crls(crls);
            let verifier = if cfg.client_certs == ClientCerts::Optional {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .context("cannot build the client certificate verifier")?,
            )
        }
        _ => builder.with_no_client_auth(),
    };
    let mut server = builder.with_single_cert(chain, key).with_context(|| {
        format!(
            "{} and {} do not make a usable certificate and key",
            cfg.cert.display(),
            cfg.key.display()
        )
    })?;
    // MQTT over TLS on 8883 needs no ALPN; IoT Core's "x-amzn-mqtt-ca" (for 443) is accepted.
    server.alpn_protocols = vec![];
    // Resumption keeps a reconnect storm cheap: session tickets (stateless) and a small cache.
    server.session_storage = rustls::server::ServerSessionMemoryCache::new(1024);
    server.ticketer = rustls::crypto::ring::Ticketer::new().context("TLS session tickets")?;
    // After the handshake the keys go to our record layer (tls_stream.rs), and the TLS 1.3
    // traffic secrets that key updates derive from come through the key log.
    server.enable_secret_extraction = true;
    let secrets = Arc::new(SecretLog::default());
    server.key_log = Arc::clone(&secrets) as Arc<dyn rustls::KeyLog>;
    let revoked = match &cfg.revoked {
        Some(p) => read_revoked(p)?,
        None => HashSet::new(),
    };
    let things = match &cfg.things {
        Some(p) => read_things(p)?,
        None => HashMap::new(),
    };
    Ok(Loaded {
        server: Arc::new(server),
        secrets,
        revoked,
        things,
    })
}

impl Tls {
    /// Loads the certificates; an error names the file.
    pub fn load(config: &TlsConfig) -> anyhow::Result<Self> {
        let loaded = load(config)?;
        Ok(Self {
            config: config.clone(),
            loaded: RwLock::new(Arc::new(loaded)),
        })
    }

    /// SIGHUP: reads every file again; on error the loaded ones stay.
    pub fn reload(&self) {
        match load(&self.config) {
            Ok(l) => {
                let revoked = l.revoked.len();
                *self.loaded.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(l);
                info!(
                    revoked,
                    "TLS certificates, CA, CRLs and revoked list reloaded"
                );
            }
            Err(e) => error!("TLS files not reloaded, the loaded ones stay: {e:#}"),
        }
    }

    /// Traffic secrets logged and not yet taken by their handshake.
    #[cfg(test)]
    pub fn pending_secrets(&self) -> usize {
        let loaded = self.loaded.read().unwrap_or_else(|p| p.into_inner());
        let n = loaded.secrets.pending.lock().unwrap().len();
        n
    }

    /// The handshake, and the device certificate's identity if it sent one.
    pub async fn accept(
        &self,
        mut tcp: TcpStream,
    ) -> Result<(TlsStream, Option<PeerCertificate>), HandshakeError> {
        let loaded = Arc::clone(&self.loaded.read().unwrap_or_else(|p| p.into_inner()));
        let mut conn = UnbufferedServerConnection::new(Arc::clone(&loaded.server))
            .map_err(|e| HandshakeError::Failed(tls_error(e)))?;
        let mut hs = Handshake::new(Arc::clone(&loaded.secrets));
        if let Err(e) = hs.run(&mut conn, &mut tcp).await {
            // The alert rustls queued, if any, so that the device learns why.
            let _ = hs.send_alert(&mut conn, &mut tcp).await;
            return Err(HandshakeError::Failed(e));
        }
        let peer = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|leaf| {
                let fingerprint = x509::fingerprint(leaf);
                PeerCertificate {
                    common_name: x509::subject_common_name(leaf),
                    thing_name: loaded.things.get(&fingerprint).cloned(),
                    fingerprint,
                }
            });
        if let Some(p) = &peer {
            if loaded.revoked.contains(&p.fingerprint) {
                return Err(HandshakeError::Revoked {
                    fingerprint: p.fingerprint.clone(),
                });
            }
        }
        let tls13 = conn.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3);
        let traffic = hs.secrets.take();
        // rustls's kernel connection (its key schedule, the peer's certificates, QUIC state:
        // ~1 KiB) is not kept: key updates derive from the traffic secrets.
        let (secrets, _) = conn
            .dangerous_into_kernel_connection()
            .map_err(|e| HandshakeError::Failed(tls_error(e)))?;
        let records = Records::new(secrets, tls13, traffic).map_err(HandshakeError::Failed)?;
        let stream = TlsStream::new(tcp, records, &hs.incoming[..hs.filled], &hs.early);
        Ok((stream, peer))
    }
}

fn tls_error(e: rustls::Error) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e)
}

/// The largest handshake flight a device may send (its certificate chain): rustls's limit for
/// one handshake message, and a little for record headers.
const MAX_HANDSHAKE_BYTES: usize = 0xffff + 4096;

/// Appends what rustls encodes to `outgoing`, growing it as rustls asks.
fn encode(
    outgoing: &mut Vec<u8>,
    mut encode: impl FnMut(&mut [u8]) -> Result<usize, EncodeError>,
) -> std::io::Result<()> {
    let at = outgoing.len();
    outgoing.resize(at + 1024, 0);
    loop {
        match encode(&mut outgoing[at..]) {
            Ok(n) => {
                outgoing.truncate(at + n);
                return Ok(());
            }
            Err(EncodeError::InsufficientSize(s)) => outgoing.resize(at + s.required_size, 0),
            Err(e) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    e.to_string(),
                ))
            }
        }
    }
}

/// rustls's key log, kept for one thing: the TLS 1.3 application traffic secrets, from which a
/// key update (RFC 8446 §4.6.3) derives the next keys. rustls gives its key schedule out only
/// inside a `KernelConnection`, which also holds the peer's certificates and QUIC state (~1 KiB
/// a connection, and 10 MiB of fragmented heap after a 10,000-device storm); the two secrets
/// are 64 or 96 bytes. Each handshake takes its own (by its ClientHello's random) before it
/// ends, or leaves nothing behind ([`Taken`]); a secret that is not the connection's own would
/// not derive its keys, and is not used ([`Records::new`]).
#[derive(Default)]
pub struct SecretLog {
    pending: std::sync::Mutex<HashMap<[u8; 32], Logged>>,
}

/// The client's and the server's traffic secrets of one handshake, as they are logged.
type Logged = (Option<TrafficSecret>, Option<TrafficSecret>);

impl std::fmt::Debug for SecretLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretLog")
    }
}

const CLIENT_TRAFFIC: &str = "CLIENT_TRAFFIC_SECRET_0";
const SERVER_TRAFFIC: &str = "SERVER_TRAFFIC_SECRET_0";

impl rustls::KeyLog for SecretLog {
    fn will_log(&self, label: &str) -> bool {
        label == CLIENT_TRAFFIC || label == SERVER_TRAFFIC
    }

    fn log(&self, label: &str, client_random: &[u8], secret: &[u8]) {
        let (Ok(random), Some(secret)) = (client_random.try_into(), TrafficSecret::new(secret))
        else {
            return;
        };
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let slot = pending.entry(random).or_default();
        match label {
            CLIENT_TRAFFIC => slot.0 = Some(secret),
            SERVER_TRAFFIC => slot.1 = Some(secret),
            _ => {}
        }
    }
}

/// One handshake's entry in the [`SecretLog`], removed when taken or when the handshake ends.
struct Taken {
    log: Arc<SecretLog>,
    random: Option<[u8; 32]>,
}

impl Taken {
    /// The client's and the server's traffic secrets, if both were logged.
    fn take(&mut self) -> Option<(TrafficSecret, TrafficSecret)> {
        let random = self.random.take()?;
        let mut pending = self.log.pending.lock().unwrap_or_else(|p| p.into_inner());
        match pending.remove(&random)? {
            (Some(c), Some(s)) => Some((c, s)),
            _ => None,
        }
    }

    /// Notes the ClientHello's random from the first record (RFC 8446 §4.1.2: record header
    /// (5), handshake type 1 and length (4), legacy version (2), then 32 bytes), before rustls
    /// takes any of it; true once done. A ClientHello split into records too short to hold its
    /// random is refused: its handshake's secrets could be neither found nor removed.
    fn note_client_hello(&mut self, first: &[u8]) -> std::io::Result<bool> {
        if first.len() < 5 {
            return Ok(false);
        }
        if first[0] == 22 && u16::from_be_bytes([first[3], first[4]]) < 38 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "a ClientHello split into TLS records of under 38 bytes (not supported)",
            ));
        }
        if first.len() < 43 {
            return Ok(false);
        }
        if first[0] == 22 && first[5] == 1 {
            // Anything else is not a ClientHello, and rustls refuses it.
            self.random = first[11..43].try_into().ok();
        }
        Ok(true)
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        let _ = self.take();
    }
}

/// A handshake's buffers: rustls's unbuffered API leaves them to the caller, so that what
/// follows the handshake's last record stays here for [`TlsStream`].
struct Handshake {
    secrets: Taken,
    /// Whether the ClientHello's first bytes were looked at.
    hello_seen: bool,
    incoming: Vec<u8>,
    filled: usize,
    outgoing: Vec<u8>,
    /// Application data that came with the handshake's last flight, decrypted by rustls.
    early: Vec<u8>,
}

impl Handshake {
    fn new(log: Arc<SecretLog>) -> Self {
        Self {
            secrets: Taken { log, random: None },
            hello_seen: false,
            incoming: Vec::new(),
            filled: 0,
            outgoing: Vec::new(),
            early: Vec::new(),
        }
    }

    async fn run(
        &mut self,
        conn: &mut UnbufferedServerConnection,
        tcp: &mut TcpStream,
    ) -> std::io::Result<()> {
        loop {
            let UnbufferedStatus { discard, state } =
                conn.process_tls_records(&mut self.incoming[..self.filled]);
            let mut read_more = false;
            match state.map_err(tls_error)? {
                ConnectionState::ReadTraffic(mut r) => {
                    while let Some(rec) = r.next_record() {
                        self.early
                            .extend_from_slice(rec.map_err(tls_error)?.payload);
                    }
                }
                ConnectionState::EncodeTlsData(mut e) => {
                    encode(&mut self.outgoing, |out| e.encode(out))?
                }
                ConnectionState::TransmitTlsData(t) => {
                    tcp.write_all(&self.outgoing).await?;
                    self.outgoing = Vec::new();
                    t.done();
                }
                ConnectionState::BlockedHandshake => read_more = true,
                // Once the device's Finished is in (a TLS 1.3 server may write before).
                ConnectionState::WriteTraffic(_) => read_more = true,
                ConnectionState::PeerClosed | ConnectionState::Closed => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the device closed TLS during the handshake",
                    ))
                }
                _ => return Err(tls_error(rustls::Error::General("early data".into()))),
            }
            self.incoming.copy_within(discard..self.filled, 0);
            self.filled -= discard;
            if read_more {
                if !conn.is_handshaking() {
                    return Ok(());
                }
                self.read(tcp).await?;
            }
        }
    }

    /// Reads what the device sent. A handshake waiting for its device holds no buffer: at
    /// 2,000 handshakes a second, a slow fleet keeps hundreds waiting.
    async fn read(&mut self, tcp: &mut TcpStream) -> std::io::Result<()> {
        loop {
            if self.filled == 0 {
                self.incoming = Vec::new();
            }
            tcp.readable().await?;
            if self.filled == self.incoming.len() {
                if self.incoming.len() >= MAX_HANDSHAKE_BYTES {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "TLS handshake flight over 68 KiB",
                    ));
                }
                let len = (self.incoming.len() * 2).clamp(4096, MAX_HANDSHAKE_BYTES);
                self.incoming.resize(len, 0);
            }
            match tcp.try_read(&mut self.incoming[self.filled..]) {
                Ok(0) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the device closed the connection during the TLS handshake",
                    ))
                }
                Ok(n) => {
                    self.filled += n;
                    if !self.hello_seen {
                        let first = &self.incoming[..self.filled];
                        self.hello_seen = self.secrets.note_client_hello(first)?;
                    }
                    return Ok(());
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Best effort: after a failure, what rustls queued (its alert) goes out.
    async fn send_alert(
        &mut self,
        conn: &mut UnbufferedServerConnection,
        tcp: &mut TcpStream,
    ) -> std::io::Result<()> {
        self.outgoing.clear();
        while let UnbufferedStatus {
            state: Ok(ConnectionState::EncodeTlsData(mut e)),
            ..
        } = conn.process_tls_records(&mut [])
        {
            encode(&mut self.outgoing, |out| e.encode(out))?;
        }
        if !self.outgoing.is_empty() {
            tcp.write_all(&self.outgoing).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn things_files_attach_certificates_and_bad_lines_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("things.txt");
        let fp = "ab".repeat(32);
        std::fs::write(
            &p,
            format!(
                "# attachments\n{}  sensor-9  # AWS-made\n",
                fp.to_uppercase()
            ),
        )
        .unwrap();
        let t = read_things(&p).unwrap();
        assert_eq!(t.get(&fp).map(String::as_str), Some("sensor-9"));
        for (body, says) in [
            ("abc sensor", "line 1: not a SHA-256"),
            (&fp.clone(), "expected FINGERPRINT THING"),
            (&format!("{fp} a/b"), "cannot be a thing name"),
            (
                &format!("{fp} a\n{fp} b"),
                "line 2: the certificate is attached twice",
            ),
        ] {
            std::fs::write(&p, body).unwrap();
            let e = read_things(&p).unwrap_err().to_string();
            assert!(e.contains(says), "{body}: {e}");
        }
    }
}
