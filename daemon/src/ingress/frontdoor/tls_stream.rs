//! A device's TLS connection once the handshake is done. rustls makes the handshake and keeps
//! the key schedule; then it hands the traffic keys over (`dangerous_into_kernel_connection`,
//! its interface for kernel TLS) and [`Records`] protects and checks each record with ring's
//! AEAD, as the kernel's TLS module would. What this buys: an idle device holds its two keys
//! and nothing else, where a rustls connection keeps a 4 KiB read buffer and its handshake
//! leftovers for the connection's life (~6 KiB per device; BENCHMARKS.md, "Mutual TLS").
//!
//! The record layer is RFC 8446 §5 (TLS 1.3) and RFC 5246 §6.2 with RFC 5288 / RFC 7905
//! nonces (TLS 1.2), for the AEAD suites rustls negotiates (AES-128-GCM, AES-256-GCM,
//! ChaCha20-Poly1305); ring does the cryptography. After the handshake a device may send
//! application data, alerts and (TLS 1.3) KeyUpdate; anything else ends the connection, as does
//! a record that fails its check. Keys are updated (TLS 1.3) when the peer asks and before the
//! AES-GCM confidentiality limit; a TLS 1.2 connection at that limit is closed instead.

use std::io;
use std::ops::Range;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BytesMut};
use ring::{aead, hkdf};
use rustls::{ConnectionTrafficSecrets, ExtractedSecrets};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use zeroize::Zeroizing;

const HEADER: usize = 5;
const TAG: usize = 16;
/// The largest plaintext of one record (2^14).
const MAX_PLAIN: usize = 1 << 14;
/// Plaintext encrypted per write call: a few records per system call.
const MAX_WRITE: usize = 4 * MAX_PLAIN;
/// What a read asks the socket for at least.
const READ_SIZE: usize = 4096;
/// Records sent under one AES-GCM key before it is replaced (RFC 8446 §5.5: 2^24.5 full-size
/// records; rustls uses the same limit).
const AES_GCM_LIMIT: u64 = 1 << 24;
/// Empty application-data records in a row that a peer may send (they cost us work, not it).
const MAX_EMPTY_IN_ROW: u8 = 32;

const CHANGE_CIPHER_SPEC: u8 = 20;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const APPLICATION_DATA: u8 = 23;
const KEY_UPDATE: u8 = 24;
const CLOSE_NOTIFY: u8 = 0;
const USER_CANCELED: u8 = 90;

fn bad(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// One direction's key, IV and record sequence number. The key is expanded for ring (its AES
/// round keys and GHASH table, ~520 bytes) while records flow, and let go while the connection
/// waits: an idle device keeps the 16 or 32 bytes it came from.
struct Keys {
    alg: &'static aead::Algorithm,
    secret: Zeroizing<[u8; 32]>,
    iv: [u8; 12],
    seq: u64,
    expanded: Option<Box<aead::LessSafeKey>>,
    /// TLS 1.3: the application traffic secret the key and IV come from, for key updates
    /// (empty: none known, and a key update ends the connection).
    traffic: TrafficSecret,
}

/// A TLS 1.3 application traffic secret: 32 bytes (SHA-256 suites) or 48 (SHA-384).
pub struct TrafficSecret {
    bytes: Zeroizing<[u8; 48]>,
    len: u8,
}

impl Default for TrafficSecret {
    fn default() -> Self {
        Self {
            bytes: Zeroizing::new([0; 48]),
            len: 0,
        }
    }
}

impl TrafficSecret {
    pub fn new(secret: &[u8]) -> Option<Self> {
        if secret.len() != 32 && secret.len() != 48 {
            return None;
        }
        let mut bytes = Zeroizing::new([0u8; 48]);
        bytes[..secret.len()].copy_from_slice(secret);
        Some(Self {
            bytes,
            len: secret.len() as u8,
        })
    }

    fn get(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// HKDF-Expand-Label with an empty context (RFC 8446 §7.1), the hash the secret's length says.
fn expand_label(secret: &[u8], label: &[u8], out: &mut [u8]) -> io::Result<()> {
    let alg = match secret.len() {
        32 => hkdf::HKDF_SHA256,
        48 => hkdf::HKDF_SHA384,
        _ => return Err(bad("no TLS 1.3 traffic secret for a key update")),
    };
    let prk = hkdf::Prk::new_less_safe(alg, secret);
    let len = (out.len() as u16).to_be_bytes();
    let label_len = [6 + label.len() as u8];
    let info: [&[u8]; 5] = [&len, &label_len, b"tls13 ", label, &[0]];
    prk.expand(&info, Len(out.len()))
        .and_then(|okm| okm.fill(out))
        .map_err(|_| bad("HKDF-Expand-Label failed"))
}

impl Keys {
    fn new(seq: u64, secrets: ConnectionTrafficSecrets) -> io::Result<Self> {
        let (alg, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => return Err(bad("a cipher suite the TLS record layer does not know")),
        };
        let key = key.as_ref();
        if key.len() != alg.key_len() {
            return Err(bad("a traffic key of the wrong length"));
        }
        let mut secret = Zeroizing::new([0u8; 32]);
        secret[..key.len()].copy_from_slice(key);
        let iv: [u8; 12] = iv
            .as_ref()
            .try_into()
            .map_err(|_| bad("a traffic IV of the wrong length"))?;
        Ok(Self {
            alg,
            secret,
            iv,
            seq,
            expanded: None,
            traffic: TrafficSecret::default(),
        })
    }

    /// Keeps the traffic secret for key updates if it is the one this key and IV came from
    /// (else the secret was not this connection's, and none is kept).
    fn with_traffic(mut self, traffic: Option<TrafficSecret>) -> io::Result<Self> {
        if let Some(t) = traffic {
            let (key, iv) = Self::derive(self.alg, t.get())?;
            let key_len = self.alg.key_len();
            if key[..key_len] == self.secret[..key_len] && iv == self.iv {
                self.traffic = t;
            }
        }
        Ok(self)
    }

    /// The key and IV of a traffic secret (RFC 8446 §7.3).
    fn derive(
        alg: &'static aead::Algorithm,
        traffic: &[u8],
    ) -> io::Result<(Zeroizing<[u8; 32]>, [u8; 12])> {
        let mut key = Zeroizing::new([0u8; 32]);
        let mut iv = [0u8; 12];
        expand_label(traffic, b"key", &mut key[..alg.key_len()])?;
        expand_label(traffic, b"iv", &mut iv)?;
        Ok((key, iv))
    }

    /// A key update (RFC 8446 §4.6.3): the next traffic secret, its key and IV, sequence 0.
    fn update(&mut self) -> io::Result<()> {
        let mut next = TrafficSecret {
            bytes: Zeroizing::new([0u8; 48]),
            len: self.traffic.len,
        };
        let len = next.len as usize;
        expand_label(self.traffic.get(), b"traffic upd", &mut next.bytes[..len])?;
        let (key, iv) = Self::derive(self.alg, next.get())?;
        self.secret = key;
        self.iv = iv;
        self.seq = 0;
        self.expanded = None;
        self.traffic = next;
        Ok(())
    }

    /// The key as ring uses it, expanded if it was let go.
    fn key(&mut self) -> io::Result<&aead::LessSafeKey> {
        if self.expanded.is_none() {
            let unbound = aead::UnboundKey::new(self.alg, &self.secret[..self.alg.key_len()])
                .map_err(|_| bad("a traffic key of the wrong length"))?;
            self.expanded = Some(Box::new(aead::LessSafeKey::new(unbound)));
        }
        Ok(self.expanded.as_deref().expect("just set"))
    }

    fn is_gcm(&self) -> bool {
        self.alg != &aead::CHACHA20_POLY1305
    }

    /// The IV with the sequence number XORed into its last 8 bytes (TLS 1.3, and TLS 1.2's
    /// ChaCha20; TLS 1.2's AES-GCM sends the last 8 bytes as its explicit nonce).
    fn nonce(&self) -> [u8; 12] {
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        n
    }

    fn next(&mut self) -> io::Result<()> {
        self.seq = self
            .seq
            .checked_add(1)
            .ok_or_else(|| bad("TLS record sequence number exhausted"))?;
        Ok(())
    }
}

/// TLS 1.2's additional data: sequence number, type, version, plaintext length.
fn aad12(seq: u64, typ: u8, len: usize) -> aead::Aad<[u8; 13]> {
    let mut a = [0u8; 13];
    a[..8].copy_from_slice(&seq.to_be_bytes());
    a[8] = typ;
    a[9..11].copy_from_slice(&[3, 3]);
    a[11..].copy_from_slice(&(len as u16).to_be_bytes());
    aead::Aad::from(a)
}

/// What a record held.
#[derive(Debug, PartialEq, Eq)]
pub enum Opened {
    /// Application data at this range of the record's bytes.
    Data(Range<usize>),
    /// Nothing for the application (an empty record, a key update, a warning).
    Nothing,
    /// The peer's close_notify.
    Closed,
}

/// The record layer of one connection: both directions' keys, without buffers.
pub struct Records {
    tls13: bool,
    rx: Keys,
    tx: Keys,
    /// Records the transmit key may protect before it is replaced (TLS 1.3) or the connection
    /// ends (TLS 1.2).
    tx_limit: u64,
    /// The peer asked for a key update: ours goes out before our next record.
    owe_key_update: bool,
    empty_in_row: u8,
}

impl Records {
    /// The record layer from rustls's keys; for TLS 1.3, with the traffic secrets
    /// ([`TrafficSecret`]: the client's, then the server's) that key updates need.
    pub fn new(
        secrets: ExtractedSecrets,
        tls13: bool,
        traffic: Option<(TrafficSecret, TrafficSecret)>,
    ) -> io::Result<Self> {
        let (client, server) = match traffic.filter(|_| tls13) {
            Some((c, s)) => (Some(c), Some(s)),
            None => (None, None),
        };
        let tx = Keys::new(secrets.tx.0, secrets.tx.1)?.with_traffic(server)?;
        let rx = Keys::new(secrets.rx.0, secrets.rx.1)?.with_traffic(client)?;
        let tx_limit = if tx.is_gcm() { AES_GCM_LIMIT } else { u64::MAX };
        Ok(Self {
            tls13,
            rx,
            tx,
            tx_limit,
            owe_key_update: false,
            empty_in_row: 0,
        })
    }

    /// Lets the expanded keys go (the connection waits with nothing in transit).
    pub fn rest(&mut self) {
        self.rx.expanded = None;
        self.tx.expanded = None;
    }

    /// The longest record body a peer may send (RFC 8446 §5.2; RFC 5246 §6.2.3).
    fn max_body(&self) -> usize {
        MAX_PLAIN + if self.tls13 { 256 } else { 2048 }
    }

    /// The length of the whole record at the front of `bytes`, once its header is there.
    pub fn record_len(&self, bytes: &[u8]) -> io::Result<Option<usize>> {
        if bytes.len() < HEADER {
            return Ok(None);
        }
        let body = u16::from_be_bytes([bytes[3], bytes[4]]) as usize;
        if body > self.max_body() {
            return Err(bad(format!("TLS record of {body} bytes, over the limit")));
        }
        Ok(Some(HEADER + body))
    }

    /// Checks and decrypts one whole record (header included) in place.
    pub fn open(&mut self, record: &mut [u8]) -> io::Result<Opened> {
        let outer = record[0];
        // TLS 1.2 and 1.3 records all say 3,3 (TLS 1.2's additional data is built from it, so
        // another value would go unchecked there).
        if record[1..3] != [3, 3] {
            return Err(bad(format!(
                "TLS record of version {}.{}",
                record[1], record[2]
            )));
        }
        let (typ, range) = if self.tls13 {
            if outer != APPLICATION_DATA {
                return Err(bad(format!("unprotected TLS record of type {outer}")));
            }
            let nonce = aead::Nonce::assume_unique_for_key(self.rx.nonce());
            let (header, body) = record.split_at_mut(HEADER);
            let aad = aead::Aad::from(&header[..]);
            let plain = self
                .rx
                .key()?
                .open_in_place(nonce, aad, body)
                .map_err(|_| bad("TLS record failed its integrity check"))?;
            // The inner type is the last byte that is not padding.
            let Some(at) = plain.iter().rposition(|&b| b != 0) else {
                return Err(bad("TLS record without a content type"));
            };
            (plain[at], HEADER..HEADER + at)
        } else {
            let body_len = record.len() - HEADER;
            let (explicit, nonce) = if self.rx.is_gcm() {
                if body_len < 8 + TAG {
                    return Err(bad("TLS record too short"));
                }
                let mut n = self.rx.iv;
                n[4..].copy_from_slice(&record[HEADER..HEADER + 8]);
                (8, n)
            } else {
                (0, self.rx.nonce())
            };
            if body_len < explicit + TAG {
                return Err(bad("TLS record too short"));
            }
            let plain_len = body_len - explicit - TAG;
            let aad = aad12(self.rx.seq, outer, plain_len);
            let nonce = aead::Nonce::assume_unique_for_key(nonce);
            let start = HEADER + explicit;
            self.rx
                .key()?
                .open_in_place(nonce, aad, &mut record[start..])
                .map_err(|_| bad("TLS record failed its integrity check"))?;
            (outer, start..start + plain_len)
        };
        self.rx.next()?;
        if range.len() > MAX_PLAIN {
            return Err(bad("TLS record over 2^14 bytes of plaintext"));
        }
        match typ {
            APPLICATION_DATA if range.is_empty() => {
                self.empty_in_row += 1;
                if self.empty_in_row > MAX_EMPTY_IN_ROW {
                    return Err(bad("too many empty TLS records in a row"));
                }
                Ok(Opened::Nothing)
            }
            APPLICATION_DATA => {
                self.empty_in_row = 0;
                Ok(Opened::Data(range))
            }
            ALERT => match record[range] {
                [_, CLOSE_NOTIFY] => Ok(Opened::Closed),
                [_, USER_CANCELED] if self.tls13 => Ok(Opened::Nothing),
                [1, _] if !self.tls13 => Ok(Opened::Nothing),
                [_, d] => Err(bad(format!("the peer sent TLS alert {d}"))),
                _ => Err(bad("malformed TLS alert")),
            },
            // The one handshake message a device may send now: a KeyUpdate, whole and alone at
            // the end of its record (RFC 8446 §5.1: what follows it is under the next key).
            HANDSHAKE if self.tls13 => match record[range] {
                [KEY_UPDATE, 0, 0, 1, ask @ (0 | 1)] => {
                    self.rx.update()?;
                    self.owe_key_update |= ask == 1;
                    Ok(Opened::Nothing)
                }
                [KEY_UPDATE, ..] => Err(bad("a TLS KeyUpdate not alone in its record")),
                [t, ..] => Err(bad(format!(
                    "TLS handshake message {t} after the handshake"
                ))),
                [] => Err(bad("an empty TLS handshake record")),
            },
            HANDSHAKE => Err(bad("TLS renegotiation is not supported")),
            CHANGE_CIPHER_SPEC => Err(bad("TLS change_cipher_spec after the handshake")),
            t => Err(bad(format!("TLS record of unknown type {t}"))),
        }
    }

    /// Appends `plain` to `out` as application-data records.
    pub fn seal(&mut self, plain: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        for chunk in plain.chunks(MAX_PLAIN) {
            if self.owe_key_update || self.tx.seq >= self.tx_limit {
                self.update_tx(out)?;
            }
            self.seal_record(APPLICATION_DATA, chunk, out)?;
        }
        Ok(())
    }

    /// Appends a close_notify alert to `out`.
    pub fn seal_close_notify(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        self.seal_record(ALERT, &[1, CLOSE_NOTIFY], out)
    }

    /// Our KeyUpdate (not asking for the peer's), under the old key; then the new key.
    fn update_tx(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        if !self.tls13 {
            return Err(bad("TLS 1.2 key at its confidentiality limit"));
        }
        if self.tx.traffic.len == 0 {
            return Err(bad("no TLS 1.3 traffic secret for a key update"));
        }
        self.seal_record(HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, 0], out)?;
        self.tx.update()?;
        self.owe_key_update = false;
        Ok(())
    }

    fn seal_record(&mut self, typ: u8, plain: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        let start = out.len();
        let nonce = self.tx.nonce();
        if self.tls13 {
            let len = plain.len() + 1 + TAG;
            out.extend_from_slice(&[APPLICATION_DATA, 3, 3]);
            out.extend_from_slice(&(len as u16).to_be_bytes());
            out.extend_from_slice(plain);
            out.push(typ);
            let (header, body) = out[start..].split_at_mut(HEADER);
            let tag = self
                .tx
                .key()?
                .seal_in_place_separate_tag(
                    aead::Nonce::assume_unique_for_key(nonce),
                    aead::Aad::from(&header[..]),
                    body,
                )
                .map_err(|_| bad("TLS encryption failed"))?;
            out.extend_from_slice(tag.as_ref());
        } else {
            let explicit = if self.tx.is_gcm() { 8 } else { 0 };
            let len = explicit + plain.len() + TAG;
            out.extend_from_slice(&[typ, 3, 3]);
            out.extend_from_slice(&(len as u16).to_be_bytes());
            out.extend_from_slice(&nonce[12 - explicit..]);
            out.extend_from_slice(plain);
            let aad = aad12(self.tx.seq, typ, plain.len());
            let tag = self
                .tx
                .key()?
                .seal_in_place_separate_tag(
                    aead::Nonce::assume_unique_for_key(nonce),
                    aad,
                    &mut out[start + HEADER + explicit..],
                )
                .map_err(|_| bad("TLS encryption failed"))?;
            out.extend_from_slice(tag.as_ref());
        }
        self.tx.next()
    }
}

/// Fuzzing (`crate::fuzz::tls_records`): a device and the gateway with mirrored keys; the input
/// says what the device sends (records sealed with its key, so that they pass their tag and
/// reach what is behind it; records with a byte flipped; raw bytes) and what the gateway sends
/// back. Whatever the input: no panic; application data comes out as it went in, both ways; a
/// flipped record is refused; key updates asked for either way keep both sides in step.
pub fn fuzz_records(data: &[u8]) -> usize {
    let Some((&config, mut data)) = data.split_first() else {
        return 0;
    };
    let tls13 = config & 1 == 1;
    let (alg, traffic_len): (&'static aead::Algorithm, usize) = match (config >> 1) % 3 {
        0 => (&aead::AES_128_GCM, 32),
        1 => (&aead::AES_256_GCM, 48),
        _ => (&aead::CHACHA20_POLY1305, 32),
    };
    let keys = |seed: u8| {
        let traffic = TrafficSecret::new(&[seed; 48][..traffic_len]).expect("32 or 48 bytes");
        let (secret, iv) = Keys::derive(alg, traffic.get()).expect("derives");
        Keys {
            alg,
            secret,
            iv,
            seq: 0,
            expanded: None,
            traffic: if tls13 {
                traffic
            } else {
                TrafficSecret::default()
            },
        }
    };
    let records = |rx: Keys, tx: Keys| Records {
        tls13,
        tx_limit: if tx.is_gcm() { 64 } else { u64::MAX },
        rx,
        tx,
        owe_key_update: false,
        empty_in_row: 0,
    };
    let mut gateway = records(keys(1), keys(2));
    let mut device = records(keys(2), keys(1));
    let mut take = |n: usize| {
        let (a, b) = data.split_at(n.min(data.len()));
        data = b;
        a
    };
    let mut done = 0;
    loop {
        let [op, len] = take(2) else { return done };
        // Bit 4 of the op scales the length up, to records over 2^14 bytes.
        let (op, len) = (*op, *len as usize * if op & 0x10 != 0 { 67 } else { 1 });
        let body = take(len).to_vec();
        let mut wire = Vec::new();
        match op % 4 {
            // The device sends a record of the input's type and content.
            0 | 1 => {
                let typ = body.first().copied().unwrap_or(APPLICATION_DATA);
                let content = body.get(1..).unwrap_or(&[]);
                device
                    .seal_record(typ, content, &mut wire)
                    .expect("sealing");
                let key_update = tls13 && typ == HANDSHAKE && content.first() == Some(&KEY_UPDATE);
                let flip = op % 4 == 1 && !wire.is_empty();
                if flip {
                    let at = (len * 31 + 7) % wire.len();
                    wire[at] ^= 1 << (op >> 5);
                }
                let len = match gateway.record_len(&wire) {
                    Ok(Some(n)) if n <= wire.len() => n,
                    _ => return done,
                };
                let opened = gateway.open(&mut wire[..len]);
                if flip {
                    assert!(opened.is_err(), "a flipped record was accepted");
                    return done;
                }
                // (TLS 1.3: an inner type 0 is padding, so the type is the content's last
                // nonzero byte: no real peer sends it.)
                match opened {
                    Ok(Opened::Data(r)) if typ != 0 || !tls13 => {
                        assert_eq!(typ, APPLICATION_DATA);
                        assert_eq!(&wire[r], content, "data changed on its way in");
                    }
                    Ok(_) if typ == APPLICATION_DATA && !content.is_empty() => {
                        panic!("data lost on its way in")
                    }
                    Ok(_) => {}
                    Err(_) => return done,
                }
                if key_update {
                    // The device, having sent its KeyUpdate, seals with its next key.
                    let asked = content.get(4) == Some(&1);
                    device.tx.update().expect("update");
                    if asked {
                        assert!(gateway.owe_key_update);
                    }
                }
            }
            // Bytes as they come: refused, or a record whose tag cannot verify.
            2 => {
                wire = body;
                if let Ok(Some(n)) = gateway.record_len(&wire) {
                    if n <= wire.len() && n > HEADER {
                        assert!(
                            gateway.open(&mut wire[..n]).is_err(),
                            "forged record accepted"
                        );
                    }
                }
                return done;
            }
            // The gateway sends data back; the device reads it all (following our key updates).
            _ => {
                if gateway.seal(&body, &mut wire).is_err() {
                    assert!(!tls13, "a TLS 1.3 key update failed");
                    return done;
                }
                let mut got = Vec::new();
                let mut at = 0;
                while at < wire.len() {
                    let n = device
                        .record_len(&wire[at..])
                        .expect("length")
                        .expect("whole");
                    let record = &mut wire[at..at + n];
                    match device
                        .open(record)
                        .expect("the device opens what we sealed")
                    {
                        Opened::Data(r) => got.extend_from_slice(&record[r]),
                        Opened::Nothing => {}
                        Opened::Closed => panic!("close_notify from seal"),
                    }
                    at += n;
                }
                assert_eq!(got, body, "data changed on its way out");
            }
        }
        done += 1;
    }
}

/// A TLS connection over a TCP socket, with buffers only while bytes are in transit.
pub struct TlsStream {
    tcp: TcpStream,
    records: Records,
    /// Bytes read and not yet given out: whole and partial records; while `plain` is not
    /// empty, the first record is decrypted and `plain` is what is left of its plaintext.
    input: BytesMut,
    plain: Range<usize>,
    /// The length of the decrypted record at the front of `input`.
    opened: usize,
    /// Ciphertext not yet written, from `written` on.
    output: Vec<u8>,
    written: usize,
    read_closed: bool,
    close_sent: bool,
    /// The last read found nothing in transit: the connection is waiting for its device.
    read_parked: bool,
}

impl TlsStream {
    /// The stream after the handshake: `leftover` is what the handshake read beyond its last
    /// record, `early` the application data rustls already decrypted.
    pub fn new(tcp: TcpStream, records: Records, leftover: &[u8], early: &[u8]) -> Self {
        let mut input = BytesMut::new();
        let mut plain = 0..0;
        let mut opened = 0;
        if !early.is_empty() {
            // Served first, as if it were a decrypted record at the front.
            input.extend_from_slice(early);
            plain = 0..early.len();
            opened = early.len();
        }
        input.extend_from_slice(leftover);
        Self {
            tcp,
            records,
            input,
            plain,
            opened,
            output: Vec::new(),
            written: 0,
            read_closed: false,
            close_sent: false,
            read_parked: false,
        }
    }

    /// Whether a read would return without the socket: plaintext or a whole record is here.
    /// (A record too long counts: the read reports it.)
    fn has_input(&self) -> bool {
        !self.plain.is_empty()
            || match self.records.record_len(&self.input) {
                Ok(Some(n)) => n <= self.input.len(),
                Ok(None) => false,
                Err(_) => true,
            }
    }

    /// Ready once a read would not wait.
    pub fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.has_input() || self.read_closed {
            Poll::Ready(Ok(()))
        } else {
            self.tcp.poll_read_ready(cx)
        }
    }

    fn consume_front(&mut self, n: usize) {
        self.input.advance(n);
        if self.input.is_empty() {
            // An idle device holds no buffer.
            self.input = BytesMut::new();
        }
    }

    fn poll_write_output(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.output.len() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.output[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.output = Vec::new();
        self.written = 0;
        if self.read_parked {
            // Written while the device is quiet (an acknowledgement): the transmit key goes too.
            self.records.rest();
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.plain.is_empty() {
                let n = this.plain.len().min(buf.remaining());
                buf.put_slice(&this.input[this.plain.start..this.plain.start + n]);
                this.plain.start += n;
                if this.plain.is_empty() {
                    let n = std::mem::take(&mut this.opened);
                    this.consume_front(n);
                }
                return Poll::Ready(Ok(()));
            }
            if this.read_closed {
                return Poll::Ready(Ok(()));
            }
            let need = match this.records.record_len(&this.input)? {
                Some(n) if n <= this.input.len() => {
                    match this.records.open(&mut this.input[..n])? {
                        Opened::Data(r) => {
                            this.plain = r;
                            this.opened = n;
                        }
                        Opened::Nothing => this.consume_front(n),
                        Opened::Closed => {
                            this.read_closed = true;
                            this.input = BytesMut::new();
                        }
                    }
                    continue;
                }
                Some(n) => n - this.input.len(),
                None => HEADER - this.input.len(),
            };
            let n = loop {
                ready!(this.tcp.poll_read_ready(cx))?;
                this.input.reserve(need.max(READ_SIZE));
                match this.tcp.try_read_buf(&mut this.input) {
                    Ok(n) => {
                        this.read_parked = false;
                        break n;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if this.input.is_empty() {
                            // Nothing in transit: wait without a buffer, and (once our
                            // writes are out too) without expanded keys.
                            this.input = BytesMut::new();
                            this.read_parked = true;
                            if this.output.is_empty() {
                                this.records.rest();
                            }
                        }
                    }
                    Err(e) => return Poll::Ready(Err(e)),
                }
            };
            if n == 0 {
                if !this.input.is_empty() {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed inside a TLS record",
                    )));
                }
                // Closed without close_notify: the end of the stream all the same (MQTT frames
                // its own packets, so a truncated one is seen as such).
                this.read_closed = true;
            }
        }
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_write_output(cx))?;
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = data.len().min(MAX_WRITE);
        this.output
            .reserve(n + n.div_ceil(MAX_PLAIN) * (HEADER + 8 + TAG + 1) + 64);
        this.records.seal(&data[..n], &mut this.output)?;
        // Written now if the socket takes it; else by the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_write_output(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_write_output(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_sent {
            ready!(this.poll_write_output(cx))?;
            this.records.seal_close_notify(&mut this.output)?;
            this.close_sent = true;
        }
        ready!(this.poll_write_output(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    //! Against rustls's own client, over loopback: every suite and version rustls negotiates,
    //! data both ways, application data in the handshake's last flight, key updates both ways,
    //! tampering, and closing.
    use std::io::{Read, Write};
    use std::sync::Arc;

    use rustls::crypto::ring::cipher_suite as cs;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use rustls::{ClientConfig, RootCertStore, SupportedCipherSuite};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::config::{ClientCerts, TlsConfig};
    use crate::ingress::frontdoor::tls::Tls;

    struct Pki {
        _dir: tempfile::TempDir,
        tls: Tls,
        client: (
            Vec<CertificateDer<'static>>,
            RootCertStore,
            std::path::PathBuf,
        ),
    }

    fn pki() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        crate::certs::run(&crate::certs::Request {
            dir: dir.path().to_path_buf(),
            hosts: vec!["127.0.0.1".into()],
            devices: vec!["dev-1".into()],
            ..Default::default()
        })
        .unwrap();
        let p = |f: &str| dir.path().join(f);
        let tls = Tls::load(&TlsConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            cert: p("server.crt"),
            key: p("server.key"),
            client_ca: Some(p("ca.crt")),
            client_certs: ClientCerts::Required,
            crl: vec![],
            revoked: None,
            things: None,
            anonymous: false,
        })
        .unwrap();
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(p("ca.crt")).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let chain = CertificateDer::pem_file_iter(p("devices/dev-1.crt"))
            .unwrap()
            .map(|c| c.unwrap())
            .collect();
        Pki {
            client: (chain, roots, p("devices/dev-1.key")),
            _dir: dir,
            tls,
        }
    }

    fn client_config(pki: &Pki, suite: SupportedCipherSuite) -> Arc<ClientConfig> {
        let mut provider = rustls::crypto::ring::default_provider();
        provider.cipher_suites = vec![suite];
        let version = match suite {
            SupportedCipherSuite::Tls13(_) => &rustls::version::TLS13,
            SupportedCipherSuite::Tls12(_) => &rustls::version::TLS12,
        };
        let key = PrivateKeyDer::from_pem_file(&pki.client.2).unwrap();
        Arc::new(
            ClientConfig::builder_with_provider(Arc::new(provider))
                .with_protocol_versions(&[version])
                .unwrap()
                .with_root_certificates(pki.client.1.clone())
                .with_client_auth_cert(pki.client.0.clone(), key)
                .unwrap(),
        )
    }

    const SUITES: [SupportedCipherSuite; 6] = [
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    ];

    /// A handshake with rustls's blocking client on a thread; `first` is written before the
    /// handshake ends, so that it travels in the client's last flight.
    async fn connect(
        pki: &Pki,
        suite: SupportedCipherSuite,
        first: &'static [u8],
    ) -> (
        TlsStream,
        std::thread::JoinHandle<rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = client_config(pki, suite);
        let client = std::thread::spawn(move || {
            let mut sock = std::net::TcpStream::connect(addr).unwrap();
            sock.set_read_timeout(Some(std::time::Duration::from_secs(10)))
                .unwrap();
            let mut conn =
                rustls::ClientConnection::new(config, ServerName::try_from("127.0.0.1").unwrap())
                    .unwrap();
            conn.writer().write_all(first).unwrap();
            while conn.is_handshaking() {
                conn.complete_io(&mut sock).unwrap();
            }
            while conn.wants_write() {
                conn.write_tls(&mut sock).unwrap();
            }
            rustls::StreamOwned::new(conn, sock)
        });
        let (tcp, _) = listener.accept().await.unwrap();
        let (stream, peer) = pki.tls.accept(tcp).await.unwrap();
        assert_eq!(peer.unwrap().common_name.as_deref(), Some("dev-1"));
        (stream, client)
    }

    async fn read_exactly(s: &mut TlsStream, n: usize) -> Vec<u8> {
        let mut got = vec![0; n];
        let read = tokio::time::timeout(std::time::Duration::from_secs(10), s.read_exact(&mut got));
        read.await.expect("no data within 10 s").unwrap();
        got
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[tokio::test]
    async fn every_suite_carries_data_both_ways() {
        let pki = pki();
        for suite in SUITES {
            let (mut server, client) = connect(&pki, suite, b"CONNECT").await;
            let mut client = tokio::task::spawn_blocking(move || client.join().unwrap())
                .await
                .unwrap();
            assert_eq!(read_exactly(&mut server, 7).await, b"CONNECT", "{suite:?}");
            // 1 byte up to several full records, both ways.
            for n in [1, 100, MAX_PLAIN - 1, MAX_PLAIN, MAX_PLAIN + 1, 100_000] {
                let data = pattern(n);
                let (tx, back) = (data.clone(), data.clone());
                let c = std::thread::spawn(move || {
                    client.write_all(&tx).unwrap();
                    client.flush().unwrap();
                    let mut got = vec![0; tx.len()];
                    client.read_exact(&mut got).unwrap();
                    (client, got)
                });
                let got = read_exactly(&mut server, n).await;
                assert!(got == data, "{suite:?}: {n} bytes from the device");
                server.write_all(&got).await.unwrap();
                server.flush().await.unwrap();
                let (c2, echoed) = tokio::task::spawn_blocking(move || c.join().unwrap())
                    .await
                    .unwrap();
                client = c2;
                assert!(echoed == back, "{suite:?}: {n} bytes to the device");
            }
            // Waiting with nothing in transit, the stream holds no buffer and no expanded key.
            let mut one = [0u8; 1];
            let waits = std::future::poll_fn(|cx| {
                let r = Pin::new(&mut server).poll_read(cx, &mut ReadBuf::new(&mut one));
                Poll::Ready(r.is_pending())
            });
            assert!(waits.await);
            assert_eq!(server.input.capacity(), 0);
            assert!(server.records.rx.expanded.is_none() && server.records.tx.expanded.is_none());
            // close_notify both ways: the device's is the stream's end, ours is a clean end.
            client.conn.send_close_notify();
            client.conn.complete_io(&mut client.sock).unwrap();
            let mut rest = Vec::new();
            assert_eq!(server.read_to_end(&mut rest).await.unwrap(), 0, "{suite:?}");
            server.shutdown().await.unwrap();
            let mut tail = Vec::new();
            client.read_to_end(&mut tail).unwrap();
            assert!(tail.is_empty());
            assert!(server.input.capacity() == 0 && server.output.capacity() == 0);
        }
    }

    #[tokio::test]
    async fn key_updates_either_way() {
        let pki = pki();
        for suite in &SUITES[..3] {
            let (mut server, client) = connect(&pki, *suite, b"").await;
            let mut client = tokio::task::spawn_blocking(move || client.join().unwrap())
                .await
                .unwrap();
            assert_eq!(
                pki.tls.pending_secrets(),
                0,
                "the handshake took its secrets"
            );
            assert!(server.records.rx.traffic.len > 0 && server.records.tx.traffic.len > 0);
            // The device updates its keys and asks for ours (rustls does both).
            client.conn.refresh_traffic_keys().unwrap();
            client.write_all(b"after its update").unwrap();
            client.flush().unwrap();
            assert_eq!(read_exactly(&mut server, 16).await, b"after its update");
            assert!(server.records.owe_key_update);
            // Ours goes out before our next record, and the device reads it under the new key.
            server.records.tx_limit = server.records.tx.seq + 3;
            for i in 0..10u8 {
                server.write_all(&[i; 100]).await.unwrap();
            }
            server.flush().await.unwrap();
            assert!(!server.records.owe_key_update);
            assert!(server.records.tx.seq < 10, "the limit renewed the key");
            let got = tokio::task::spawn_blocking(move || {
                let mut got = vec![0; 1000];
                client.read_exact(&mut got).unwrap();
                got
            })
            .await
            .unwrap();
            assert_eq!(got, (0..10u8).flat_map(|i| [i; 100]).collect::<Vec<_>>());
        }
    }

    #[tokio::test]
    async fn a_handshake_that_never_ends_leaves_no_secret_behind() {
        let pki = pki();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = client_config(&pki, SUITES[0]);
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let client = std::thread::spawn(move || {
            let mut sock = std::net::TcpStream::connect(addr).unwrap();
            let mut conn =
                rustls::ClientConnection::new(config, ServerName::try_from("127.0.0.1").unwrap())
                    .unwrap();
            conn.write_tls(&mut sock).unwrap();
            // The server's flight, then silence: no certificate, no Finished.
            while conn.is_handshaking() && !conn.wants_write() {
                conn.read_tls(&mut sock).unwrap();
                conn.process_new_packets().unwrap();
            }
            let _ = stop_rx.recv();
        });
        let (tcp, _) = listener.accept().await.unwrap();
        let mut accept = Box::pin(pki.tls.accept(tcp));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while pki.tls.pending_secrets() == 0 {
            assert!(std::time::Instant::now() < deadline, "no secrets logged");
            tokio::select! {
                _ = &mut accept => panic!("the handshake ended"),
                _ = tokio::task::yield_now() => {}
            }
        }
        // The device never finishes: the connect timeout drops the handshake.
        drop(accept);
        assert_eq!(pki.tls.pending_secrets(), 0);
        stop_tx.send(()).unwrap();
        client.join().unwrap();
    }

    #[tokio::test]
    async fn a_client_hello_in_records_too_short_for_its_random_is_refused() {
        let pki = pki();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = std::thread::spawn(move || {
            let mut sock = std::net::TcpStream::connect(addr).unwrap();
            sock.write_all(&[22, 3, 1, 0, 10, 1, 0, 1, 0, 3, 3, 0, 0, 0, 0])
                .unwrap();
            sock
        });
        let (tcp, _) = listener.accept().await.unwrap();
        let e = match pki.tls.accept(tcp).await {
            Err(super::super::tls::HandshakeError::Failed(e)) => e,
            _ => panic!("accepted"),
        };
        assert!(e.to_string().contains("under 38 bytes"), "{e}");
        drop(client.join().unwrap());
    }

    #[test]
    fn a_key_update_must_end_its_record() {
        // TLS 1.3, AES-128-GCM: the device sends a record holding one KeyUpdate, then two.
        let one = [1u8, 0, 6, 22, 24, 0, 0, 1, 0];
        assert_eq!(fuzz_records(&one), 1);
        let two = [1u8, 0, 11, 22, 24, 0, 0, 1, 0, 24, 0, 0, 1, 0];
        assert_eq!(fuzz_records(&two), 0);
    }

    #[test]
    fn the_fuzz_seeds_reach_what_they_aim_at() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/corpus/tls");
        for (seed, steps) in [(0, 3), (1, 6), (2, 3), (3, 6), (4, 3), (5, 6)] {
            let data = std::fs::read(format!("{dir}/seed-{seed}")).unwrap();
            assert_eq!(fuzz_records(&data), steps, "seed-{seed}");
        }
    }

    #[tokio::test]
    async fn a_tls12_key_at_its_limit_ends_the_connection() {
        let pki = pki();
        let (mut server, _client) =
            connect(&pki, cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, b"").await;
        server.records.tx_limit = server.records.tx.seq + 1;
        server.write_all(b"one").await.unwrap();
        let e = server.write_all(b"two").await.unwrap_err();
        assert!(e.to_string().contains("confidentiality limit"), "{e}");
    }

    #[tokio::test]
    async fn a_tampered_record_is_refused() {
        let pki = pki();
        for suite in [SUITES[0], SUITES[3], SUITES[5]] {
            let (mut server, client) = connect(&pki, suite, b"").await;
            let mut client = tokio::task::spawn_blocking(move || client.join().unwrap())
                .await
                .unwrap();
            client.conn.writer().write_all(b"PUBLISH").unwrap();
            let mut record = Vec::new();
            client.conn.write_tls(&mut record).unwrap();
            let last = record.len() - 1;
            record[last] ^= 1;
            client.sock.write_all(&record).unwrap();
            let mut buf = [0u8; 16];
            let e = server.read(&mut buf).await.unwrap_err();
            assert!(e.to_string().contains("integrity"), "{suite:?}: {e}");
        }
    }

    #[tokio::test]
    async fn an_oversized_or_unprotected_record_is_refused() {
        let pki = pki();
        for (bytes, says) in [
            (&[23u8, 3, 3, 0x48, 0x01][..], "over the limit"),
            (&[22u8, 3, 3, 0, 4, 1, 2, 3, 4][..], "unprotected"),
        ] {
            let (mut server, client) = connect(&pki, SUITES[0], b"").await;
            let mut client = tokio::task::spawn_blocking(move || client.join().unwrap())
                .await
                .unwrap();
            client.sock.write_all(bytes).unwrap();
            let mut buf = [0u8; 16];
            let e = server.read(&mut buf).await.unwrap_err();
            assert!(e.to_string().contains(says), "{e}");
        }
    }
}
