//! Bounded waits on the store's change feed: re-read the row after every commit that may
//! concern the chat, until the condition holds or the deadline passes. No polling interval, no
//! missed wake-ups (the feed is subscribed before the first read), and the reads themselves are
//! bounded by the same deadline.

use std::time::Duration;

use tokio::time::Instant;

use super::{SandboxRow, Store, StoreError};
use crate::domain::{ChatId, Phase, SessionId};

/// Why a session stopped being the one to wait for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gone {
    /// A delete for the chat was accepted.
    Deleted,
    /// Another request made a new session for the chat.
    Replaced,
    /// Its TTL ran out before it ran.
    Expired,
}

pub enum StartOutcome {
    Running(SandboxRow),
    /// An attempt after `baseline` failed; retries go on in the background.
    Failed(SandboxRow),
    /// The session ended while we waited.
    Gone(Gone),
    Timeout(Option<SandboxRow>),
}

/// One step of a wait: `Ok(Some(value))` ends it, `Ok(None)` waits for the next change.
type Step<T> = Result<Option<T>, StoreError>;

/// Re-evaluates `check` on the row after every relevant commit until it yields a value;
/// on the deadline returns `on_timeout(last row seen)`.
async fn wait_for<T>(
    store: &Store,
    chat_id: ChatId,
    timeout: Duration,
    mut check: impl FnMut(&Option<SandboxRow>) -> Option<T>,
    on_timeout: impl FnOnce(Option<SandboxRow>) -> T,
) -> Step<T> {
    let deadline = Instant::now() + timeout;
    let mut changes = store.watch(chat_id);
    let mut last = None;
    loop {
        let row = match tokio::time::timeout_at(deadline, store.get(chat_id)).await {
            Ok(row) => row?,
            Err(_) => return Ok(Some(on_timeout(last))),
        };
        if let Some(done) = check(&row) {
            return Ok(Some(done));
        }
        last = row;
        if !changes.changed(deadline).await {
            return Ok(Some(on_timeout(last)));
        }
    }
}

/// Waits until session `session_id` of `chat_id` runs, or an attempt beyond `baseline` fails.
pub async fn for_start(
    store: &Store,
    chat_id: ChatId,
    session_id: SessionId,
    baseline: u32,
    timeout: Duration,
) -> Result<StartOutcome, StoreError> {
    let outcome = wait_for(
        store,
        chat_id,
        timeout,
        |row| match row {
            None => Some(StartOutcome::Gone(Gone::Deleted)),
            Some(r) if r.session_id != session_id => Some(StartOutcome::Gone(Gone::Replaced)),
            Some(r) if r.deleted_at.is_some() => Some(StartOutcome::Gone(Gone::Deleted)),
            Some(r) if r.phase == Phase::Running => Some(StartOutcome::Running(r.clone())),
            Some(r) if r.phase == Phase::Failed && r.attempts > baseline => {
                Some(StartOutcome::Failed(r.clone()))
            }
            Some(r) if r.phase == Phase::Expired => Some(StartOutcome::Gone(Gone::Expired)),
            Some(_) => None,
        },
        StartOutcome::Timeout,
    )
    .await?;
    Ok(outcome.unwrap_or(StartOutcome::Timeout(None)))
}

/// Waits until the row of `session_id` is gone (purged, or replaced by a newer session).
pub async fn for_gone(
    store: &Store,
    chat_id: ChatId,
    session_id: SessionId,
    timeout: Duration,
) -> Result<bool, StoreError> {
    let gone = wait_for(
        store,
        chat_id,
        timeout,
        |row| match row {
            None => Some(true),
            Some(r) if r.session_id != session_id => Some(true),
            Some(_) => None,
        },
        |_| false,
    )
    .await?;
    Ok(gone.unwrap_or(false))
}

/// Waits until the row is settled: not pending and not being deleted.
pub async fn for_settled(
    store: &Store,
    chat_id: ChatId,
    timeout: Duration,
) -> Result<Option<SandboxRow>, StoreError> {
    let row = wait_for(
        store,
        chat_id,
        timeout,
        |row| match row {
            None => Some(None),
            Some(r) if !matches!(r.phase, Phase::Pending | Phase::Deleting) => Some(row.clone()),
            Some(_) => None,
        },
        |last| last,
    )
    .await?;
    Ok(row.flatten())
}

/// Waits until session `session_id` of `chat_id` has settled in `phase` (`paused` and
/// `hibernated` are written once the engine call is done). `None` when the session went or
/// the deadline passed first.
pub async fn for_phase(
    store: &Store,
    chat_id: ChatId,
    session_id: SessionId,
    phase: Phase,
    timeout: Duration,
) -> Result<Option<SandboxRow>, StoreError> {
    let row = wait_for(
        store,
        chat_id,
        timeout,
        |row| match row {
            None => Some(None),
            Some(r) if r.session_id != session_id || r.deleted_at.is_some() => Some(None),
            Some(r) if r.phase == phase => Some(Some(r.clone())),
            Some(_) => None,
        },
        |_| None,
    )
    .await?;
    Ok(row.flatten())
}
