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
use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock};
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

/// The streams a user may write and read: comma-separated patterns (`*` wildcard).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grants {
    produce: Vec<String>,
    consume: Vec<String>,
}

impl Grants {
    /// Grants from the stored comma-separated pattern lists.
    pub fn new(produce: &str, consume: &str) -> Grants {
        let split = |list: &str| {
            list.split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(str::to_owned)
                .collect()
        };
        Grants {
            produce: split(produce),
            consume: split(consume),
        }
    }

    /// Whether the user may append or publish to `stream`.
    pub fn may_produce(&self, stream: &str) -> bool {
        self.produce.iter().any(|p| glob_match(p, stream))
    }

    /// Whether the user may read, subscribe to or acknowledge on `stream`.
    pub fn may_consume(&self, stream: &str) -> bool {
        self.consume.iter().any(|p| glob_match(p, stream))
    }
}

/// A user's stored hash and grants, as looked up on a cache miss.
pub struct Stored {
    /// The argon2id hash.
    pub hash: String,
    /// What the user may do.
    pub grants: Grants,
}

/// The outcome of a credential check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checked {
    /// Valid: what the user may do.
    Valid(Arc<Grants>),
    /// Unknown user or wrong password.
    Invalid,
    /// Too many failures from this client lately: try again after this long.
    Throttled(Duration),
}

/// A user name and a keyed 128-bit hash of the password.
type CacheKey = (String, u128);

/// Failed checks remembered per client for throttling; beyond it the table starts afresh.
const FAILURE_CAPACITY: usize = 10_000;
/// The window in which failures from one client are counted.
const FAILURE_WINDOW: Duration = Duration::from_secs(60);

/// Verifies credentials against stored hashes, remembering the ones that passed, and slows
/// down clients that keep failing.
pub struct Authenticator {
    ttl: Duration,
    keys: (RandomState, RandomState),
    verified: Mutex<HashMap<CacheKey, (Instant, Arc<Grants>)>>,
    failure_limit: u32,
    throttle_loopback: bool,
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

impl Authenticator {
    /// An authenticator trusting a verified credential for `ttl`, answering `Throttled` to
    /// a client after `failure_limit` failures in a minute (0: never). Loopback clients are
    /// exempt unless `throttle_loopback`.
    pub fn new(ttl: Duration, failure_limit: u32, throttle_loopback: bool) -> Authenticator {
        Authenticator {
            ttl,
            keys: (RandomState::new(), RandomState::new()),
            verified: Mutex::new(HashMap::new()),
            failure_limit,
            throttle_loopback,
            failures: Mutex::new(HashMap::new()),
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

    /// The client to count failures for, if throttling applies to it.
    fn throttled(&self, client: Option<IpAddr>) -> Option<IpAddr> {
        let ip = client?;
        if self.failure_limit == 0 || (ip.is_loopback() && !self.throttle_loopback) {
            return None;
        }
        Some(ip)
    }

    /// Checks `creds` from `client`; `lookup` fetches a user's stored hash and grants on a
    /// cache miss.
    pub fn check<E>(
        &self,
        creds: &Credentials,
        client: Option<IpAddr>,
        lookup: impl FnOnce(&str) -> Result<Option<Stored>, E>,
    ) -> Result<Checked, E> {
        let key = (creds.user.clone(), self.fingerprint(&creds.password));
        let now = Instant::now();
        {
            let cache = crate::lock::lock(&self.verified);
            if let Some((at, grants)) = cache.get(&key)
                && now.duration_since(*at) < self.ttl
            {
                return Ok(Checked::Valid(grants.clone()));
            }
        }
        let counted = self.throttled(client);
        if let Some(ip) = counted {
            let failures = crate::lock::lock(&self.failures);
            if let Some((count, since)) = failures.get(&ip)
                && *count >= self.failure_limit
                && now.duration_since(*since) < FAILURE_WINDOW
            {
                return Ok(Checked::Throttled(
                    FAILURE_WINDOW - now.duration_since(*since),
                ));
            }
        }
        let grants = match lookup(&creds.user)? {
            Some(stored) if verify(&creds.password, &stored.hash) => Some(stored.grants),
            Some(_) => None,
            None => {
                // Same work as a wrong password, so timing does not reveal user names.
                verify(&creds.password, dummy_hash());
                None
            }
        };
        let Some(grants) = grants else {
            if let Some(ip) = counted {
                let mut failures = crate::lock::lock(&self.failures);
                if failures.len() >= FAILURE_CAPACITY {
                    failures.clear();
                }
                let entry = failures.entry(ip).or_insert((0, now));
                if now.duration_since(entry.1) >= FAILURE_WINDOW {
                    *entry = (0, now);
                }
                entry.0 += 1;
            }
            return Ok(Checked::Invalid);
        };
        let grants = Arc::new(grants);
        let mut cache = crate::lock::lock(&self.verified);
        if cache.len() >= CACHE_CAPACITY {
            cache.clear();
        }
        cache.insert(key, (now, grants.clone()));
        Ok(Checked::Valid(grants))
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
    fn verifies_caches_and_throttles() {
        let hash = hash_password("pw");
        let auth = Authenticator::new(Duration::from_secs(60), 2, false);
        let good = parse_basic(&basic("alice:pw")).unwrap();
        let bad = parse_basic(&basic("alice:nope")).unwrap();
        let lookups = std::cell::Cell::new(0);
        let lookup = |_: &str| -> Result<Option<Stored>, ()> {
            lookups.set(lookups.get() + 1);
            Ok(Some(Stored {
                hash: hash.clone(),
                grants: Grants::new("orders*", "*"),
            }))
        };
        let client = Some(IpAddr::from([192, 0, 2, 1]));
        let Ok(Checked::Valid(grants)) = auth.check(&good, client, lookup) else {
            panic!("valid credentials");
        };
        assert!(grants.may_produce("orders-1") && !grants.may_produce("news"));
        assert!(grants.may_consume("news"));
        assert!(matches!(
            auth.check(&good, client, lookup),
            Ok(Checked::Valid(_))
        ));
        assert_eq!(
            lookups.get(),
            1,
            "the second check is served from the cache"
        );
        assert_eq!(auth.check(&bad, client, lookup), Ok(Checked::Invalid));
        let unknown = parse_basic(&basic("bob:pw")).unwrap();
        let none = |_: &str| Ok::<_, ()>(None);
        assert_eq!(auth.check(&unknown, client, none), Ok(Checked::Invalid));
        assert!(matches!(
            auth.check(&bad, client, lookup),
            Ok(Checked::Throttled(_))
        ));
        let loopback = Some(IpAddr::from([127, 0, 0, 1]));
        for _ in 0..3 {
            assert_eq!(auth.check(&bad, loopback, lookup), Ok(Checked::Invalid));
        }
    }

    proptest::proptest! {
        // Each case hashes and verifies with argon2 (tens of milliseconds each); failures
        // print their minimal input, with no regression files beside the sources.
        #![proptest_config(proptest::test_runner::Config {
            cases: 8,
            failure_persistence: None,
            ..proptest::test_runner::Config::default()
        })]

        /// The password comes back too: the credential verifies against the password's hash.
        #[test]
        fn basic_passwords_come_back(user in "[^:]{1,8}", password in proptest::arbitrary::any::<String>()) {
            let creds = parse_basic(&basic(&format!("{user}:{password}"))).expect("valid header");
            let auth = Authenticator::new(Duration::from_secs(60), 0, false);
            let hash = hash_password(&password);
            let stored = || Some(Stored { hash: hash.clone(), grants: Grants::new("*", "*") });
            let checked = auth.check(&creds, None, |_| Ok::<_, ()>(stored())).unwrap();
            proptest::prop_assert!(matches!(checked, Checked::Valid(_)), "the password did not come back");
            let wrong = parse_basic(&basic(&format!("{user}:{password}x"))).expect("valid header");
            let checked = auth.check(&wrong, None, |_| Ok::<_, ()>(stored())).unwrap();
            proptest::prop_assert_eq!(checked, Checked::Invalid, "another password passed");
        }
    }
}
