//! What every handler shares: the engine slot, limits, keys, metrics, jobs.

use crate::jobs::Jobs;
use crate::limits::{AudioAdmission, Limits, RateLimits};
use crate::metrics::Metrics;
use crate::reload::EngineSlot;
use std::sync::Arc;
use triage_engine::Engine;

/// Who is calling: a local process on the socket, or a TCP client.
#[derive(Debug, Clone)]
pub enum Peer {
    Unix {
        pid: Option<i32>,
        uid: u32,
        gid: u32,
    },
    Tcp(std::net::SocketAddr),
}

/// A bearer key for TCP clients and the tasks it may use (empty: all).
#[derive(Debug, Clone)]
pub struct ApiKey {
    pub key: String,
    pub name: String,
    pub tasks: Vec<String>,
    /// Requests per minute this key may make (token bucket); `None`: unlimited.
    pub rpm: Option<u32>,
    /// May send overrides that can spend hosted dollars (`Overrides::SPENDING`).
    pub allow_overrides: bool,
    /// May read and change everything the web UI shows (`/ui/api/...`):
    /// named in `TRIAGE_ADMIN_KEYS` or `admin = true` in `[[server.keys]]`.
    pub admin: bool,
}

/// Everything the handlers share.
pub struct AppState {
    /// The engine every route answers with; a reload swaps it.
    pub engine: EngineSlot,
    pub limits: Limits,
    /// Keys from `TRIAGE_API_KEYS` (the config may add more).
    pub keys: Vec<ApiKey>,
    pub metrics: Metrics,
    pub jobs: Jobs,
    pub rate_limits: RateLimits,
    /// Transcriptions decoding now and waiting for a slot.
    pub audio: AudioAdmission,
    /// Open, refused and timed-out connections per listener.
    pub edge: crate::edge::EdgeCounts,
    /// Failed key checks per peer (slowed past a limit).
    pub auth_failures: crate::auth::Failures,
    /// Engines a reload replaced, with their ledgers: requests that started
    /// on them may still be writing, so every one is flushed at shutdown.
    pub(crate) retired: std::sync::Mutex<Vec<(std::sync::Weak<Engine>, triage_engine::Ledger)>>,
    /// Held by a designer save from reading the file to the reload, so two
    /// saves in this process never interleave.
    pub(crate) designer: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("engine", &self.engine)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

pub type Shared = Arc<AppState>;

impl AppState {
    /// A server state answering with `engine`.
    pub fn new(engine: Engine, limits: Limits, keys: Vec<ApiKey>) -> Shared {
        Arc::new(Self {
            engine: EngineSlot::new(engine),
            audio: AudioAdmission::new(&limits),
            edge: Default::default(),
            auth_failures: Default::default(),
            limits,
            keys,
            metrics: Metrics::default(),
            jobs: Jobs::default(),
            rate_limits: RateLimits::default(),
            retired: Default::default(),
            designer: tokio::sync::Mutex::new(()),
        })
    }

    /// Every ledger rows may still be going to: the current engine's and
    /// those of replaced engines still in use or not yet flushed.
    pub fn ledgers(&self) -> Vec<triage_engine::Ledger> {
        let mut out: Vec<triage_engine::Ledger> =
            self.engine.current().ledger.iter().cloned().collect();
        let retired = self
            .retired
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        out.extend(retired.iter().map(|(_, l)| l.clone()));
        out
    }

    /// The ledger's state for `/ready` and `/metrics`: the current engine's,
    /// which new requests write to.
    pub fn ledger_health(&self) -> Option<triage_engine::ledger::LedgerHealth> {
        self.engine.current().ledger.as_ref().map(|l| l.health())
    }

    /// Longest audio accepted: the config's `server.max_audio_seconds`, else the limit.
    #[cfg(feature = "speech")]
    pub(crate) fn max_audio_s(&self) -> f64 {
        self.engine
            .current()
            .config
            .server
            .max_audio_seconds
            .unwrap_or(self.limits.max_audio_s)
    }

    /// The bearer key `given` names: from `TRIAGE_API_KEYS`, or from the
    /// current config's `server.keys` (whose values come from the environment).
    /// Every key is compared, each in constant time ([`same_secret`]), so
    /// the time taken tells nothing of how much of a key was right.
    pub fn find_key(&self, given: &str) -> Option<ApiKey> {
        let mut found = None;
        for k in &self.keys {
            if same_secret(&k.key, given) && found.is_none() {
                found = Some(k.clone());
            }
        }
        if found.is_some() {
            return found;
        }
        let engine = self.engine.current();
        let mut config_key = None;
        for k in &engine.config.server.keys {
            if k.key
                .as_ref()
                .is_some_and(|v| same_secret(v.expose(), given))
                && config_key.is_none()
            {
                config_key = Some(k);
            }
        }
        config_key.map(|k| ApiKey {
            key: given.to_owned(),
            name: k.name.clone(),
            tasks: k.tasks.clone(),
            rpm: k.requests_per_minute,
            allow_overrides: k.allow_overrides,
            admin: k.admin,
        })
    }

    /// Whether any bearer key can be used (TCP refuses to start without one).
    pub fn has_keys(&self) -> bool {
        !self.keys.is_empty()
            || self
                .engine
                .current()
                .config
                .server
                .keys
                .iter()
                .any(|k| k.key.is_some())
    }
}

/// Whether two secrets are equal, in time that depends only on their
/// lengths (every byte is compared, without an early exit).
pub fn same_secret(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0xff);
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod secret_tests {
    use super::same_secret;

    #[test]
    fn secrets_compare_equal_only_when_every_byte_is() {
        assert!(same_secret("sk-abc", "sk-abc"));
        assert!(!same_secret("sk-abc", "sk-abd"));
        assert!(!same_secret("sk-abc", "sk-ab"));
        assert!(!same_secret("sk-ab", "sk-abc"));
        assert!(!same_secret("", "x"));
        assert!(same_secret("", ""));
    }
}
