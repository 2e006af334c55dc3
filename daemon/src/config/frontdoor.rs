//! `[ingress.frontdoor]`: the front door's listeners (plain MQTT and MQTT over TLS), its limits,
//! and who may connect and do what (`[ingress.frontdoor.auth]`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserialize;

use super::{one_of, parse_addr, ConfigError};
use crate::ingress::auth::{AuthConfig, PolicyFile, Target};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFrontDoor {
    listen: Option<String>,
    anonymous: Option<bool>,
    max_connections: Option<usize>,
    max_connections_per_address: Option<usize>,
    limit_loopback: Option<bool>,
    receive_maximum: Option<u16>,
    #[serde(default, with = "humantime_serde")]
    connect_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    packet_timeout: Option<Duration>,
    partial_packet_budget: Option<ByteSize>,
    max_bytes_per_second: Option<ByteSize>,
    tls: Option<RawTls>,
    #[serde(default)]
    auth: RawAuth,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    listen: Option<String>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
    client_certs: Option<String>,
    #[serde(default)]
    crl: Vec<PathBuf>,
    revoked: Option<PathBuf>,
    things: Option<PathBuf>,
    anonymous: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    password_file: Option<PathBuf>,
    #[serde(default)]
    policies: Vec<RawPolicy>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    file: PathBuf,
    attach: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FrontDoorConfig {
    /// The plain MQTT listener; None when only TLS listens.
    pub listen: Option<SocketAddr>,
    /// Whether clients with neither certificate nor credentials may use the plain listener.
    pub anonymous: bool,
    pub max_connections: usize,
    /// Connections one source address may hold at once (per listener); 0: no limit.
    pub max_connections_per_address: usize,
    /// Whether loopback peers (processes on the gateway) count against that limit.
    pub limit_loopback: bool,
    /// QoS 1 publishes a connection may have waiting for their commit (MQTT 5 Receive Maximum).
    pub receive_maximum: u16,
    /// TCP accept to CONNECT read, TLS handshake included.
    pub connect_timeout: Duration,
    /// A packet whose first byte has arrived must be complete within this, whatever the
    /// keep-alive (a half-sent packet otherwise holds its buffer and slot for ever).
    pub packet_timeout: Duration,
    /// Bytes all connections together may hold in packets still arriving (beyond a small
    /// allowance each); a connection that would pass it stops reading until room frees.
    pub partial_packet_budget: u64,
    /// Bytes per second one connection may send; past it the connection is not read until its
    /// rate allows (0: no limit).
    pub max_bytes_per_second: u64,
    pub tls: Option<TlsConfig>,
    pub auth: AuthConfig,
}

/// Whether the TLS listener asks devices for a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientCerts {
    /// A device without a valid certificate is refused in the handshake (IoT Core's mTLS).
    Required,
    /// A certificate is verified if sent; devices without one need a username and password
    /// (or `anonymous = true`).
    Optional,
    /// Not asked for.
    None,
}

/// `[ingress.frontdoor.tls]`.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsConfig {
    pub listen: SocketAddr,
    /// The server's certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates (PEM) that device certificates must chain to.
    pub client_ca: Option<PathBuf>,
    pub client_certs: ClientCerts,
    /// Certificate revocation lists (PEM or DER) from the client CA.
    pub crl: Vec<PathBuf>,
    /// A deny list: SHA-256 fingerprints of revoked device certificates, one per line.
    pub revoked: Option<PathBuf>,
    /// Certificates attached to things (`FINGERPRINT THING` per line); an unlisted
    /// certificate's thing is its subject common name.
    pub things: Option<PathBuf>,
    /// Whether clients with neither certificate nor credentials may connect.
    pub anonymous: bool,
}

impl RawFrontDoor {
    pub(super) fn validate(self) -> Result<FrontDoorConfig, ConfigError> {
        let listen = match self.listen.as_deref().unwrap_or("127.0.0.1:1883") {
            "off" => None,
            l => Some(parse_addr("ingress.frontdoor.listen", l)?),
        };
        let max_connections = self.max_connections.unwrap_or(10_000);
        if max_connections == 0 {
            return Err(ConfigError::new(
                "ingress.frontdoor.max_connections",
                "must be at least 1",
            ));
        }
        let receive_maximum = self.receive_maximum.unwrap_or(64);
        if receive_maximum == 0 {
            return Err(ConfigError::new(
                "ingress.frontdoor.receive_maximum",
                "must be at least 1",
            ));
        }
        let tls = self.tls.map(RawTls::validate).transpose()?;
        if listen.is_none() && tls.is_none() {
            return Err(ConfigError::new(
                "ingress.frontdoor.listen",
                "is \"off\" and there is no [ingress.frontdoor.tls]: nothing would listen",
            ));
        }
        let auth = self.auth.validate()?;
        if matches!(&tls, Some(t) if t.client_certs == ClientCerts::Optional && !t.anonymous)
            && auth.password_file.is_none()
        {
            return Err(ConfigError::new(
                "ingress.frontdoor.tls.client_certs",
                "is \"optional\" but there is no auth.password_file and anonymous = false: a \
                 device without a certificate could never connect (make it \"required\")",
            ));
        }
        Ok(FrontDoorConfig {
            listen,
            anonymous: self.anonymous.unwrap_or(true),
            max_connections,
            max_connections_per_address: self.max_connections_per_address.unwrap_or(1_000),
            limit_loopback: self.limit_loopback.unwrap_or(false),
            receive_maximum,
            connect_timeout: self.connect_timeout.unwrap_or(Duration::from_secs(10)),
            packet_timeout: self.packet_timeout.unwrap_or(Duration::from_secs(60)),
            partial_packet_budget: self
                .partial_packet_budget
                .map_or(64 << 20, |b| b.as_u64())
                .max(1 << 20),
            // Generous for telemetry (IoT Core allows 512 KiB/s per connection), well below
            // what one client flooding its socket reaches over a LAN.
            max_bytes_per_second: self.max_bytes_per_second.map_or(8 << 20, |b| b.as_u64()),
            tls,
            auth,
        })
    }
}

impl RawTls {
    fn validate(self) -> Result<TlsConfig, ConfigError> {
        let listen = parse_addr(
            "ingress.frontdoor.tls.listen",
            self.listen.as_deref().unwrap_or("0.0.0.0:8883"),
        )?;
        let cert = self.cert.ok_or_else(|| {
            ConfigError::new(
                "ingress.frontdoor.tls.cert",
                "is required (the server's certificate chain, PEM)",
            )
        })?;
        let key = self.key.ok_or_else(|| {
            ConfigError::new(
                "ingress.frontdoor.tls.key",
                "is required (the server's private key, PEM)",
            )
        })?;
        let default = if self.client_ca.is_some() {
            ClientCerts::Required
        } else {
            ClientCerts::None
        };
        let client_certs = one_of(
            "ingress.frontdoor.tls.client_certs",
            self.client_certs.as_deref(),
            default,
            &[
                ("required", ClientCerts::Required),
                ("optional", ClientCerts::Optional),
                ("none", ClientCerts::None),
            ],
        )?;
        if client_certs != ClientCerts::None && self.client_ca.is_none() {
            return Err(ConfigError::new(
                "ingress.frontdoor.tls.client_ca",
                "is required to verify device certificates (client_certs is not \"none\")",
            ));
        }
        if (!self.crl.is_empty() || self.revoked.is_some()) && client_certs == ClientCerts::None {
            return Err(ConfigError::new(
                "ingress.frontdoor.tls.crl",
                "revocation needs device certificates (client_certs is \"none\")",
            ));
        }
        Ok(TlsConfig {
            listen,
            cert,
            key,
            client_ca: self.client_ca,
            client_certs,
            crl: self.crl,
            revoked: self.revoked,
            things: self.things,
            anonymous: self.anonymous.unwrap_or(false),
        })
    }
}

impl RawAuth {
    fn validate(self) -> Result<AuthConfig, ConfigError> {
        let mut policies = Vec::new();
        for (i, p) in self.policies.into_iter().enumerate() {
            let key = format!("ingress.frontdoor.auth.policies[{i}].attach");
            if p.attach.is_empty() {
                return Err(ConfigError::new(
                    key,
                    "attaches the policy nowhere: use [\"*\"], \"anonymous\", \"thing:NAME\" or \"certificate:SHA256\"",
                ));
            }
            let attach = p
                .attach
                .iter()
                .map(|t| Target::parse(t).map_err(|e| ConfigError::new(&key, e)))
                .collect::<Result<_, _>>()?;
            policies.push(PolicyFile {
                file: p.file,
                attach,
            });
        }
        Ok(AuthConfig {
            password_file: self.password_file,
            policies,
        })
    }
}
