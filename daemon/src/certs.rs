//! `edgehose certs`: what a site needs to run the front door with mutual TLS, without openssl
//! incantations: a CA, the gateway's server certificate for its host names and addresses,
//! device certificates (common name = the device's id, which policies see as its thing name),
//! and revocation (a deny list of fingerprints and a CRL signed by the CA). Keys are ECDSA
//! P-256, written 0600. An existing CA in the directory is reused, so devices can be added
//! later.
//!
//! ```text
//! DIR/ca.crt ca.key                  the CA (trust it on devices: --cafile)
//! DIR/server.crt server.key          the gateway's certificate (ingress.frontdoor.tls)
//! DIR/devices/ID.crt ID.key          one per device
//! DIR/revoked.txt, DIR/ca.crl        revoked devices (ingress.frontdoor.tls.revoked / .crl)
//! ```

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SanType, SerialNumber,
};

use crate::ingress::auth::x509;

/// What to make.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub dir: PathBuf,
    /// DNS names and IP addresses the server certificate is for (none: leave it as it is, or
    /// make one for localhost and this host's name if there is none).
    pub hosts: Vec<String>,
    pub devices: Vec<String>,
    /// Devices whose certificates are revoked.
    pub revoke: Vec<String>,
    /// Validity of new certificates, in days (from yesterday, for clocks a little behind).
    pub days: u32,
}

const CA_NAME: &str = "edgehose device CA";

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(days.into());
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::Rng::fill(&mut rand::rng(), &mut bytes[..]);
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // and no leading zero byte to trim
    SerialNumber::from(bytes.to_vec())
}

fn ca_params(days: u32) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.key_identifier_method = KeyIdMethod::Sha256;
    validity(&mut p, days);
    p
}

/// The CA in `dir`, made if missing. Returns whether it was made.
fn ca(dir: &Path, days: u32) -> anyhow::Result<(Issuer<'static, KeyPair>, bool)> {
    let (crt, key) = (dir.join("ca.crt"), dir.join("ca.key"));
    match (crt.exists(), key.exists()) {
        (true, true) => {
            let key_pem = std::fs::read_to_string(&key)
                .with_context(|| format!("cannot read {}", key.display()))?;
            let key = KeyPair::from_pem(&key_pem).context("ca.key is not a usable key")?;
            let der = rustls::pki_types::pem::PemObject::from_pem_file(&crt)
                .map(|c: rustls::pki_types::CertificateDer<'static>| c.to_vec())
                .with_context(|| format!("cannot read {}", crt.display()))?;
            if x509::subject_common_name(&der).as_deref() != Some(CA_NAME) {
                bail!(
                    "{} was not made by `edgehose certs` (its subject is not {CA_NAME:?}): \
                     sign device certificates with the tool that made it",
                    crt.display()
                );
            }
            // The issuer's name and key identifier come from the name and the key: the same
            // parameters sign as the certificate on disk does.
            Ok((Issuer::new(ca_params(days), key), false))
        }
        (false, false) => {
            let key = KeyPair::generate().context("cannot make a key")?;
            let mut params = ca_params(days.max(3650));
            params.serial_number = Some(random_serial());
            let cert = params.self_signed(&key).context("cannot sign the CA")?;
            write_file(&crt, cert.pem().as_bytes(), 0o644)?;
            write_file(&dir.join("ca.key"), key.serialize_pem().as_bytes(), 0o600)?;
            Ok((Issuer::new(params, key), true))
        }
        _ => bail!(
            "{} holds one of ca.crt and ca.key without the other",
            dir.display()
        ),
    }
}

fn leaf(
    issuer: &Issuer<'static, KeyPair>,
    common_name: &str,
    sans: Vec<SanType>,
    usage: ExtendedKeyUsagePurpose,
    days: u32,
    crt: &Path,
    key_path: &Path,
) -> anyhow::Result<()> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    p.distinguished_name = dn;
    p.subject_alt_names = sans;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![usage];
    p.use_authority_key_identifier_extension = true;
    p.serial_number = Some(random_serial());
    validity(&mut p, days);
    let key = KeyPair::generate().context("cannot make a key")?;
    let cert = p
        .signed_by(&key, issuer)
        .with_context(|| format!("cannot sign {common_name:?}"))?;
    write_file(crt, cert.pem().as_bytes(), 0o644)?;
    write_file(key_path, key.serialize_pem().as_bytes(), 0o600)?;
    Ok(())
}

/// A device id must be a usable file name and MQTT client id.
fn check_device_id(id: &str) -> anyhow::Result<()> {
    if id.is_empty()
        || id.len() > 128
        || id.starts_with('.')
        || id.contains(['/', '+', '#', '\0', '\\'])
        || id.chars().any(char::is_control)
    {
        bail!("{id:?} cannot be a device id (1-128 characters, no '/', '+', '#', control characters, no leading '.')");
    }
    Ok(())
}

/// Makes what `req` asks for; returns the lines to print.
pub fn run(req: &Request) -> anyhow::Result<Vec<String>> {
    let days = if req.days == 0 { 825 } else { req.days };
    std::fs::create_dir_all(req.dir.join("devices"))
        .with_context(|| format!("cannot create {}", req.dir.display()))?;
    let mut said = Vec::new();
    let (issuer, made) = ca(&req.dir, days)?;
    if made {
        said.push(format!("made the CA: {}", req.dir.join("ca.crt").display()));
    }
    let server = req.dir.join("server.crt");
    if !req.hosts.is_empty() || !server.exists() {
        let mut hosts = req.hosts.clone();
        if hosts.is_empty() {
            hosts = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
            if let Ok(h) = std::fs::read_to_string("/etc/hostname") {
                let h = h.trim();
                if !h.is_empty() {
                    hosts.push(h.to_string());
                }
            }
        }
        let sans = hosts
            .iter()
            .map(|h| match h.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => h
                    .clone()
                    .try_into()
                    .map(SanType::DnsName)
                    .map_err(|_| anyhow::anyhow!("{h:?} is not a host name or an address")),
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        leaf(
            &issuer,
            &hosts[0],
            sans,
            ExtendedKeyUsagePurpose::ServerAuth,
            days,
            &server,
            &req.dir.join("server.key"),
        )?;
        said.push(format!(
            "made the server certificate for {}: {}",
            hosts.join(", "),
            server.display()
        ));
    }
    for id in &req.devices {
        check_device_id(id)?;
        let crt = req.dir.join("devices").join(format!("{id}.crt"));
        leaf(
            &issuer,
            id,
            Vec::new(),
            ExtendedKeyUsagePurpose::ClientAuth,
            days,
            &crt,
            &req.dir.join("devices").join(format!("{id}.key")),
        )?;
        said.push(format!("made device {id}: {}", crt.display()));
    }
    if !req.revoke.is_empty() {
        said.extend(revoke(&req.dir, &issuer, &req.revoke)?);
    }
    Ok(said)
}

/// Adds devices to `revoked.txt` (fingerprints) and rewrites `ca.crl` with every device listed
/// there.
fn revoke(
    dir: &Path,
    issuer: &Issuer<'static, KeyPair>,
    ids: &[String],
) -> anyhow::Result<Vec<String>> {
    let list = dir.join("revoked.txt");
    // A missing list is an empty one; an unreadable one is an error (rewriting it would drop
    // every revocation in it).
    let mut text = match std::fs::read_to_string(&list) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(anyhow::anyhow!("cannot read {}: {e}", list.display())),
    };
    let mut said = Vec::new();
    let der_of = |id: &str| -> anyhow::Result<Vec<u8>> {
        let path = dir.join("devices").join(format!("{id}.crt"));
        rustls::pki_types::pem::PemObject::from_pem_file(&path)
            .map(|c: rustls::pki_types::CertificateDer<'static>| c.to_vec())
            .with_context(|| format!("cannot read {}", path.display()))
    };
    for id in ids {
        check_device_id(id)?;
        let fp = x509::fingerprint(&der_of(id)?);
        if !text.contains(&fp) {
            text.push_str(&format!("{fp}  # {id}\n"));
        }
        said.push(format!("revoked device {id} ({fp})"));
    }
    write_file(&list, text.as_bytes(), 0o644)?;
    // The CRL lists the serial of every revoked certificate still on disk.
    let mut revoked = Vec::new();
    for line in text.lines() {
        let Some((_, id)) = line.split_once("# ") else {
            continue;
        };
        // A revoked certificate that cannot be read cannot be listed: say so rather than write
        // a CRL that silently lets it back in.
        let id = id.trim();
        let serial = x509::serial(&der_of(id)?).ok_or_else(|| {
            anyhow::anyhow!("devices/{id}.crt: no serial number, cannot put it in the CRL")
        })?;
        revoked.push(RevokedCertParams {
            serial_number: SerialNumber::from(serial),
            revocation_time: time::OffsetDateTime::now_utc(),
            reason_code: Some(rcgen::RevocationReason::KeyCompromise),
            invalidity_date: None,
        });
    }
    let now = time::OffsetDateTime::now_utc();
    let crl = CertificateRevocationListParams {
        this_update: now,
        next_update: now + time::Duration::days(30),
        crl_number: SerialNumber::from(chrono::Utc::now().timestamp() as u64),
        issuing_distribution_point: None,
        revoked_certs: revoked,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let crl = crl.signed_by(issuer).context("cannot sign the CRL")?;
    write_file(
        &dir.join("ca.crl"),
        crl.pem().context("CRL to PEM")?.as_bytes(),
        0o644,
    )?;
    said.push(format!(
        "wrote {} and {}",
        list.display(),
        dir.join("ca.crl").display()
    ));
    Ok(said)
}
