//! Username and password checks against a password file in the format `mosquitto_passwd`
//! writes: one `username:hash` per line, the hash `$7$iterations$salt$hash` (PBKDF2-HMAC-SHA512,
//! mosquitto 2's default) or `$6$salt$hash` (one SHA-512 of password and salt, mosquitto 1.x),
//! salt and hash in standard base64. Verification is ring's, in constant time; an unknown user
//! costs the same work as a known one, so timing does not say which usernames exist.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::path::Path;

use base64::Engine;
use ring::pbkdf2;

/// More iterations than this make every CONNECT a denial of service; such a file is refused.
const MAX_ITERATIONS: u32 = 1_000_000;

#[derive(Clone)]
enum Hash {
    Pbkdf2 {
        iterations: NonZeroU32,
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
    Sha512 {
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
}

/// A loaded password file. Its Debug output names the users, never a hash.
#[derive(Clone, Default)]
pub struct Passwords {
    users: HashMap<String, Hash>,
}

impl std::fmt::Debug for Passwords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Passwords({} users)", self.users.len())
    }
}

/// The stand-in checked for an unknown username (same work, never matches).
fn decoy() -> Hash {
    Hash::Pbkdf2 {
        iterations: NonZeroU32::new(101).expect("non-zero"),
        salt: vec![0; 12],
        hash: vec![0; 64],
    }
}

impl Passwords {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            anyhow::anyhow!("cannot read the password file {}: {e}", path.display())
        })?;
        Self::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// Parses a password file; errors name the line, never its hash.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let mut users = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let lineno = n + 1;
            let (user, hash) = line
                .split_once(':')
                .ok_or_else(|| anyhow::anyhow!("line {lineno}: expected username:hash"))?;
            if user.is_empty() {
                anyhow::bail!("line {lineno}: empty username");
            }
            let hash =
                parse_hash(hash).map_err(|e| anyhow::anyhow!("line {lineno} ({user:?}): {e}"))?;
            if users.insert(user.to_string(), hash).is_some() {
                anyhow::bail!("line {lineno}: {user:?} is listed twice");
            }
        }
        Ok(Self { users })
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// True when `password` is `user`'s.
    pub fn verify(&self, user: &str, password: &[u8]) -> bool {
        match self.users.get(user) {
            Some(h) => check(h, password),
            None => {
                let _ = check(&decoy(), password);
                false
            }
        }
    }
}

fn check(hash: &Hash, password: &[u8]) -> bool {
    match hash {
        Hash::Pbkdf2 {
            iterations,
            salt,
            hash,
        } => pbkdf2::verify(
            pbkdf2::PBKDF2_HMAC_SHA512,
            *iterations,
            salt,
            password,
            hash,
        )
        .is_ok(),
        Hash::Sha512 { salt, hash } => {
            let mut ctx = ring::digest::Context::new(&ring::digest::SHA512);
            ctx.update(password);
            ctx.update(salt);
            let digest = ctx.finish();
            subtle::ConstantTimeEq::ct_eq(digest.as_ref(), hash.as_slice()).into()
        }
    }
}

fn parse_hash(text: &str) -> anyhow::Result<Hash> {
    let b64 = |s: &str, what: &str| {
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(|_| anyhow::anyhow!("the {what} is not base64"))
    };
    let parts: Vec<&str> = text.split('$').collect();
    match parts.as_slice() {
        ["", "7", iterations, salt, hash] => {
            let iterations: u32 = iterations
                .parse()
                .map_err(|_| anyhow::anyhow!("the iteration count is not a number"))?;
            let iterations = NonZeroU32::new(iterations)
                .filter(|i| i.get() <= MAX_ITERATIONS)
                .ok_or_else(|| anyhow::anyhow!("iterations must be 1 to {MAX_ITERATIONS}"))?;
            let salt = b64(salt, "salt")?;
            let hash = b64(hash, "hash")?;
            if hash.len() != 64 {
                anyhow::bail!("a $7$ hash holds 64 bytes, this one {}", hash.len());
            }
            Ok(Hash::Pbkdf2 {
                iterations,
                salt,
                hash,
            })
        }
        ["", "6", salt, hash] => {
            let salt = b64(salt, "salt")?;
            let hash = b64(hash, "hash")?;
            if hash.len() != 64 {
                anyhow::bail!("a $6$ hash holds 64 bytes, this one {}", hash.len());
            }
            Ok(Hash::Sha512 { salt, hash })
        }
        _ => anyhow::bail!(
            "not a hashed password ($7$ or $6$): a plain-text file must be hashed first \
             (mosquitto_passwd -U FILE)"
        ),
    }
}

/// A `$7$` line for `user` (what `edgehose passwd` and the tests write; mosquitto_passwd reads
/// it back).
pub fn hash_line(user: &str, password: &[u8], iterations: u32) -> String {
    let mut salt = [0u8; 12];
    rand::Rng::fill(&mut rand::rng(), &mut salt[..]);
    let mut out = [0u8; 64];
    let iterations = NonZeroU32::new(iterations.max(1)).expect("non-zero");
    pbkdf2::derive(
        pbkdf2::PBKDF2_HMAC_SHA512,
        iterations,
        &salt,
        password,
        &mut out,
    );
    let b64 = base64::engine::general_purpose::STANDARD;
    format!(
        "{user}:$7${iterations}${}${}",
        b64.encode(salt),
        b64.encode(out)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pbkdf2_lines_verify_and_others_do_not() {
        let file = format!(
            "# devices\n{}\n{}\n",
            hash_line("alice", b"secret", 101),
            hash_line("bob", b"other", 5)
        );
        let p = Passwords::parse(&file).unwrap();
        assert_eq!(p.len(), 2);
        assert!(p.verify("alice", b"secret"));
        assert!(!p.verify("alice", b"secret "));
        assert!(!p.verify("alice", b"other"));
        assert!(p.verify("bob", b"other"));
        assert!(!p.verify("carol", b"secret"));
        assert!(!format!("{p:?}").contains('$'));
    }

    #[test]
    fn sha512_lines_of_mosquitto_1_verify() {
        // $6$: base64(SHA-512(password || salt)).
        let salt = b"0123456789ab";
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA512);
        ctx.update(b"pw");
        ctx.update(salt);
        let b64 = base64::engine::general_purpose::STANDARD;
        let line = format!(
            "dev:$6${}${}",
            b64.encode(salt),
            b64.encode(ctx.finish().as_ref())
        );
        let p = Passwords::parse(&line).unwrap();
        assert!(p.verify("dev", b"pw"));
        assert!(!p.verify("dev", b"pW"));
    }

    #[test]
    fn bad_files_name_the_line_and_not_the_hash() {
        for (text, says) in [
            ("alice", "line 1: expected username:hash"),
            ("alice:plain", "mosquitto_passwd -U"),
            ("alice:$7$0$AAAA$AAAA", "iterations"),
            ("alice:$7$101$!!$AAAA", "salt is not base64"),
            ("alice:$7$101$AAAA$AAAA", "64 bytes"),
            (":$7$101$AAAA$AAAA", "empty username"),
        ] {
            let e = Passwords::parse(text).unwrap_err().to_string();
            assert!(e.contains(says), "{text}: {e}");
        }
        let line = hash_line("a", b"x", 2);
        let e = Passwords::parse(&format!("{line}\n{line}\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && e.contains("twice"), "{e}");
        assert!(!e.contains("$7$"));
    }
}
