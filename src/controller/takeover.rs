//! Taking over from the old Python service. At every connect to the engine, the containers it
//! started (its six labels, no sandboxd labels) are looked at once: a running one becomes the
//! session of its chat, keeping its session id, container, endpoint and expiry, and is never
//! restarted; a stopped one (left by the old cleanup, which only stopped them) is removed.
//! Idempotent: a container already adopted is recognised by its session id.

use std::path::Path;

use chrono::Utc;
use tracing::{info, warn};

use crate::backend::{Backend, BackendError, LegacyContainer};
use crate::config::Settings;
use crate::store::{
    EventAction, EventOutcome, ImportOutcome, LegacyImport, NewEvent, RunningContainer, Store,
    StoreError,
};

#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    #[error(transparent)]
    Runtime(#[from] BackendError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What one takeover did, for the log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Takeover {
    pub adopted: usize,
    pub removed: usize,
    /// Containers whose adoption or removal failed; a later run tries them again.
    pub failed: usize,
}

/// One look at the old service's containers. A failure with one container is logged and
/// counted, and the others are still handled.
pub async fn run(
    rt: &dyn Backend,
    store: &Store,
    settings: &Settings,
) -> Result<Takeover, TakeoverError> {
    let mut done = Takeover::default();
    let Some(legacy) = rt.legacy() else {
        return Ok(done);
    };
    for c in legacy.list_legacy().await? {
        match take_over(rt, store, settings, &c).await {
            Ok(Some(Taken::Adopted)) => done.adopted += 1,
            Ok(Some(Taken::Removed)) => done.removed += 1,
            Ok(None) => {}
            Err(e) => {
                warn!(container_id = %c.container_id, error = %e, "taking over an old container failed");
                done.failed += 1;
            }
        }
    }
    Ok(done)
}

enum Taken {
    Adopted,
    Removed,
}

async fn take_over(
    rt: &dyn Backend,
    store: &Store,
    settings: &Settings,
    c: &LegacyContainer,
) -> Result<Option<Taken>, TakeoverError> {
    let now = Utc::now();
    let (chat, session) = (
        c.session.chat_id.to_string(),
        c.session.session_id.to_string(),
    );
    let why = match (&c.running, &c.ip) {
        (false, _) => "stopped by the old service",
        (true, None) => {
            warn!(container_id = %c.container_id, chat_id = %chat, "old service's container has no address on its network; left alone");
            return Ok(None);
        }
        (true, Some(ip)) => match store.import_legacy(&import(c, ip, settings), now).await? {
            ImportOutcome::Adopted => {
                info!(container_id = %c.container_id, chat_id = %chat, session_id = %session, "adopted the old service's sandbox");
                return Ok(Some(Taken::Adopted));
            }
            ImportOutcome::AlreadyKnown => return Ok(None),
            ImportOutcome::Superseded => "the chat has another session",
        },
    };
    rt.remove(&c.container_id).await?;
    let event = NewEvent {
        chat_id: &chat,
        session_id: Some(&session),
        container_id: Some(&c.container_id),
        action: EventAction::RemoveLegacy,
        outcome: EventOutcome::Ok,
        error: Some(why),
        actor: None,
        detail: None,
    };
    store.event(&event, now).await?;
    info!(container_id = %c.container_id, chat_id = %chat, why, "removed the old service's container");
    Ok(Some(Taken::Removed))
}

/// The session row for a running old container. Its spec is what sandboxd would start if
/// the container stopped: the current config, with the container's own network and port.
fn import<'a>(c: &'a LegacyContainer, ip: &'a str, settings: &Settings) -> LegacyImport<'a> {
    let s = &c.session;
    let mut spec = crate::config::spec::resolve(
        &settings.sandbox,
        s.chat_id,
        &s.agent_id,
        Path::new(&s.volume_host_path),
        None,
    );
    if let Some(network) = &c.network {
        spec.network = network.clone();
    }
    spec.agent_port = s.endpoint_port;
    LegacyImport {
        chat_id: s.chat_id,
        session_id: s.session_id,
        agent_id: &s.agent_id,
        volume_host_path: &s.volume_host_path,
        spec_json: spec.to_json(),
        spec_hash: spec.hash(),
        container: RunningContainer {
            container_id: &c.container_id,
            ip,
            port: s.endpoint_port,
            host_port: None,
            start: None,
            network: c.network.as_deref(),
        },
        created_at: c.created_at.unwrap_or_else(Utc::now),
        expires_at: s.expires_at,
    }
}
