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
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tracing::{error, info};

use crate::config::{ClientCerts, TlsConfig};
use crate::ingress::auth::{x509, PeerCertificate};

struct Loaded {
    acceptor: tokio_rustls::TlsAcceptor,
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
    let revoked = match &cfg.revoked {
        Some(p) => read_revoked(p)?,
        None => HashSet::new(),
    };
    let things = match &cfg.things {
        Some(p) => read_things(p)?,
        None => HashMap::new(),
    };
    Ok(Loaded {
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
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

    /// The handshake, and the device certificate's identity if it sent one.
    pub async fn accept(
        &self,
        stream: TcpStream,
    ) -> Result<(TlsStream<TcpStream>, Option<PeerCertificate>), HandshakeError> {
        let loaded = Arc::clone(&self.loaded.read().unwrap_or_else(|p| p.into_inner()));
        let tls = loaded
            .acceptor
            .accept(stream)
            .await
            .map_err(HandshakeError::Failed)?;
        let peer = tls
            .get_ref()
            .1
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
        Ok((tls, peer))
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
