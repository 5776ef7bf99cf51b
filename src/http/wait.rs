//! Bounded waits on the store's change feed: re-read the row after every commit until the
//! condition holds or the deadline passes. No polling interval, no missed wake-ups.

use std::time::Duration;

use tokio::time::Instant;

use crate::domain::{ChatId, Phase, SessionId};
use crate::store::{SandboxRow, Store, StoreError};

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
    /// The session ended while we waited, for the given reason.
    Gone(Gone),
    Timeout(Option<SandboxRow>),
}

/// Waits until session `session_id` of `chat_id` runs, or an attempt beyond `baseline` fails.
pub async fn for_start(
    store: &Store,
    chat_id: ChatId,
    session_id: SessionId,
    baseline: u32,
    timeout: Duration,
) -> Result<StartOutcome, StoreError> {
    let deadline = Instant::now() + timeout;
    let mut changes = store.subscribe();
    loop {
        changes.borrow_and_update();
        let row = store.get(chat_id).await?;
        match &row {
            None => return Ok(StartOutcome::Gone(Gone::Deleted)),
            Some(r) if r.session_id != session_id => return Ok(StartOutcome::Gone(Gone::Replaced)),
            Some(r) if r.deleted_at.is_some() => return Ok(StartOutcome::Gone(Gone::Deleted)),
            Some(r) if r.phase == Phase::Running => return Ok(StartOutcome::Running(r.clone())),
            Some(r) if r.phase == Phase::Failed && r.attempts > baseline => {
                return Ok(StartOutcome::Failed(r.clone()))
            }
            Some(r) if r.phase == Phase::Expired => return Ok(StartOutcome::Gone(Gone::Expired)),
            Some(_) => {}
        }
        if tokio::time::timeout_at(deadline, changes.changed())
            .await
            .is_err()
        {
            return Ok(StartOutcome::Timeout(row));
        }
    }
}

/// Waits until the row of `session_id` is gone (purged, or replaced by a newer session).
pub async fn for_gone(
    store: &Store,
    chat_id: ChatId,
    session_id: SessionId,
    timeout: Duration,
) -> Result<bool, StoreError> {
    let deadline = Instant::now() + timeout;
    let mut changes = store.subscribe();
    loop {
        changes.borrow_and_update();
        match store.get(chat_id).await? {
            None => return Ok(true),
            Some(r) if r.session_id != session_id => return Ok(true),
            Some(_) => {}
        }
        if tokio::time::timeout_at(deadline, changes.changed())
            .await
            .is_err()
        {
            return Ok(false);
        }
    }
}

/// Waits until the row is settled: not pending and not being deleted.
pub async fn for_settled(
    store: &Store,
    chat_id: ChatId,
    timeout: Duration,
) -> Result<Option<SandboxRow>, StoreError> {
    let deadline = Instant::now() + timeout;
    let mut changes = store.subscribe();
    loop {
        changes.borrow_and_update();
        let row = store.get(chat_id).await?;
        match &row {
            None => return Ok(None),
            Some(r) if !matches!(r.phase, Phase::Pending | Phase::Deleting) => return Ok(row),
            Some(_) => {}
        }
        if tokio::time::timeout_at(deadline, changes.changed())
            .await
            .is_err()
        {
            return Ok(row);
        }
    }
}
