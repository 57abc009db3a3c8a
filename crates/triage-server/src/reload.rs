//! The engine a config-driven server answers with, and its reload (SIGHUP).
//! Each request clones the current `Arc<Engine>` when it starts, so requests
//! in flight finish on the engine they started with while new ones get the
//! reloaded one. A config that does not parse or validate is logged and the
//! old engine stays.

use crate::state::AppState;
use indexmap::IndexMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use triage_engine::config::LocalSpec;
use triage_engine::{Config, ConfigError, Engine, EngineError};

/// The engine the server answers with; a reload swaps it.
pub struct EngineSlot(RwLock<Arc<Engine>>);

impl std::fmt::Debug for EngineSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tasks: Vec<String> = self.current().config.tasks.keys().cloned().collect();
        f.debug_tuple("EngineSlot").field(&tasks).finish()
    }
}

impl EngineSlot {
    pub fn new(engine: Engine) -> Self {
        Self(RwLock::new(Arc::new(engine)))
    }

    /// The engine to run one request on (a clone of the `Arc`: a reload
    /// during the request does not affect it).
    pub fn current(&self) -> Arc<Engine> {
        // A poisoned lock still holds a valid `Arc`: a panic cannot leave it half-written.
        match self.0.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Swap in `engine`; returns the one it replaced.
    fn replace(&self, engine: Arc<Engine>) -> Arc<Engine> {
        match self.0.write() {
            Ok(mut g) => std::mem::replace(&mut *g, engine),
            Err(p) => std::mem::replace(&mut *p.into_inner(), engine),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("the new config is not usable; still serving the old one")]
    Config(#[source] ConfigError),
    #[error("the new config's engine cannot start; still serving the old one")]
    Engine(#[source] EngineError),
}

/// What a successful reload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reloaded {
    /// The `[local]` tables were unchanged, so the loaded models were kept.
    pub reused_specialists: bool,
}

/// Whether two `[local]` tables would load the same models.
fn same_locals(a: &IndexMap<String, LocalSpec>, b: &IndexMap<String, LocalSpec>) -> bool {
    a.len() == b.len()
        && a.iter().zip(b.iter()).all(|((na, sa), (nb, sb))| {
            na == nb
                && sa.model == sb.model
                && sa.kind == sb.kind
                && sa.device == sb.device
                && sa.positive_labels == sb.positive_labels
                && sa.threads == sb.threads
                && sa.batch == sb.batch
        })
}

impl AppState {
    /// Load `path`, validate it and swap the engine. The specialists are
    /// reused when the `[local]` tables did not change; otherwise the new ones
    /// load before the swap, so requests never wait on a half-built engine.
    /// On error the current engine stays.
    pub async fn reload(&self, path: &Path) -> Result<Reloaded, ReloadError> {
        let config = Config::load(path).map_err(ReloadError::Config)?;
        for w in &config.warnings {
            tracing::warn!("{w}");
        }
        let old = self.engine.current();
        let reuse = Some(&old)
            .filter(|o| same_locals(&o.config.local, &config.local))
            .map(|o| o.specialists.clone());
        let reused_specialists = reuse.is_some();
        let mut engine = match reuse {
            Some(specialists) => Engine::with_specialists(config, specialists).await,
            None => Engine::new(config).await,
        }
        .map_err(ReloadError::Engine)?;
        // One count of shadow calls across reloads, so shutdown waits for
        // those the old config started too.
        engine.background = old.background.clone();
        if let Some(new) = &engine.config.server.socket
            && old.config.server.socket.as_ref() != Some(new)
        {
            tracing::warn!("server.socket changed: it takes effect at the next start");
        }
        let replaced = self.engine.replace(Arc::new(engine));
        // Rows the old engine's ledger still holds are written now, not lost
        // with it when its last request finishes; requests still running on
        // it write more, so it stays on the list flushed at shutdown until
        // its engine is gone.
        if let Some(ledger) = &replaced.ledger {
            self.retire(Arc::downgrade(&replaced), ledger.clone());
        }
        drop(replaced);
        self.flush_retired().await;
        tracing::info!(
            config = %path.display(),
            reused_specialists,
            "config reloaded"
        );
        Ok(Reloaded { reused_specialists })
    }

    /// Flush every replaced engine's ledger; forget those whose engine was
    /// already gone before the flush (nothing can write to them any more).
    pub(crate) async fn flush_retired(&self) {
        let retired = self
            .retired
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let mut done = Vec::new();
        for (engine, ledger) in retired {
            let gone = engine.strong_count() == 0;
            match ledger.flush().await {
                Ok(()) if gone => done.push(engine),
                Ok(()) => {}
                Err(e) => {
                    tracing::error!(error = %triage_engine::error::chain(&e), "flushing a replaced config's ledger failed");
                }
            }
        }
        self.retired
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|(engine, _)| !done.iter().any(|d| d.ptr_eq(engine)));
    }

    fn retire(&self, engine: std::sync::Weak<Engine>, ledger: triage_engine::Ledger) {
        self.retired
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((engine, ledger));
    }

    /// The config file the current engine came from.
    pub fn config_path(&self) -> Option<PathBuf> {
        self.engine.current().config.path.clone()
    }
}

/// Reload the config on every SIGHUP, forever (the caller aborts the task at
/// shutdown). Errors are logged with their causes; the old engine stays.
/// Keep a config change in the audit trail and log it at info (an error
/// if the trail cannot be written: the change itself has taken).
pub(crate) fn audit(
    path: &Path,
    change: triage_engine::config::edit::Change<'_>,
    before: &str,
    after: &str,
) {
    match triage_engine::config::edit::record_change(path, change, before, after) {
        Ok(e) => tracing::info!(action = e.action, who = e.who, from = e.from, number = ?e.number,
            changed_lines = e.diff.len(), diff = %e.diff.join("\n"), "config changed"),
        Err(e) => {
            tracing::error!(error = %triage_engine::error::chain(&e), "cannot write the config audit trail")
        }
    }
}

pub async fn reload_on_hangup(state: Arc<AppState>, path: PathBuf) {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP: config reload disabled");
        return;
    };
    while hup.recv().await.is_some() {
        tracing::info!(config = %path.display(), "SIGHUP: reloading the config");
        // The newest kept version is what the trail knew before.
        let before = triage_engine::config::edit::history(&path)
            .last()
            .and_then(|v| triage_engine::config::edit::version_text(&path, v.number).ok())
            .unwrap_or_default();
        match state.reload(&path).await {
            Ok(_) => {
                let after = std::fs::read_to_string(&path).unwrap_or_default();
                let change = triage_engine::config::edit::Change {
                    action: "reload (SIGHUP)",
                    who: "signal",
                    from: "local",
                    number: None,
                };
                audit(&path, change, &before, &after);
            }
            Err(e) => {
                tracing::error!(error = %triage_engine::error::chain(&e), "config reload failed");
            }
        }
    }
}
