//! Transparent resume. A call that reaches a sandbox (a create/reuse of the old contract, an
//! exec, a file call, a renew) restarts its idle clock; when the sandbox is paused or
//! hibernated (declared, or put to sleep by the idle policy) the call declares it running,
//! wakes the controller and waits until it runs. Concurrent calls wait for the same resume:
//! the controller runs one action per chat. Nothing here calls the engine.

use std::time::Duration;

use chrono::Utc;

use crate::context::Context;
use crate::domain::hibernation::SandboxState;
use crate::domain::{ChatId, Phase};
use crate::store::wait::{self, StartOutcome};
use crate::store::{Declared, SandboxRow, StoreError};

/// Why a sleeping sandbox could not be brought back for the call.
#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The resume (and its fallback cold start) failed; retries go on in the background.
    #[error("sandbox_resume_failed: {0}")]
    Failed(String),
    #[error("sandbox_resume_timeout: not running after {0}s; it keeps resuming in the background")]
    Timeout(u64),
}

/// Whether the row's sandbox sleeps, or is about to: a call must wait for it to run.
pub fn asleep(ctx: &Context, row: &SandboxRow, now: chrono::DateTime<Utc>) -> bool {
    let policy = ctx.settings.sandbox.hibernation();
    row.desired_state != SandboxState::Running
        || row.effective_state(&policy, now).0 != SandboxState::Running
        || matches!(
            row.phase,
            Phase::Pausing | Phase::Paused | Phase::Hibernating | Phase::Hibernated
        )
}

/// The chat's row after the call reached it: awake and running if it was asleep. `None`
/// when there is no row; a row that is not live (expired, deleted) comes back as it is, for
/// the caller to answer as before.
pub async fn awake(
    ctx: &Context,
    chat_id: ChatId,
    call: &str,
) -> Result<Option<SandboxRow>, ResumeError> {
    let now = Utc::now();
    let Some(row) = ctx.store.get(chat_id).await? else {
        return Ok(None);
    };
    if !row.is_live(now) {
        return Ok(Some(row));
    }
    if !asleep(ctx, &row, now) {
        if !ctx.settings.sandbox.hibernation().idle.acts() && row.phase == Phase::Running {
            // Nothing pauses on the clock: the committed row says awake, and the clock (only
            // shown) is written in the background.
            ctx.store.touch_later(chat_id, now);
            return Ok(Some(row));
        }
        if ctx.store.touch(chat_id, now).await? != crate::store::Touch::NotAwake {
            return Ok(Some(row));
        }
    }
    let sandbox = &ctx.settings.sandbox;
    let declared = ctx
        .store
        .declare_state(
            chat_id,
            row.session_id,
            SandboxState::Running,
            Declared::Call(call),
            sandbox.ttl(),
            sandbox.hibernated_retention(),
            now,
        )
        .await?;
    let Some(declared) = declared else {
        // The session changed meanwhile: the caller sees the new one.
        return Ok(ctx.store.get(chat_id).await?);
    };
    ctx.wake.notify_one();
    let limit = ctx.settings.controller.create_wait_seconds;
    match wait::for_start(
        &ctx.store,
        chat_id,
        declared.session_id,
        declared.attempts,
        Duration::from_secs(limit),
    )
    .await?
    {
        StartOutcome::Running(row) => Ok(Some(row)),
        StartOutcome::Failed(row) => Err(ResumeError::Failed(
            row.last_error.unwrap_or_else(|| "unknown error".into()),
        )),
        StartOutcome::Gone(_) => Ok(ctx.store.get(chat_id).await?),
        StartOutcome::Timeout(_) => Err(ResumeError::Timeout(limit)),
    }
}
