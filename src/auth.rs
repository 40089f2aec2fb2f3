//! Basic-auth credentials: argon2id hashes at rest, a cache of verified credentials in
//! memory.
//!
//! Verifying an argon2id hash costs tens of milliseconds by design, so each credential is
//! verified once and then trusted for `ttl`. The cache is keyed by the user name and a
//! 128-bit keyed hash of the password (keys drawn at start-up), so it never holds a password.
//! Unknown users are checked against a dummy hash, so a wrong user name costs the same time
//! as a wrong password.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use base64::Engine;

/// Most credentials remembered at once; beyond it the cache starts afresh.
const CACHE_CAPACITY: usize = 10_000;

/// A user name and password taken from an `Authorization: Basic` header.
pub struct Credentials {
    /// The user name.
    pub user: String,
    password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the password, even in debug output.
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// Parses an `Authorization` header value; `None` for anything but well-formed Basic auth.
pub fn parse_basic(header: &str) -> Option<Credentials> {
    let (scheme, encoded) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    if user.is_empty() {
        return None;
    }
    Some(Credentials {
        user: user.to_owned(),
        password: password.to_owned(),
    })
}

/// Hashes a password with argon2id and a random salt, as stored in the database.
pub fn hash_password(password: &str) -> String {
    // A v4 UUID carries 122 random bits from the OS, plenty for a salt.
    let salt = SaltString::encode_b64(uuid::Uuid::new_v4().as_bytes())
        .expect("16 bytes is a valid salt length");
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .expect("argon2 with default parameters cannot fail on a valid salt")
        .to_string()
}

/// Checks `password` against a stored hash in constant time (argon2's own comparison).
fn verify(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|parsed| {
            Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        })
        .unwrap_or(false)
}

/// A hash of a password nobody has, checked for unknown users to equalise timing.
fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| hash_password(&uuid::Uuid::new_v4().to_string()))
}

/// Verifies credentials against stored hashes, remembering the ones that passed.
pub struct Authenticator {
    ttl: Duration,
    keys: (RandomState, RandomState),
    verified: Mutex<HashMap<(String, u128), Instant>>,
}

impl Authenticator {
    /// An authenticator trusting a verified credential for `ttl`.
    pub fn new(ttl: Duration) -> Authenticator {
        Authenticator {
            ttl,
            keys: (RandomState::new(), RandomState::new()),
            verified: Mutex::new(HashMap::new()),
        }
    }

    fn fingerprint(&self, password: &str) -> u128 {
        let half = |state: &RandomState| {
            let mut h = state.build_hasher();
            h.write(password.as_bytes());
            h.finish() as u128
        };
        half(&self.keys.0) << 64 | half(&self.keys.1)
    }

    /// Whether `creds` are valid; `lookup` fetches a user's stored hash on a cache miss.
    pub fn check<E>(
        &self,
        creds: &Credentials,
        lookup: impl FnOnce(&str) -> Result<Option<String>, E>,
    ) -> Result<bool, E> {
        let key = (creds.user.clone(), self.fingerprint(&creds.password));
        let now = Instant::now();
        {
            let cache = self.verified.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(at) = cache.get(&key)
                && now.duration_since(*at) < self.ttl
            {
                return Ok(true);
            }
        }
        let ok = match lookup(&creds.user)? {
            Some(hash) => verify(&creds.password, &hash),
            None => {
                verify(&creds.password, dummy_hash());
                false
            }
        };
        if ok {
            let mut cache = self.verified.lock().unwrap_or_else(|e| e.into_inner());
            if cache.len() >= CACHE_CAPACITY {
                cache.clear();
            }
            cache.insert(key, now);
        }
        Ok(ok)
    }
}

/// Whether `name` matches `pattern`, where each `*` matches any run of characters.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = name.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

#[cfg(test)]
mod tests {
    #[test]
    fn globs_match() {
        assert!(glob_match("*", "anything"));
        assert!(glob_match("orders*", "orders-2024"));
        assert!(!glob_match("orders*", "order"));
        assert!(glob_match("a*c*e", "abcde"));
        assert!(!glob_match("a*c*e", "abcd"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("exact", "exactly"));
        assert!(glob_match("*-log", "x-log"));
        assert!(!glob_match("ab*ba", "aba"));
    }

    use super::*;

    fn basic(raw: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }

    #[test]
    fn parses_basic_headers() {
        let c = parse_basic(&basic("alice:s3:cret")).expect("valid");
        assert_eq!(c.user, "alice");
        assert_eq!(c.password, "s3:cret");
        assert!(parse_basic("Bearer abc").is_none());
        assert!(parse_basic("Basic !!!").is_none());
        assert!(parse_basic(&basic("nocolon")).is_none());
        assert!(parse_basic(&basic(":pw")).is_none());
        let not_utf8 = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode([0xff, b':', b'x'])
        );
        assert!(parse_basic(&not_utf8).is_none());
    }

    #[test]
    fn verifies_and_caches() {
        let hash = hash_password("pw");
        let auth = Authenticator::new(Duration::from_secs(60));
        let good = parse_basic(&basic("alice:pw")).unwrap();
        let bad = parse_basic(&basic("alice:nope")).unwrap();
        let lookups = std::cell::Cell::new(0);
        let lookup = |_: &str| -> Result<Option<String>, ()> {
            lookups.set(lookups.get() + 1);
            Ok(Some(hash.clone()))
        };
        assert_eq!(auth.check(&good, lookup), Ok(true));
        assert_eq!(auth.check(&good, lookup), Ok(true));
        assert_eq!(
            lookups.get(),
            1,
            "the second check is served from the cache"
        );
        assert_eq!(auth.check(&bad, lookup), Ok(false));
        assert_eq!(auth.check(&good, |_| Ok::<_, ()>(None)), Ok(true));
        let unknown = parse_basic(&basic("bob:pw")).unwrap();
        assert_eq!(auth.check(&unknown, |_| Ok::<_, ()>(None)), Ok(false));
    }
}
