//! API keys: generation, hashing, lookup, and who the caller is.

use crate::error::ApiError;
use rand::RngCore;
use std::collections::HashMap;
use std::sync::{Mutex, RwLock};
use tally_ledger::{OrganizationId, Timestamp};
use tally_store::{ApiKeyRecord, ApiKeys};

/// Visible characters of a key kept for listings ("tly_org_1a2b3c").
const PREFIX_LENGTH: usize = 14;
/// Random bytes in a key: 256 bits, far beyond guessing.
const SECRET_BYTES: usize = 32;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    Admin { key: u64 },
    Organization { key: u64, organization: OrganizationId, scopes: Scopes },
}

/// What an organization's key may do beyond reading its own data: `write` (everything),
/// or only `usage` (report usage, access checks and reservations: a metering key) or
/// only `payouts` (verification, bank accounts, payouts).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scopes {
    pub write: bool,
    pub usage: bool,
    pub payouts: bool,
}

/// The scopes a key can be given; every key reads.
pub const SCOPES: [&str; 4] = ["read", "write", "usage", "payouts"];

impl Scopes {
    pub fn parse(text: &str) -> Scopes {
        let has = |name: &str| text.split(',').any(|s| s.trim() == name);
        Scopes { write: has("write"), usage: has("usage"), payouts: has("payouts") }
    }
}

/// A scope an endpoint needs besides `write`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Usage,
    Payouts,
}

impl Caller {
    /// Idempotency keys are scoped to the owner of the API key.
    pub fn scope(&self) -> String {
        match self {
            Caller::Admin { .. } => "platform".into(),
            Caller::Organization { organization, .. } => organization.to_string(),
        }
    }

    pub fn is_admin(&self) -> bool {
        matches!(self, Caller::Admin { .. })
    }

    /// Whether the caller may see `organization`'s data. Others get 404, not 403, so
    /// they cannot even learn that it exists.
    pub fn owns(&self, organization: OrganizationId) -> bool {
        match self {
            Caller::Admin { .. } => true,
            Caller::Organization { organization: own, .. } => *own == organization,
        }
    }

    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(ApiError::not_found())
        }
    }

    /// The API key's id, which rate limits count against.
    pub fn key_id(&self) -> u64 {
        match self {
            Caller::Admin { key } | Caller::Organization { key, .. } => *key,
        }
    }

    /// Allowed with the write scope or with `scope` itself.
    pub fn require_scope(&self, scope: Scope) -> Result<(), ApiError> {
        match (self, scope) {
            (Caller::Admin { .. }, _) => Ok(()),
            (Caller::Organization { scopes, .. }, _) if scopes.write => Ok(()),
            (Caller::Organization { scopes, .. }, Scope::Usage) if scopes.usage => Ok(()),
            (Caller::Organization { scopes, .. }, Scope::Payouts) if scopes.payouts => Ok(()),
            (_, Scope::Usage) => Err(ApiError::new("forbidden", "this API key lacks the usage (or write) scope")),
            (_, Scope::Payouts) => Err(ApiError::new("forbidden", "this API key lacks the payouts (or write) scope")),
        }
    }

    pub fn require_write(&self) -> Result<(), ApiError> {
        match self {
            Caller::Organization { scopes, .. } if !scopes.write => {
                Err(ApiError::new("forbidden", "this API key may not make changes (it lacks the write scope)"))
            }
            _ => Ok(()),
        }
    }
}

/// Runs a call into the key table, which may block on the network (PostgreSQL's sync
/// client runs its own runtime and must not run on an async worker): on a
/// multi-threaded runtime it runs as a blocking section; elsewhere directly.
fn blocking<T>(call: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(call)
        }
        _ => call(),
    }
}

/// A newly made key: the secret is shown once and never stored.
pub struct NewKey {
    pub secret: String,
    pub record: ApiKeyRecord,
}

fn hash(secret: &str) -> [u8; 32] {
    *blake3::hash(secret.as_bytes()).as_bytes()
}

pub fn generate(
    organization: Option<OrganizationId>,
    write: bool,
    name: &str,
    now: Timestamp,
    expires_at: Option<Timestamp>,
) -> NewKey {
    let mut bytes = [0u8; SECRET_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let kind = if organization.is_some() { "org" } else { "adm" };
    let secret = format!("tly_{kind}_{}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>());
    let record = ApiKeyRecord {
        id: 0,
        prefix: secret[..PREFIX_LENGTH].to_string(),
        hash: hash(&secret),
        organization,
        scopes: if write { "read,write".into() } else { "read".into() },
        name: name.to_string(),
        created_at: now,
        expires_at,
        revoked_at: None,
    };
    NewKey { secret, record }
}

/// The key table, cached in memory and read again every few seconds; a miss looks in
/// the database again (at most every 200 ms), so keys made
/// by `tally admin create-key` while the server runs work at once.
pub struct KeyRing {
    store: Mutex<ApiKeys>,
    cache: RwLock<HashMap<[u8; 32], ApiKeyRecord>>,
    /// When the cache was last read whole from the table: it is read again after
    /// `KEY_CACHE_TTL`, so a key revoked by another node (or the CLI) stops working
    /// here within that time.
    loaded_ms: std::sync::atomic::AtomicU64,
    started: std::time::Instant,
    /// Keys that exist only in this process, for portal sessions (which live in memory
    /// too): never stored, gone at restart, bounded like the sessions.
    ephemeral: RwLock<HashMap<[u8; 32], ApiKeyRecord>>,
    next_ephemeral: std::sync::atomic::AtomicU64,
}

/// How long a cached key table is trusted before it is read again.
const KEY_CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(5);
/// The least time between two reads of the whole table after a cache miss, so unknown
/// keys cannot make every request scan it.
const MISS_RELOAD_MIN: std::time::Duration = std::time::Duration::from_millis(200);
/// Most in-memory keys at once (one per portal session).
const EPHEMERAL_MAX: usize = 10_000;
/// Ids of in-memory keys start here, far above any stored key's.
const EPHEMERAL_ID_BASE: u64 = 1 << 48;

impl KeyRing {
    pub fn new(mut store: ApiKeys) -> Result<KeyRing, tally_store::StoreError> {
        let cache = store.all()?.into_iter().map(|record| (record.hash, record)).collect();
        Ok(KeyRing {
            store: Mutex::new(store),
            cache: RwLock::new(cache),
            loaded_ms: std::sync::atomic::AtomicU64::new(0),
            started: std::time::Instant::now(),
            ephemeral: RwLock::new(HashMap::new()),
            next_ephemeral: std::sync::atomic::AtomicU64::new(EPHEMERAL_ID_BASE),
        })
    }

    /// Reads the whole table again when the cache is older than `older_than`. One
    /// request refreshes; the others go on with the cache meanwhile.
    fn refresh(&self, older_than: std::time::Duration) {
        use std::sync::atomic::Ordering;
        let now = self.started.elapsed().as_millis() as u64;
        let loaded = self.loaded_ms.load(Ordering::Relaxed);
        if now.saturating_sub(loaded) < older_than.as_millis() as u64
            || self.loaded_ms.compare_exchange(loaded, now, Ordering::AcqRel, Ordering::Relaxed).is_err()
        {
            return;
        }
        match blocking(|| self.store.lock().expect("key store lock").all()) {
            Ok(fresh) => {
                *self.cache.write().expect("key cache lock") = fresh.into_iter().map(|r| (r.hash, r)).collect()
            }
            Err(error) => tracing::warn!(%error, "reading the API key table failed; keeping the cached keys"),
        }
    }

    /// Makes a key that lives only in this process until `expires_at` or `forget`.
    pub fn insert_ephemeral(&self, mut key: NewKey, now: Timestamp) -> NewKey {
        key.record.id = self.next_ephemeral.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut keys = self.ephemeral.write().expect("ephemeral keys lock");
        keys.retain(|_, record| record.expires_at.is_none_or(|at| at > now));
        while keys.len() >= EPHEMERAL_MAX {
            let oldest = keys.values().map(|record| record.id).min();
            keys.retain(|_, record| Some(record.id) != oldest);
        }
        keys.insert(key.record.hash, key.record.clone());
        key
    }

    /// Ends an in-memory key at once.
    pub fn forget(&self, id: u64) {
        self.ephemeral.write().expect("ephemeral keys lock").retain(|_, record| record.id != id);
    }

    pub fn is_empty(&self) -> bool {
        self.cache.read().expect("key cache lock").is_empty()
    }

    pub fn insert(&self, mut key: NewKey) -> Result<NewKey, tally_store::StoreError> {
        key.record.id = blocking(|| self.store.lock().expect("key store lock").insert(&key.record))?;
        self.cache.write().expect("key cache lock").insert(key.record.hash, key.record.clone());
        Ok(key)
    }

    pub fn revoke(&self, id: u64, now: Timestamp) -> Result<bool, tally_store::StoreError> {
        let revoked = blocking(|| self.store.lock().expect("key store lock").revoke(id, now))?;
        if revoked {
            for record in self.cache.write().expect("key cache lock").values_mut() {
                if record.id == id {
                    record.revoked_at = Some(now);
                }
            }
        }
        Ok(revoked)
    }

    pub fn list(&self) -> Vec<ApiKeyRecord> {
        let mut all: Vec<ApiKeyRecord> = self.cache.read().expect("key cache lock").values().cloned().collect();
        all.sort_by_key(|record| record.id);
        all
    }

    /// Who holds this bearer secret, if it is a live key.
    pub fn authenticate(&self, secret: &str, now: Timestamp) -> Result<Caller, ApiError> {
        let unauthorized =
            || ApiError::new("unauthorized", "a valid API key is required: Authorization: Bearer tly_...");
        if !secret.starts_with("tly_") || secret.len() > 128 {
            return Err(unauthorized());
        }
        self.refresh(KEY_CACHE_TTL);
        let digest = hash(secret);
        let cached = self.cache.read().expect("key cache lock").get(&digest).cloned();
        let cached = cached.or_else(|| self.ephemeral.read().expect("ephemeral keys lock").get(&digest).cloned());
        let record = match cached {
            Some(record) => record,
            None => {
                // A key made since the last read (by the CLI, or another node).
                self.refresh(MISS_RELOAD_MIN);
                self.cache.read().expect("key cache lock").get(&digest).cloned().ok_or_else(unauthorized)?
            }
        };
        if record.revoked_at.is_some() || record.expires_at.is_some_and(|at| at <= now) {
            return Err(unauthorized());
        }
        Ok(match record.organization {
            None => Caller::Admin { key: record.id },
            Some(organization) => {
                Caller::Organization { key: record.id, organization, scopes: Scopes::parse(&record.scopes) }
            }
        })
    }
}

/// Requests per second each API key may make: a token bucket per key that refills at
/// `per_second` and holds at most one second's worth. Over it, requests get 429
/// `rate_limited` with Retry-After. Sharded by key so keys do not contend.
pub struct RateLimiter {
    per_second: std::sync::atomic::AtomicU32,
    shards: Vec<Mutex<HashMap<u64, (f64, std::time::Instant)>>>,
}

const RATE_SHARDS: usize = 16;
/// Buckets kept per shard before idle ones are dropped.
const RATE_BUCKETS_PER_SHARD_MAX: usize = 4_096;

impl RateLimiter {
    /// `per_second` of 0 turns limiting off.
    pub fn new(per_second: u32) -> RateLimiter {
        RateLimiter {
            per_second: std::sync::atomic::AtomicU32::new(per_second),
            shards: (0..RATE_SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    /// Changes the limit while serving (0: off).
    pub fn set(&self, per_second: u32) {
        self.per_second.store(per_second, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn check(&self, key: u64) -> Result<(), ApiError> {
        let per_second = f64::from(self.per_second.load(std::sync::atomic::Ordering::Relaxed));
        if per_second <= 0.0 {
            return Ok(());
        }
        let now = std::time::Instant::now();
        let mut shard = self.shards[(key as usize) % RATE_SHARDS].lock().expect("rate shard lock");
        if shard.len() >= RATE_BUCKETS_PER_SHARD_MAX && !shard.contains_key(&key) {
            // Idle a second or more: full again, so forgetting them changes nothing.
            shard.retain(|_, (_, at)| now.duration_since(*at).as_secs_f64() < 1.0);
        }
        let (tokens, at) = shard.entry(key).or_insert((per_second, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * per_second).min(per_second);
        *at = now;
        if *tokens < 1.0 {
            return Err(ApiError::new(
                "rate_limited",
                format!("this API key is limited to {per_second} requests per second; retry shortly"),
            ));
        }
        *tokens -= 1.0;
        Ok(())
    }
}
