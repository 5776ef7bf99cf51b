//! Typed rows. Text columns (UUIDs, ISO-8601 times, phases) are parsed once, here.

use chrono::{DateTime, Utc};
use sqlx::sqlite::SqliteRow;
use sqlx::{FromRow, Row};

use crate::domain::hibernation::{effective_state, OnExpiry, Policy, SandboxState};
use crate::domain::{parse_time, ChatId, Phase, SessionId};

macro_rules! select {
    ($tail:literal) => {
        concat!(
            "SELECT chat_id, session_id, generation, agent_id, volume_host_path, spec_json, \
             spec_hash, created_at, updated_at, expires_at, deleted_at, phase, container_id, \
             endpoint_ip, endpoint_port, observed_generation, attempts, last_error, \
             next_attempt_at, running_since, legacy_container_id, restarts, host_port, \
             desired_state, last_active_at, network FROM sandboxes ",
            $tail
        )
    };
}

pub(super) const SELECT_ONE: &str = select!("WHERE chat_id = ?1");
pub(super) const SELECT_ALL: &str = select!("ORDER BY chat_id");
/// The start of a filtered list; the store appends only the filters in use.
pub(super) const SELECT_FROM: &str = select!("");

/// One chat: desired spec plus observed status.
#[derive(Debug, Clone, PartialEq)]
pub struct SandboxRow {
    pub chat_id: ChatId,
    pub session_id: SessionId,
    pub generation: i64,
    pub agent_id: String,
    pub volume_host_path: String,
    pub spec_json: String,
    pub spec_hash: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub deleted_at: Option<DateTime<Utc>>,
    pub phase: Phase,
    pub container_id: Option<String>,
    pub endpoint_ip: Option<String>,
    pub endpoint_port: Option<u16>,
    pub observed_generation: i64,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub running_since: Option<DateTime<Utc>>,
    /// The old service's container this chat's session was adopted from (migration 0003).
    /// Kept when a later session replaces it, so passes go on watching that container (and
    /// remove it as stale) until it is gone.
    pub legacy_container_id: Option<String>,
    /// Quick exits in a row of this session's container (migration 0004): paces restarts.
    pub restarts: u32,
    /// The agent port's published host port, when `sandbox.publish_agent_port` is on.
    pub host_port: Option<u16>,
    /// The declared state (migration 0008): running, paused or hibernated.
    pub desired_state: SandboxState,
    /// The idle clock: the last create/reuse, exec, file call, renew or resume.
    pub last_active_at: DateTime<Utc>,
    /// The network its container is on (migration 0010): the profile's, or a further one of
    /// the same settings once that one was full.
    pub network: Option<String>,
}

impl SandboxRow {
    /// Desired and not past its TTL: the session a create call may reuse.
    pub fn is_live(&self, now: DateTime<Utc>) -> bool {
        self.deleted_at.is_none() && self.phase != Phase::Expired && self.expires_at > now
    }

    /// Whether this session's container ever ran (`record_running` sets
    /// `observed_generation` to the session's generation; failures leave it).
    pub fn has_run(&self) -> bool {
        self.observed_generation == self.generation
    }

    /// The state the sandbox should be in now: declared, or further along when idle.
    pub fn effective_state(
        &self,
        policy: &Policy,
        now: DateTime<Utc>,
    ) -> (SandboxState, Option<DateTime<Utc>>) {
        effective_state(self.desired_state, self.last_active_at, now, policy.idle)
    }

    /// The planner's view of this row under the hibernation policy at `now`.
    pub fn desired(&self, policy: &Policy, now: DateTime<Utc>) -> crate::planner::Desired {
        let (state, state_changes_at) = self.effective_state(policy, now);
        crate::planner::Desired {
            state,
            state_changes_at,
            hibernate_at_expiry: policy.on_expiry == OnExpiry::Hibernate
                && self.desired_state != SandboxState::Hibernated,
            chat_id: self.chat_id,
            session_id: self.session_id,
            spec_hash: self.spec_hash.clone(),
            expires_at: self.expires_at,
            deleted: self.deleted_at.is_some(),
            phase: self.phase,
            container_id: self.container_id.clone(),
            endpoint_ip: self.endpoint_ip.clone(),
            next_attempt_at: self.next_attempt_at,
        }
    }
}

fn decode<T, E: std::fmt::Display>(column: &str, r: Result<T, E>) -> Result<T, sqlx::Error> {
    r.map_err(|e| sqlx::Error::ColumnDecode {
        index: column.to_string(),
        source: e.to_string().into(),
    })
}

fn time(row: &SqliteRow, column: &str) -> Result<DateTime<Utc>, sqlx::Error> {
    let s: String = row.try_get(column)?;
    decode(column, parse_time(&s))
}

fn opt_time(row: &SqliteRow, column: &str) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    let s: Option<String> = row.try_get(column)?;
    s.map(|s| decode(column, parse_time(&s))).transpose()
}

impl<'r> FromRow<'r, SqliteRow> for SandboxRow {
    fn from_row(row: &'r SqliteRow) -> Result<Self, sqlx::Error> {
        let chat: String = row.try_get("chat_id")?;
        let session: String = row.try_get("session_id")?;
        let phase: String = row.try_get("phase")?;
        let port: Option<i64> = row.try_get("endpoint_port")?;
        let attempts: i64 = row.try_get("attempts")?;
        Ok(Self {
            chat_id: decode("chat_id", chat.parse())?,
            session_id: decode("session_id", session.parse())?,
            generation: row.try_get("generation")?,
            agent_id: row.try_get("agent_id")?,
            volume_host_path: row.try_get("volume_host_path")?,
            spec_json: row.try_get("spec_json")?,
            spec_hash: row.try_get("spec_hash")?,
            created_at: time(row, "created_at")?,
            updated_at: time(row, "updated_at")?,
            expires_at: time(row, "expires_at")?,
            deleted_at: opt_time(row, "deleted_at")?,
            phase: decode("phase", phase.parse())?,
            container_id: row.try_get("container_id")?,
            endpoint_ip: row.try_get("endpoint_ip")?,
            endpoint_port: port
                .map(|p| decode("endpoint_port", u16::try_from(p)))
                .transpose()?,
            observed_generation: row.try_get("observed_generation")?,
            attempts: decode("attempts", u32::try_from(attempts))?,
            last_error: row.try_get("last_error")?,
            next_attempt_at: opt_time(row, "next_attempt_at")?,
            running_since: opt_time(row, "running_since")?,
            legacy_container_id: row.try_get("legacy_container_id")?,
            restarts: decode(
                "restarts",
                u32::try_from(row.try_get::<i64, _>("restarts")?),
            )?,
            host_port: row
                .try_get::<Option<i64>, _>("host_port")?
                .map(|p| decode("host_port", u16::try_from(p)))
                .transpose()?,
            desired_state: decode(
                "desired_state",
                row.try_get::<String, _>("desired_state")?.parse(),
            )?,
            last_active_at: match opt_time(row, "last_active_at")? {
                Some(t) => t,
                None => time(row, "updated_at")?,
            },
            network: row.try_get("network")?,
        })
    }
}

/// One line of the append-only history.
#[derive(Debug, Clone, PartialEq, FromRow, serde::Serialize, utoipa::ToSchema)]
pub struct StoredEvent {
    pub id: i64,
    pub at: String,
    pub chat_id: String,
    pub session_id: Option<String>,
    pub container_id: Option<String>,
    pub action: String,
    pub outcome: String,
    pub error: Option<String>,
    /// The chat's phase right after the event; `None` when its row is gone (or for events
    /// about no chat).
    pub phase: Option<String>,
    /// Who asked, for data-plane calls (`token@address` or `anonymous@address`).
    pub actor: Option<String>,
    /// JSON: what a data-plane call carried (command, exit code, path, bytes), or a build log.
    pub detail: Option<String>,
}
