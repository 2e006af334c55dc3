//! What the front door reads from a device's certificate once rustls has verified it: the
//! subject's common name (the device's thing name, as IoT Core's
//! `${iot:Certificate.Subject.CommonName}`) and the SHA-256 fingerprint (the deny list's key).
//! A few lines of DER walking rather than a full X.509 parser: the certificate is already
//! verified, and only the subject is read.

/// The certificate's SHA-256, lower-case hex (what `openssl x509 -fingerprint -sha256` prints,
/// without the colons).
pub fn fingerprint(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A SHA-256 fingerprint as people write it (hex, any case, colons allowed), in the form
/// [`fingerprint`] gives; None when it is not one.
pub fn parse_fingerprint(text: &str) -> Option<String> {
    let fp: String = text
        .chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_ascii_lowercase();
    (fp.len() == 64 && fp.chars().all(|c| c.is_ascii_hexdigit())).then_some(fp)
}

/// One DER element: (tag, contents, rest).
fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    if tag & 0x1f == 0x1f {
        return None; // high tag numbers do not occur where we look
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | b as usize);
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;
const COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];

/// The certificate's serial number (its DER INTEGER contents), as CRLs name it.
pub fn serial(der: &[u8]) -> Option<Vec<u8>> {
    let (tag, cert, _) = element(der)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, tbs, _) = element(cert)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, body, rest) = element(tbs)?;
    let (tag, body) = if tag == 0xa0 {
        let (t, b, _) = element(rest)?;
        (t, b)
    } else {
        (tag, body)
    };
    (tag == 0x02).then(|| body.to_vec())
}

/// The subject's (last) common name, or None when it has none or the DER is not a certificate.
pub fn subject_common_name(der: &[u8]) -> Option<String> {
    let (tag, cert, _) = element(der)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, mut tbs, _) = element(cert)?;
    if tag != SEQUENCE {
        return None;
    }
    // [0] version (optional), serial, signature algorithm, issuer, validity, subject.
    let (tag, _, rest) = element(tbs)?;
    if tag == 0xa0 {
        tbs = rest;
        tbs = element(tbs)?.2; // serial
    } else {
        tbs = rest; // that was the serial
    }
    for _ in 0..3 {
        tbs = element(tbs)?.2;
    }
    let (tag, mut subject, _) = element(tbs)?;
    if tag != SEQUENCE {
        return None;
    }
    let mut cn = None;
    while !subject.is_empty() {
        let (tag, mut set, rest) = element(subject)?;
        subject = rest;
        if tag != SET {
            return None;
        }
        while !set.is_empty() {
            let (tag, attr, rest) = element(set)?;
            set = rest;
            if tag != SEQUENCE {
                return None;
            }
            let (tag, oid, value) = element(attr)?;
            if tag == OID && oid == COMMON_NAME {
                let (tag, bytes, _) = element(value)?;
                cn = Some(match tag {
                    // UTF8String, PrintableString, IA5String, TeletexString (taken as Latin-1)
                    0x0c | 0x13 | 0x16 => String::from_utf8(bytes.to_vec()).ok()?,
                    0x14 => bytes.iter().map(|&b| b as char).collect(),
                    // BMPString: UTF-16BE
                    0x1e if bytes.len() % 2 == 0 => String::from_utf16(
                        &bytes
                            .chunks(2)
                            .map(|c| u16::from_be_bytes([c[0], c[1]]))
                            .collect::<Vec<_>>(),
                    )
                    .ok()?,
                    _ => return None,
                });
            }
        }
    }
    cn
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_common_name_of_a_generated_certificate() {
        let mut params = rcgen::CertificateParams::new(vec!["x.example".into()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Acme");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "sensor-0042");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(
            subject_common_name(cert.der()).as_deref(),
            Some("sensor-0042")
        );
        assert_eq!(fingerprint(cert.der()).len(), 64);
    }

    #[test]
    fn no_common_name_or_garbage_is_none() {
        let mut params = rcgen::CertificateParams::new(vec!["x.example".into()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(subject_common_name(cert.der()), None);
        for bad in [
            &b""[..],
            b"\x30",
            b"\x30\x84\xff\xff\xff\xff",
            b"\x31\x00",
            b"\x30\x02\x30\x00",
        ] {
            assert_eq!(subject_common_name(bad), None);
        }
    }
}
