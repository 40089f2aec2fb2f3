//! Basic-auth credentials: argon2id hashes at rest, a cache of verified credentials in
//! memory.
//!
//! Verifying an argon2id hash costs tens of milliseconds by design, so each credential is
//! verified once and then trusted for `ttl`. The cache is keyed by the user name and a
//! 128-bit keyed hash of the password (keys drawn at start-up), so it never holds a password.
//! Unknown users are checked against a dummy hash, so a wrong user name costs the same time
//! as a wrong password.
//!
//! Failed logins are throttled per client address and user name, with a bound on the user
//! names tried from one address ([`Authenticator`] says how).

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

/// Entries each throttle table holds at once (addresses with failures, users known at
/// addresses); beyond it that table starts afresh.
const FAILURE_CAPACITY: usize = 10_000;
/// The window in which failures from one client address are counted.
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// How long a user who logged in from an address stays known there: past the bound on
/// user names tried from it, known users still get their passwords checked.
const KNOWN_FOR: Duration = Duration::from_secs(24 * 60 * 60);

/// Failed logins from one client address in the current window.
struct Failing {
    /// When the window began.
    since: Instant,
    /// Failures per user name tried.
    by_user: HashMap<String, u32>,
}

impl Failing {
    /// Whether the address is past its limit: some user's password was guessed `limit`
    /// times, or `limit` user names were tried.
    fn over(&self, limit: u32) -> bool {
        self.by_user.len() >= limit as usize || self.by_user.values().any(|n| *n >= limit)
    }
}

/// What the throttle remembers, under one lock.
#[derive(Default)]
struct Throttle {
    /// Failures per client address, in its current window.
    failing: HashMap<IpAddr, Failing>,
    /// When each user last logged in from each address.
    known: HashMap<(IpAddr, String), Instant>,
}

/// Verifies credentials against stored hashes, remembering the ones that passed, and slows
/// down guessing.
///
/// Failures are counted per client address and user name, so that one user's stale
/// password (a forgotten tab behind an office's NAT) cannot lock the other users of that
/// address out: after `failure_limit` failures in a minute for one user from one address,
/// that user's logins from there get 429 without being checked, whatever the password.
/// Trying many user names from one address (password spraying) is bounded too: past
/// `failure_limit` names, a name not tried yet gets 429 unchecked, unless its user has
/// logged in from that address before. Once an address is past either bound, its wrong
/// passwords are answered 429 rather than 401, and its right ones still pass.
pub struct Authenticator {
    ttl: Duration,
    keys: (RandomState, RandomState),
    verified: Mutex<HashMap<CacheKey, (Instant, Arc<Grants>)>>,
    failure_limit: u32,
    throttle_loopback: bool,
    throttle: Mutex<Throttle>,
}

impl Authenticator {
    /// An authenticator trusting a verified credential for `ttl`, throttling after
    /// `failure_limit` failures in a minute (0: never) as the type's docs describe.
    /// Loopback clients are exempt unless `throttle_loopback`.
    pub fn new(ttl: Duration, failure_limit: u32, throttle_loopback: bool) -> Authenticator {
        Authenticator {
            ttl,
            keys: (RandomState::new(), RandomState::new()),
            verified: Mutex::new(HashMap::new()),
            failure_limit,
            throttle_loopback,
            throttle: Mutex::new(Throttle::default()),
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
        let counted = self.throttled(client);
        // Before the cache, or a guess that matches a recently used password would pass.
        if let Some(wait) = counted.and_then(|ip| self.refused(ip, &creds.user, now)) {
            return Ok(Checked::Throttled(wait));
        }
        {
            let cache = crate::lock::lock(&self.verified);
            if let Some((at, grants)) = cache.get(&key)
                && now.duration_since(*at) < self.ttl
            {
                return Ok(Checked::Valid(grants.clone()));
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
            let wait = counted.and_then(|ip| self.failed(ip, &creds.user, now));
            return Ok(wait.map_or(Checked::Invalid, Checked::Throttled));
        };
        if let Some(ip) = counted {
            let mut throttle = crate::lock::lock(&self.throttle);
            if throttle.known.len() >= FAILURE_CAPACITY {
                throttle.known.clear();
            }
            throttle.known.insert((ip, creds.user.clone()), now);
        }
        let grants = Arc::new(grants);
        let mut cache = crate::lock::lock(&self.verified);
        if cache.len() >= CACHE_CAPACITY {
            cache.clear();
        }
        cache.insert(key, (now, grants.clone()));
        Ok(Checked::Valid(grants))
    }

    /// How long `user` must wait before a login from `ip` is checked, if it must: its
    /// password was guessed too often from there, or too many names were tried from there
    /// and `user` is neither one of them nor known there.
    fn refused(&self, ip: IpAddr, user: &str, now: Instant) -> Option<Duration> {
        let throttle = crate::lock::lock(&self.throttle);
        let failing = throttle.failing.get(&ip)?;
        let wait = FAILURE_WINDOW.checked_sub(now.duration_since(failing.since))?;
        let limit = self.failure_limit;
        let guessed = match failing.by_user.get(user) {
            Some(tries) => *tries >= limit,
            None if failing.by_user.len() >= limit as usize => {
                let last_login = throttle.known.get(&(ip, user.to_owned()));
                last_login.is_none_or(|at| now.duration_since(*at) >= KNOWN_FOR)
            }
            None => false,
        };
        guessed.then_some(wait)
    }

    /// Counts a failure of `user` from `ip`; how long to wait if the address was already
    /// past its limit.
    fn failed(&self, ip: IpAddr, user: &str, now: Instant) -> Option<Duration> {
        let mut throttle = crate::lock::lock(&self.throttle);
        if throttle.failing.len() >= FAILURE_CAPACITY {
            throttle.failing.clear();
        }
        let fresh = || Failing {
            since: now,
            by_user: HashMap::new(),
        };
        let failing = throttle.failing.entry(ip).or_insert_with(fresh);
        if now.duration_since(failing.since) >= FAILURE_WINDOW {
            *failing = fresh();
        }
        let over = failing.over(self.failure_limit);
        *failing.by_user.entry(user.to_owned()).or_default() += 1;
        over.then(|| FAILURE_WINDOW.saturating_sub(now.duration_since(failing.since)))
    }
}

/// Whether `name` matches `pattern`, where each `*` matches any run of characters.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    // Checked on every poll's grant: no allocation.
    let Some((head, last)) = pattern.rsplit_once('*') else {
        return pattern == name;
    };
    let mut parts = head.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = name.strip_prefix(first) else {
        return false;
    };
    for part in parts {
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

    /// Logins from one address behind a NAT, where every user's password is `pw`; nothing
    /// is cached, so each login that is checked looks its user up.
    struct Nat {
        auth: Authenticator,
        hash: String,
        lookups: std::cell::Cell<u32>,
    }

    impl Nat {
        fn new(limit: u32) -> Nat {
            Nat {
                auth: Authenticator::new(Duration::ZERO, limit, false),
                hash: hash_password("pw"),
                lookups: Default::default(),
            }
        }

        fn login(&self, user: &str, password: &str) -> Checked {
            let creds = parse_basic(&basic(&format!("{user}:{password}"))).unwrap();
            let nat = Some(IpAddr::from([198, 51, 100, 1]));
            let lookup = |_: &str| {
                self.lookups.set(self.lookups.get() + 1);
                let grants = Grants::new("*", "*");
                let hash = self.hash.clone();
                Ok::<_, ()>(Some(Stored { hash, grants }))
            };
            self.auth.check(&creds, nat, lookup).unwrap()
        }

        /// Whether `user`'s login is refused without checking the password.
        fn refused_unchecked(&self, user: &str, password: &str) -> bool {
            let before = self.lookups.get();
            matches!(self.login(user, password), Checked::Throttled(_))
                && self.lookups.get() == before
        }
    }

    #[test]
    fn one_users_wrong_password_does_not_lock_out_the_others_at_its_address() {
        let nat = Nat::new(3);
        for _ in 0..3 {
            assert_eq!(nat.login("alice", "stale"), Checked::Invalid);
        }
        assert!(nat.refused_unchecked("alice", "stale"));
        assert!(
            nat.refused_unchecked("alice", "pw"),
            "guessing alice stays throttled"
        );
        assert!(matches!(nat.login("bob", "pw"), Checked::Valid(_)));
        // The address is past its limit: a wrong password says so, a right one passes.
        assert!(matches!(nat.login("carol", "typo"), Checked::Throttled(_)));
        assert!(matches!(nat.login("carol", "pw"), Checked::Valid(_)));
    }

    #[test]
    fn spraying_user_names_is_bounded_but_known_users_still_pass() {
        let nat = Nat::new(3);
        assert!(matches!(nat.login("dave", "pw"), Checked::Valid(_)));
        for user in ["u1", "u2", "u3"] {
            assert_eq!(nat.login(user, "123456"), Checked::Invalid);
        }
        assert!(nat.refused_unchecked("u4", "123456"));
        assert!(
            nat.refused_unchecked("u4", "pw"),
            "an unknown name is not checked"
        );
        assert!(matches!(nat.login("dave", "pw"), Checked::Valid(_)));
        assert!(
            matches!(nat.login("u1", "pw"), Checked::Valid(_)),
            "tried, not guessed"
        );
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
