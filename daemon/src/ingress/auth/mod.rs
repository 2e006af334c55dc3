//! Who a device is and what it may do, for the front door.
//!
//! Identity comes from the connection: a client certificate verified by rustls during the TLS
//! handshake (its subject common name is the thing name, [`x509`]), or a username and password
//! in CONNECT checked against a `mosquitto_passwd` file ([`passwords`]), or nothing (an
//! anonymous client, where the listener allows it). Authorization is IoT Core's: policy
//! documents ([`policy`]) attached to every device, a thing name or a certificate fingerprint,
//! checked at CONNECT (`iot:Connect`), at every PUBLISH (`iot:Publish`, `iot:RetainPublish`),
//! SUBSCRIBE (`iot:Subscribe`) and delivery (`iot:Receive`). With no policy configured every
//! request is allowed (the trusted-loopback setup of earlier versions).
//!
//! The password file and the policies are reloaded on SIGHUP; a reload that fails keeps what
//! was loaded. Connections see the new policies at their next check.

pub mod passwords;
pub mod policy;
pub mod x509;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tracing::{error, info};

use self::passwords::Passwords;
use self::policy::{Action, Decision, Policy, Principal};

/// Where a policy applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Every client.
    All,
    /// Clients with neither certificate nor credentials (where a listener allows them: the
    /// loopback listener of the packaged config, for processes on the gateway).
    Anonymous,
    /// A thing name: a certificate's common name, or a password user's username.
    Thing(String),
    /// A certificate, by SHA-256 fingerprint (lower-case hex).
    Certificate(String),
}

impl Target {
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "*" => return Ok(Target::All),
            "anonymous" => return Ok(Target::Anonymous),
            _ => {}
        }
        match text.split_once(':') {
            Some(("thing", name)) if !name.is_empty() => Ok(Target::Thing(name.into())),
            Some(("certificate", fp)) => x509::parse_fingerprint(fp)
                .map(Target::Certificate)
                .ok_or_else(|| {
                    format!("{text:?}: a certificate is named by its SHA-256 fingerprint (64 hex digits)")
                }),
            _ => Err(format!(
                "{text:?}: attach to \"*\" (every client), \"anonymous\", \"thing:NAME\" or \"certificate:SHA256\""
            )),
        }
    }

    fn applies(&self, id: &Identity) -> bool {
        match self {
            Target::All => true,
            Target::Anonymous => id.method == "anonymous",
            Target::Thing(t) => id.principal.thing_name.as_deref() == Some(t.as_str()),
            Target::Certificate(f) => id.fingerprint.as_deref() == Some(f.as_str()),
        }
    }
}

/// A policy file and where it is attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyFile {
    pub file: PathBuf,
    pub attach: Vec<Target>,
}

/// `ingress.frontdoor.auth`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthConfig {
    pub password_file: Option<PathBuf>,
    pub policies: Vec<PolicyFile>,
}

/// What is loaded from the files.
#[derive(Debug, Default)]
struct Loaded {
    passwords: Option<Passwords>,
    policies: Vec<(Policy, Vec<Target>)>,
}

impl Loaded {
    fn load(cfg: &AuthConfig) -> anyhow::Result<Self> {
        let passwords = cfg
            .password_file
            .as_deref()
            .map(Passwords::load)
            .transpose()?;
        let mut policies = Vec::new();
        for p in &cfg.policies {
            let text = std::fs::read_to_string(&p.file).map_err(|e| {
                anyhow::anyhow!("cannot read the policy file {}: {e}", p.file.display())
            })?;
            let name = p.file.file_stem().map_or_else(
                || p.file.display().to_string(),
                |s| s.to_string_lossy().into_owned(),
            );
            let policy = Policy::parse(&name, &text)
                .map_err(|e| anyhow::anyhow!("policy file {}: {e}", p.file.display()))?;
            policies.push((policy, p.attach.clone()));
        }
        Ok(Self {
            passwords,
            policies,
        })
    }
}

/// The loaded password file and policies, swapped whole on reload.
#[derive(Debug)]
pub struct Auth {
    config: AuthConfig,
    loaded: RwLock<Arc<Loaded>>,
    /// Bumped at every successful reload: connections recompute their policies.
    generation: AtomicU64,
}

/// How a CONNECT was answered.
#[derive(Debug)]
pub enum Authenticated {
    Yes(Identity),
    /// A username the file does not hold, or a wrong password (CONNACK "bad user name or
    /// password").
    BadCredentials,
    /// No identity where one is required, or `iot:Connect` denied (CONNACK "not authorized").
    NotAuthorized(String),
}

/// What the TLS handshake established.
#[derive(Debug, Clone, Default)]
pub struct PeerCertificate {
    pub common_name: Option<String>,
    pub fingerprint: String,
    /// The thing the certificate is attached to in `tls.things`, if listed there.
    pub thing_name: Option<String>,
}

/// A connected device: who it is, and its policies.
#[derive(Debug)]
pub struct Identity {
    pub principal: Principal,
    pub username: Option<String>,
    pub fingerprint: Option<String>,
    /// How it proved who it is: "certificate", "password" or "anonymous".
    pub method: &'static str,
    auth: Arc<Auth>,
    /// The policies attached, as of a reload generation; None when none are configured at all
    /// (everything is allowed).
    attached: Mutex<(u64, Option<Arc<Vec<Policy>>>)>,
}

impl Auth {
    /// Loads the files; an error names the file and the problem.
    pub fn load(config: AuthConfig) -> anyhow::Result<Arc<Self>> {
        let loaded = Loaded::load(&config)?;
        if let Some(p) = &loaded.passwords {
            info!(users = p.len(), "password file loaded");
        }
        if !loaded.policies.is_empty() {
            info!(
                policies = loaded.policies.len(),
                "IoT policies loaded: every request is checked"
            );
        }
        Ok(Arc::new(Self {
            config,
            loaded: RwLock::new(Arc::new(loaded)),
            generation: AtomicU64::new(0),
        }))
    }

    /// Everything allowed, nothing loaded (the tests' and the embedded broker's default).
    pub fn open() -> Arc<Self> {
        Arc::new(Self {
            config: AuthConfig::default(),
            loaded: RwLock::new(Arc::new(Loaded::default())),
            generation: AtomicU64::new(0),
        })
    }

    fn current(&self) -> Arc<Loaded> {
        Arc::clone(&self.loaded.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// SIGHUP: reads the files again; on error the loaded ones stay.
    pub fn reload(&self) {
        match Loaded::load(&self.config) {
            Ok(l) => {
                let users = l.passwords.as_ref().map(Passwords::len);
                let policies = l.policies.len();
                *self.loaded.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(l);
                self.generation.fetch_add(1, Ordering::Release);
                info!(?users, policies, "password file and policies reloaded");
            }
            Err(e) => error!("password file or policies not reloaded, the loaded ones stay: {e:#}"),
        }
    }

    /// Authenticates a CONNECT and checks `iot:Connect`.
    pub fn connect(
        self: &Arc<Self>,
        client_id: &str,
        certificate: Option<&PeerCertificate>,
        login: Option<(&str, &[u8])>,
        anonymous_allowed: bool,
    ) -> Authenticated {
        let loaded = self.current();
        let (method, username) =
            match (certificate, login, &loaded.passwords) {
                // A certificate is the identity; credentials beside it are checked when a password
                // file is configured (a wrong password is refused all the same).
                (_, Some((user, pw)), Some(file)) => {
                    if !file.verify(user, pw) {
                        return Authenticated::BadCredentials;
                    }
                    (
                        if certificate.is_some() {
                            "certificate"
                        } else {
                            "password"
                        },
                        Some(user.to_string()),
                    )
                }
                (Some(_), _, _) => ("certificate", None),
                (None, _, _) if anonymous_allowed => ("anonymous", None),
                (None, Some(_), None) => {
                    return Authenticated::NotAuthorized(
                        "credentials given, but no password file is configured".into(),
                    )
                }
                (None, None, _) => return Authenticated::NotAuthorized(
                    "no client certificate and no username: anonymous clients are not allowed here"
                        .into(),
                ),
            };
        let common_name = certificate.and_then(|c| c.common_name.clone());
        // The thing: the one the certificate is attached to (`tls.things`), else its common
        // name, else the password user's name.
        let thing_name = certificate
            .and_then(|c| c.thing_name.clone())
            .or_else(|| common_name.clone())
            .or_else(|| username.clone());
        let principal = Principal {
            client_id: client_id.to_string(),
            thing_name,
            common_name,
        };
        let id = Identity {
            principal,
            username,
            fingerprint: certificate.map(|c| c.fingerprint.clone()),
            method,
            auth: Arc::clone(self),
            attached: Mutex::new((u64::MAX, None)),
        };
        let d = id.check(Action::Connect, client_id);
        if d.allowed {
            Authenticated::Yes(id)
        } else {
            Authenticated::NotAuthorized(d.reason.into_owned())
        }
    }
}

impl Identity {
    /// An identity outside any listener: `edgehose policy test`.
    pub fn for_test(auth: &Arc<Auth>, principal: Principal, fingerprint: Option<String>) -> Self {
        // Neither certificate nor thing name: as an anonymous client.
        let method = if principal.thing_name.is_none() && fingerprint.is_none() {
            "anonymous"
        } else {
            "certificate"
        };
        Self {
            principal,
            username: None,
            fingerprint,
            method,
            auth: Arc::clone(auth),
            attached: Mutex::new((u64::MAX, None)),
        }
    }

    /// Whether policies are enforced at all (any loaded).
    pub fn enforced(&self) -> bool {
        self.policies().is_some()
    }

    /// The policies attached to this device as of the last reload; None when no policy is
    /// configured.
    fn policies(&self) -> Option<Arc<Vec<Policy>>> {
        let generation = self.auth.generation.load(Ordering::Acquire);
        let mut attached = self.attached.lock().unwrap_or_else(|p| p.into_inner());
        if attached.0 != generation {
            let loaded = self.auth.current();
            let list = (!loaded.policies.is_empty()).then(|| {
                Arc::new(
                    loaded
                        .policies
                        .iter()
                        .filter(|(_, targets)| targets.iter().any(|t| t.applies(self)))
                        .map(|(p, _)| p.clone())
                        .collect(),
                )
            });
            *attached = (generation, list);
        }
        attached.1.clone()
    }

    /// May this device do `action` on `name`? Allowed when no policy is configured.
    pub fn check(&self, action: Action, name: &str) -> Decision {
        match self.policies() {
            None => Decision {
                allowed: true,
                reason: "no policies configured".into(),
            },
            Some(list) => policy::evaluate(list.iter(), &self.principal, action, name),
        }
    }

    /// The generation the answers of [`Identity::check`] belong to (a cache keyed on it is
    /// cleared by a reload).
    pub fn generation(&self) -> u64 {
        self.auth.generation.load(Ordering::Acquire)
    }
}
