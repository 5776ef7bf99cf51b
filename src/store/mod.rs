//! SQLite adapter: desired state, observed status and the event log.
//!
//! Every read-modify-write runs in a `BEGIN IMMEDIATE` transaction, so concurrent requests for
//! one chat serialise on the write lock instead of racing. Controller status writes are
//! conditional on the session they are about, so a stale action can never overwrite a newer
//! session. Every commit bumps a watch channel that waiting requests listen on. The server
//! answers its reads from an in-memory mirror of the table (`mirror.rs`).

mod mirror;
mod row;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Sqlite, Transaction};
use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::domain::{format_time, ChatId, Phase, SessionId};

pub use row::{SandboxRow, StoredEvent};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlx(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("cannot create database directory {path}: {source}")]
    Dir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no database at {path} (run `sandboxd migrate` or start the server first)")]
    Missing { path: String },
    #[error("corrupt row for chat {chat_id}: {message}")]
    Corrupt { chat_id: String, message: String },
    #[error("store write task failed: {0}")]
    Task(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// What a new session of a chat is made of; the spec is resolved by the caller.
#[derive(Debug, Clone)]
pub struct NewSession {
    pub chat_id: ChatId,
    pub agent_id: String,
    pub volume_host_path: String,
    pub spec_json: String,
    pub spec_hash: String,
    pub ttl: chrono::Duration,
}

/// How many change notifications may queue up for a slow waiter before it must re-read.
const CHANGE_FEED_CAPACITY: usize = 1024;

/// Notifications of committed writes that may concern one chat.
pub struct ChatChanges {
    rx: broadcast::Receiver<Option<ChatId>>,
    chat_id: ChatId,
}

impl ChatChanges {
    /// Waits until a write that may concern the chat commits. False when `deadline` passes.
    pub async fn changed(&mut self, deadline: Instant) -> bool {
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Err(_) => return false,
                Ok(Ok(Some(c))) if c != self.chat_id => continue,
                // This chat, any chat, or missed notifications: the caller re-reads.
                Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => return true,
                Ok(Err(broadcast::error::RecvError::Closed)) => {
                    tokio::time::sleep_until(deadline).await;
                    return false;
                }
            }
        }
    }
}

/// The outcome of `POST /api/v1/create` semantics on the store.
#[derive(Debug)]
pub enum CreateOutcome {
    /// A live session with the same agent and volume exists.
    Reused(SandboxRow),
    /// The chat's first session was written.
    Created(SandboxRow),
    /// A new session replaced one that had expired, was still being deleted, or never ran.
    Replaced(SandboxRow),
    /// A live session that has run has a different agent or volume; nothing was written.
    Conflict(SandboxRow),
}

/// The outcome of declarative apply (`PUT`).
#[derive(Debug)]
pub enum ApplyOutcome {
    Unchanged(SandboxRow),
    /// A new session replaced a live one whose spec differed.
    Replaced(SandboxRow),
    Created(SandboxRow),
}

/// A container observed running for a session, with its endpoint.
#[derive(Debug, Clone, Copy)]
pub struct RunningContainer<'a> {
    pub container_id: &'a str,
    pub ip: &'a str,
    pub port: u16,
}

/// A running container of the old Python service, to be taken over as a session.
#[derive(Debug, Clone)]
pub struct LegacyImport<'a> {
    pub chat_id: ChatId,
    pub session_id: SessionId,
    pub agent_id: &'a str,
    pub volume_host_path: &'a str,
    /// What sandboxd would start if the container stopped: resolved from the current config
    /// with the container's own network and port.
    pub spec_json: String,
    pub spec_hash: String,
    pub container: RunningContainer<'a>,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// What `import_legacy` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportOutcome {
    /// Written as the chat's session.
    Adopted,
    /// This session is already the chat's (an earlier start imported it).
    AlreadyKnown,
    /// The chat has another live session, or this session was adopted before and has since
    /// been replaced, expired or deleted: the old container is surplus.
    Superseded,
}

/// Filters for listing.
#[derive(Debug, Default, Clone)]
pub struct ListFilter {
    pub phase: Option<Phase>,
    pub agent_id: Option<String>,
    /// Return rows with `chat_id` strictly greater (keyset pagination).
    pub after: Option<ChatId>,
    pub limit: u32,
}

#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
    changes: broadcast::Sender<Option<ChatId>>,
    /// Held by every write from `BEGIN` until its change is applied to the mirror, so changes
    /// reach the mirror in commit order. (SQLite serialises writers anyway.)
    gate: Arc<tokio::sync::Mutex<()>>,
    /// Set by `serve_reads_from_memory`; without it reads go to SQLite (the CLI, tests).
    mirror: Option<Arc<mirror::Mirror>>,
}

type WriteGate = tokio::sync::OwnedMutexGuard<()>;

/// What a write changed in `sandboxes`, for the mirror.
enum Touched {
    /// One chat's row: re-read inside the transaction.
    Chat(ChatId),
    /// One chat's row as the transaction already read it back after writing.
    Row(Box<SandboxRow>),
    /// Rows the transaction deleted.
    Deleted(Vec<ChatId>),
}

impl Store {
    /// Opens (creating if needed) the database file with WAL and a busy timeout.
    pub async fn open(path: &Path, busy_timeout: Duration, max_connections: u32) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
                path: dir.display().to_string(),
                source,
            })?;
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(busy_timeout)
            .foreign_keys(true);
        // No ping before each acquire: a local file connection does not go stale, and the ping
        // is one more round trip to the connection's worker thread on every query.
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections)
            .test_before_acquire(false)
            .connect_with(options)
            .await?;
        Ok(Self::with_pool(pool))
    }

    /// Opens an existing database read-only (for the CLI): works while the server runs (WAL)
    /// and never creates or changes anything.
    pub async fn open_read_only(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(StoreError::Missing {
                path: path.display().to_string(),
            });
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .read_only(true)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await?;
        Ok(Self::with_pool(pool))
    }

    fn with_pool(pool: SqlitePool) -> Self {
        Self {
            pool,
            changes: broadcast::channel(CHANGE_FEED_CAPACITY).0,
            gate: Arc::default(),
            mirror: None,
        }
    }

    /// From now on rows are read from memory: loads the table once (after `migrate`). Only
    /// for the process that does all the writing, the server.
    pub async fn serve_reads_from_memory(mut self) -> Result<Self> {
        self.mirror = Some(Arc::default());
        self.reload_mirror().await?;
        Ok(self)
    }

    /// Re-reads the whole table into the mirror (the controller calls it once per resync
    /// period, so a row changed behind sandboxd's back shows within one period).
    pub async fn reload_mirror(&self) -> Result<()> {
        let Some(mirror) = &self.mirror else {
            return Ok(());
        };
        let _gate = self.gate.clone().lock_owned().await;
        let rows = sqlx::query_as(row::SELECT_ALL)
            .fetch_all(&self.pool)
            .await?;
        mirror.replace_all(rows);
        // Waiters re-read, in case a row changed behind sandboxd's back.
        self.changed(None);
        Ok(())
    }

    /// Rows held in memory (`None` when reads go to SQLite).
    pub fn mirrored_rows(&self) -> Option<usize> {
        self.mirror.as_ref().map(|m| m.len())
    }

    pub async fn migrate(&self) -> Result<()> {
        sqlx::migrate!("./migrations").run(&self.pool).await?;
        Ok(())
    }

    /// Change notifications for one chat (subscribe before reading, then re-read on each).
    pub fn watch(&self, chat_id: ChatId) -> ChatChanges {
        ChatChanges {
            rx: self.changes.subscribe(),
            chat_id,
        }
    }

    /// Announces a committed write; `None` means "possibly any chat".
    fn changed(&self, chat_id: Option<ChatId>) {
        // No receiver is not an error: nobody is waiting.
        let _ = self.changes.send(chat_id);
    }

    async fn begin_write(&self) -> Result<(Transaction<'static, Sqlite>, WriteGate)> {
        let gate = self.gate.clone().lock_owned().await;
        Ok((self.pool.begin_with("BEGIN IMMEDIATE").await?, gate))
    }

    /// Commits a write about one chat (see `finish_write`).
    async fn commit(
        &self,
        tx: Transaction<'static, Sqlite>,
        gate: WriteGate,
        chat_id: ChatId,
    ) -> Result<()> {
        self.finish_write(tx, gate, Touched::Chat(chat_id)).await
    }

    /// Commits a write whose new row the caller has just read inside the transaction.
    async fn commit_row(
        &self,
        tx: Transaction<'static, Sqlite>,
        gate: WriteGate,
        row: &SandboxRow,
    ) -> Result<()> {
        self.finish_write(tx, gate, Touched::Row(Box::new(row.clone())))
            .await
    }

    /// Commits a write, applies what it touched to the mirror and announces the change. Runs
    /// to the end on its own task: a caller that goes away (a client hanging up) cannot leave
    /// a commit done and the mirror not updated.
    async fn finish_write(
        &self,
        mut tx: Transaction<'static, Sqlite>,
        gate: WriteGate,
        touched: Touched,
    ) -> Result<()> {
        let store = self.clone();
        tokio::spawn(async move {
            match touched {
                Touched::Chat(chat_id) => {
                    let row = match &store.mirror {
                        Some(_) => select_row(&mut tx, chat_id).await?,
                        None => None,
                    };
                    tx.commit().await?;
                    if let Some(mirror) = &store.mirror {
                        mirror.set(chat_id, row);
                    }
                    drop(gate);
                    store.changed(Some(chat_id));
                }
                Touched::Row(row) => {
                    let chat_id = row.chat_id;
                    tx.commit().await?;
                    if let Some(mirror) = &store.mirror {
                        mirror.set(chat_id, Some(*row));
                    }
                    drop(gate);
                    store.changed(Some(chat_id));
                }
                Touched::Deleted(chats) => {
                    tx.commit().await?;
                    if let Some(mirror) = &store.mirror {
                        for chat_id in &chats {
                            mirror.set(*chat_id, None);
                        }
                    }
                    drop(gate);
                    if !chats.is_empty() {
                        store.changed(None);
                    }
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// Cheap liveness probe of the database (a read).
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn get(&self, chat_id: ChatId) -> Result<Option<SandboxRow>> {
        if let Some(mirror) = &self.mirror {
            return Ok(mirror.get(chat_id));
        }
        Ok(sqlx::query_as(row::SELECT_ONE)
            .bind(chat_id.to_string())
            .fetch_optional(&self.pool)
            .await?)
    }

    /// Every row, for the controller's pass.
    pub async fn all(&self) -> Result<Vec<SandboxRow>> {
        if let Some(mirror) = &self.mirror {
            return Ok(mirror.all());
        }
        Ok(sqlx::query_as(row::SELECT_ALL)
            .fetch_all(&self.pool)
            .await?)
    }

    pub async fn list(&self, filter: &ListFilter) -> Result<Vec<SandboxRow>> {
        if let Some(mirror) = &self.mirror {
            return Ok(mirror.list(filter));
        }
        let mut sql = sqlx::QueryBuilder::<Sqlite>::new(row::SELECT_FROM);
        sql.push("WHERE chat_id > ")
            .push_bind(filter.after.map(|c| c.to_string()).unwrap_or_default());
        if let Some(phase) = filter.phase {
            sql.push(" AND phase = ").push_bind(phase.as_str());
        }
        if let Some(agent_id) = &filter.agent_id {
            sql.push(" AND agent_id = ").push_bind(agent_id.as_str());
        }
        // A literal (it is a u32): SQLite ≥ 3.47 plans with a bound LIMIT's value and so
        // re-prepares the statement on every bind; each literal is prepared once and cached.
        sql.push(format_args!(" ORDER BY chat_id LIMIT {}", filter.limit));
        Ok(sql.build_query_as().fetch_all(&self.pool).await?)
    }

    /// The newest events first, of one chat (by its index) or of all.
    pub async fn events(&self, chat_id: Option<ChatId>, limit: u32) -> Result<Vec<StoredEvent>> {
        let query = match chat_id {
            Some(chat) => sqlx::query_as(
                "SELECT id, at, chat_id, session_id, container_id, action, outcome, error \
                 FROM sandbox_events WHERE chat_id = ?1 ORDER BY id DESC LIMIT ?2",
            )
            .bind(chat.to_string()),
            None => sqlx::query_as(
                "SELECT id, at, chat_id, session_id, container_id, action, outcome, error \
                 FROM sandbox_events ORDER BY id DESC LIMIT ?1",
            ),
        };
        Ok(query.bind(i64::from(limit)).fetch_all(&self.pool).await?)
    }

    /// The old `create` contract: reuse a live matching session; refuse (`Conflict`) a live
    /// different one that has run, or whose first start is still under way (created less than
    /// `first_start` ago, no attempt failed yet); otherwise write a new session. So a session
    /// whose start failed (the create answered 503) or outlived its create's wait (504) does
    /// not block a different request: the old service stored nothing for a failed start. One
    /// transaction; nothing is written on conflict.
    pub async fn create_or_reuse(
        &self,
        new: &NewSession,
        now: DateTime<Utc>,
        first_start: chrono::Duration,
    ) -> Result<CreateOutcome> {
        let decide = |cur: SandboxRow| reuse_or_conflict(cur, new, now, first_start);
        // Fast path without the write lock: a live session is answered from a plain read
        // (a committed state, so the answer is as correct as one given inside a transaction).
        if let Some(cur) = self.get(new.chat_id).await?.filter(|c| c.is_live(now)) {
            if let Some(outcome) = decide(cur) {
                return Ok(outcome);
            }
        }
        let (mut tx, gate) = self.begin_write().await?;
        let current = select_row(&mut tx, new.chat_id).await?;
        if let Some(cur) = current.as_ref().filter(|c| c.is_live(now)) {
            if let Some(outcome) = decide(cur.clone()) {
                tx.rollback().await?;
                return Ok(outcome);
            }
        }
        let row = write_new_session(&mut tx, new, current.as_ref(), now).await?;
        self.commit_row(tx, gate, &row).await?;
        Ok(if current.is_some() {
            CreateOutcome::Replaced(row)
        } else {
            CreateOutcome::Created(row)
        })
    }

    /// Declarative apply: an identical live spec is left alone, anything else gets a new
    /// session (as Kubernetes apply replaces a pod whose template changed).
    pub async fn apply(&self, new: &NewSession, now: DateTime<Utc>) -> Result<ApplyOutcome> {
        let (mut tx, gate) = self.begin_write().await?;
        let current = select_row(&mut tx, new.chat_id).await?;
        if let Some(cur) = current.as_ref().filter(|c| c.is_live(now)) {
            if cur.agent_id == new.agent_id
                && cur.volume_host_path == new.volume_host_path
                && cur.spec_hash == new.spec_hash
            {
                let cur = cur.clone();
                tx.rollback().await?;
                return Ok(ApplyOutcome::Unchanged(cur));
            }
        }
        let replaced = current.as_ref().is_some_and(|c| c.is_live(now));
        let row = write_new_session(&mut tx, new, current.as_ref(), now).await?;
        self.commit_row(tx, gate, &row).await?;
        Ok(if replaced {
            ApplyOutcome::Replaced(row)
        } else {
            ApplyOutcome::Created(row)
        })
    }

    /// Takes over a running container of the old service as the chat's session, keeping its
    /// session id, container, endpoint and expiry. Idempotent.
    pub async fn import_legacy(
        &self,
        l: &LegacyImport<'_>,
        now: DateTime<Utc>,
    ) -> Result<ImportOutcome> {
        let (mut tx, gate) = self.begin_write().await?;
        let current = select_row(&mut tx, l.chat_id).await?;
        let adopted_before: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM legacy_adoptions WHERE session_id = ?1")
                .bind(l.session_id.to_string())
                .fetch_optional(&mut *tx)
                .await?;
        let is_current = current
            .as_ref()
            .is_some_and(|c| c.session_id == l.session_id);
        // A running old session wins over a live one that never ran: that one was written in
        // the moment between start-up and this takeover.
        let outcome = if is_current {
            Some(ImportOutcome::AlreadyKnown)
        } else if adopted_before.is_some()
            || current
                .as_ref()
                .is_some_and(|c| c.is_live(now) && c.has_run())
        {
            Some(ImportOutcome::Superseded)
        } else {
            None
        };
        if let Some(outcome) = outcome {
            tx.rollback().await?;
            return Ok(outcome);
        }
        let generation = current.as_ref().map_or(1, |p| p.generation + 1);
        let at = format_time(now);
        sqlx::query(
            "INSERT INTO sandboxes (chat_id, session_id, generation, agent_id, volume_host_path, \
               spec_json, spec_hash, created_at, updated_at, expires_at, deleted_at, phase, \
               container_id, endpoint_ip, endpoint_port, observed_generation, attempts, \
               last_error, next_attempt_at, running_since, legacy_container_id) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, NULL, 'running', ?11, ?12, ?13, ?3, \
               0, NULL, NULL, ?9, ?11) \
             ON CONFLICT (chat_id) DO UPDATE SET session_id = excluded.session_id, \
               generation = excluded.generation, agent_id = excluded.agent_id, \
               volume_host_path = excluded.volume_host_path, spec_json = excluded.spec_json, \
               spec_hash = excluded.spec_hash, created_at = excluded.created_at, \
               updated_at = excluded.updated_at, expires_at = excluded.expires_at, \
               deleted_at = NULL, phase = 'running', container_id = excluded.container_id, \
               endpoint_ip = excluded.endpoint_ip, endpoint_port = excluded.endpoint_port, \
               observed_generation = excluded.generation, attempts = 0, last_error = NULL, \
               next_attempt_at = NULL, running_since = excluded.running_since, \
               legacy_container_id = excluded.legacy_container_id",
        )
        .bind(l.chat_id.to_string())
        .bind(l.session_id.to_string())
        .bind(generation)
        .bind(l.agent_id)
        .bind(l.volume_host_path)
        .bind(&l.spec_json)
        .bind(&l.spec_hash)
        .bind(format_time(l.created_at))
        .bind(&at)
        .bind(format_time(l.expires_at))
        .bind(l.container.container_id)
        .bind(l.container.ip)
        .bind(i64::from(l.container.port))
        .execute(&mut *tx)
        .await?;
        let row: SandboxRow = sqlx::query_as(row::SELECT_ONE)
            .bind(l.chat_id.to_string())
            .fetch_one(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO legacy_adoptions (session_id, chat_id, container_id, adopted_at) \
             VALUES (?1, ?2, ?3, ?4)",
        )
        .bind(l.session_id.to_string())
        .bind(l.chat_id.to_string())
        .bind(l.container.container_id)
        .bind(&at)
        .execute(&mut *tx)
        .await?;
        row_event(&mut tx, &at, &row, "adopt_legacy").await?;
        self.commit_row(tx, gate, &row).await?;
        Ok(ImportOutcome::Adopted)
    }

    /// Marks a chat for deletion. Returns the row as it was (or `None` if there was none).
    pub async fn request_delete(
        &self,
        chat_id: ChatId,
        now: DateTime<Utc>,
    ) -> Result<Option<SandboxRow>> {
        let (mut tx, gate) = self.begin_write().await?;
        let current = select_row(&mut tx, chat_id).await?;
        let Some(cur) = current else {
            tx.rollback().await?;
            return Ok(None);
        };
        if cur.deleted_at.is_none() {
            let at = format_time(now);
            sqlx::query(
                "UPDATE sandboxes SET deleted_at = ?2, updated_at = ?2, phase = 'deleting' \
                 WHERE chat_id = ?1",
            )
            .bind(chat_id.to_string())
            .bind(&at)
            .execute(&mut *tx)
            .await?;
            row_event(&mut tx, &at, &cur, "delete_requested").await?;
        }
        self.commit(tx, gate, chat_id).await?;
        Ok(Some(cur))
    }

    /// Extends a live session's TTL. `None` when there is no live session.
    pub async fn renew(
        &self,
        chat_id: ChatId,
        ttl: chrono::Duration,
        now: DateTime<Utc>,
    ) -> Result<Option<SandboxRow>> {
        let (mut tx, gate) = self.begin_write().await?;
        let current = select_row(&mut tx, chat_id).await?;
        let Some(cur) = current.filter(|c| c.is_live(now)) else {
            tx.rollback().await?;
            return Ok(None);
        };
        let at = format_time(now);
        sqlx::query("UPDATE sandboxes SET expires_at = ?2, updated_at = ?3 WHERE chat_id = ?1")
            .bind(chat_id.to_string())
            .bind(format_time(now + ttl))
            .bind(&at)
            .execute(&mut *tx)
            .await?;
        row_event(&mut tx, &at, &cur, "renew").await?;
        let row: SandboxRow = sqlx::query_as(row::SELECT_ONE)
            .bind(chat_id.to_string())
            .fetch_one(&mut *tx)
            .await?;
        self.commit_row(tx, gate, &row).await?;
        Ok(Some(row))
    }

    /// A client asked again for a session whose last start failed: make it due now, so the
    /// controller retries at once instead of at `next_attempt_at`.
    pub async fn retry_now(
        &self,
        chat_id: ChatId,
        session_id: SessionId,
        now: DateTime<Utc>,
    ) -> Result<()> {
        let (mut tx, gate) = self.begin_write().await?;
        sqlx::query(
            "UPDATE sandboxes SET phase = 'pending', next_attempt_at = NULL, updated_at = ?3 \
             WHERE chat_id = ?1 AND session_id = ?2 AND phase = 'failed' AND deleted_at IS NULL",
        )
        .bind(chat_id.to_string())
        .bind(session_id.to_string())
        .bind(format_time(now))
        .execute(&mut *tx)
        .await?;
        self.commit(tx, gate, chat_id).await
    }

    // ---- controller writes: all conditional on the session they are about ------------------

    /// Records a running container for the session. Returns false if the session changed.
    pub async fn record_running(
        &self,
        chat_id: ChatId,
        session_id: SessionId,
        running: &RunningContainer<'_>,
        action: &str,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let RunningContainer {
            container_id,
            ip,
            port,
        } = *running;
        let (mut tx, gate) = self.begin_write().await?;
        let at = format_time(now);
        let done = sqlx::query(
            "UPDATE sandboxes SET phase = 'running', container_id = ?3, endpoint_ip = ?4, \
             endpoint_port = ?5, observed_generation = generation, attempts = 0, \
             last_error = NULL, next_attempt_at = NULL, running_since = ?6, updated_at = ?6 \
             WHERE chat_id = ?1 AND session_id = ?2 AND deleted_at IS NULL",
        )
        .bind(chat_id.to_string())
        .bind(session_id.to_string())
        .bind(container_id)
        .bind(ip)
        .bind(i64::from(port))
        .bind(&at)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        let outcome = if done { "ok" } else { "superseded" };
        insert_event(
            &mut tx,
            &at,
            &chat_id.to_string(),
            Some(&session_id.to_string()),
            Some(container_id),
            action,
            outcome,
            None,
        )
        .await?;
        self.commit(tx, gate, chat_id).await?;
        Ok(done)
    }

    /// Records a failed attempt; returns the attempt count and when the next attempt is due,
    /// or `None` if the session changed.
    pub async fn record_failure(
        &self,
        chat_id: ChatId,
        session_id: SessionId,
        action: &str,
        error: &str,
        backoff: impl FnOnce(u32) -> Duration,
        now: DateTime<Utc>,
    ) -> Result<Option<(u32, DateTime<Utc>)>> {
        let (mut tx, gate) = self.begin_write().await?;
        let attempts: Option<i64> = sqlx::query_scalar(
            "SELECT attempts FROM sandboxes WHERE chat_id = ?1 AND session_id = ?2 \
             AND deleted_at IS NULL",
        )
        .bind(chat_id.to_string())
        .bind(session_id.to_string())
        .fetch_optional(&mut *tx)
        .await?;
        let at = format_time(now);
        let result = match attempts {
            Some(previous) => {
                let attempts = u32::try_from(previous).unwrap_or(0).saturating_add(1);
                let delay = chrono::Duration::from_std(backoff(attempts))
                    .unwrap_or(chrono::Duration::seconds(60));
                let next_attempt_at = now + delay;
                sqlx::query(
                    "UPDATE sandboxes SET phase = 'failed', attempts = ?3, last_error = ?4, \
                     next_attempt_at = ?5, container_id = NULL, endpoint_ip = NULL, \
                     endpoint_port = NULL, running_since = NULL, updated_at = ?6 \
                     WHERE chat_id = ?1 AND session_id = ?2",
                )
                .bind(chat_id.to_string())
                .bind(session_id.to_string())
                .bind(i64::from(attempts))
                .bind(error)
                .bind(format_time(next_attempt_at))
                .bind(&at)
                .execute(&mut *tx)
                .await?;
                Some((attempts, next_attempt_at))
            }
            None => None,
        };
        insert_event(
            &mut tx,
            &at,
            &chat_id.to_string(),
            Some(&session_id.to_string()),
            None,
            action,
            "error",
            Some(error),
        )
        .await?;
        self.commit(tx, gate, chat_id).await?;
        Ok(result)
    }

    /// Records that the session's container exited on its own (`message` says how), as
    /// exit number `restarts` of a crash loop. With `retry_at` the restart waits until then:
    /// phase `failed`, `attempts` = `restarts`, `last_error` = `message`. Without, only the
    /// count and an event are written (the restart follows at once). Returns false if the
    /// session changed.
    pub async fn record_exit(
        &self,
        chat_id: ChatId,
        session_id: SessionId,
        message: &str,
        restarts: u32,
        retry_at: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let (mut tx, gate) = self.begin_write().await?;
        let at = format_time(now);
        let query = match retry_at {
            Some(retry_at) => sqlx::query(
                "UPDATE sandboxes SET restarts = ?3, phase = 'failed', attempts = ?3, \
                 last_error = ?4, next_attempt_at = ?5, container_id = NULL, \
                 endpoint_ip = NULL, endpoint_port = NULL, running_since = NULL, updated_at = ?6 \
                 WHERE chat_id = ?1 AND session_id = ?2 AND deleted_at IS NULL",
            )
            .bind(chat_id.to_string())
            .bind(session_id.to_string())
            .bind(i64::from(restarts))
            .bind(message)
            .bind(format_time(retry_at))
            .bind(&at),
            None => sqlx::query(
                "UPDATE sandboxes SET restarts = ?3, updated_at = ?4 \
                 WHERE chat_id = ?1 AND session_id = ?2 AND deleted_at IS NULL",
            )
            .bind(chat_id.to_string())
            .bind(session_id.to_string())
            .bind(i64::from(restarts))
            .bind(&at),
        };
        let done = query.execute(&mut *tx).await?.rows_affected() == 1;
        insert_event(
            &mut tx,
            &at,
            &chat_id.to_string(),
            Some(&session_id.to_string()),
            None,
            "exit",
            if retry_at.is_some() {
                "backoff"
            } else {
                "restart"
            },
            Some(message),
        )
        .await?;
        self.commit(tx, gate, chat_id).await?;
        Ok(done)
    }

    /// Records that the session expired and its containers are gone. Does nothing if the
    /// session was renewed in the meantime (its `expires_at` is in the future again).
    pub async fn record_expired(
        &self,
        chat_id: ChatId,
        session_id: SessionId,
        removed: &[String],
        now: DateTime<Utc>,
    ) -> Result<()> {
        let (mut tx, gate) = self.begin_write().await?;
        let at = format_time(now);
        let done = sqlx::query(
            "UPDATE sandboxes SET phase = 'expired', container_id = NULL, endpoint_ip = NULL, \
             endpoint_port = NULL, running_since = NULL, next_attempt_at = NULL, updated_at = ?3 \
             WHERE chat_id = ?1 AND session_id = ?2 AND deleted_at IS NULL \
             AND (expires_at <= ?3 OR phase = 'expired')",
        )
        .bind(chat_id.to_string())
        .bind(session_id.to_string())
        .bind(&at)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        let outcome = if done { "ok" } else { "superseded" };
        insert_event(
            &mut tx,
            &at,
            &chat_id.to_string(),
            Some(&session_id.to_string()),
            removed.first().map(String::as_str),
            "expire",
            outcome,
            None,
        )
        .await?;
        self.commit(tx, gate, chat_id).await?;
        Ok(())
    }

    /// Deletes a row whose deletion was requested, once its containers are gone.
    pub async fn purge(
        &self,
        chat_id: ChatId,
        session_id: SessionId,
        removed: &[String],
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let (mut tx, gate) = self.begin_write().await?;
        let done = sqlx::query(
            "DELETE FROM sandboxes WHERE chat_id = ?1 AND session_id = ?2 \
             AND deleted_at IS NOT NULL",
        )
        .bind(chat_id.to_string())
        .bind(session_id.to_string())
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        let outcome = if done { "ok" } else { "superseded" };
        insert_event(
            &mut tx,
            &format_time(now),
            &chat_id.to_string(),
            Some(&session_id.to_string()),
            removed.first().map(String::as_str),
            "purge",
            outcome,
            None,
        )
        .await?;
        self.commit(tx, gate, chat_id).await?;
        Ok(done)
    }

    /// Retention: deletes events older than `events_before` and rows of expired sessions (no
    /// container) last touched before `expired_before`. Works in small batches, each its own
    /// short transaction, so API writes never wait long behind it. Returns (events, rows).
    pub async fn prune(
        &self,
        events_before: DateTime<Utc>,
        expired_before: DateTime<Utc>,
    ) -> Result<(u64, u64)> {
        const BATCH: i64 = 2_000;
        let mut events = 0;
        loop {
            let n = sqlx::query(
                "DELETE FROM sandbox_events WHERE id IN \
                 (SELECT id FROM sandbox_events WHERE at < ?1 ORDER BY id LIMIT ?2)",
            )
            .bind(format_time(events_before))
            .bind(BATCH)
            .execute(&self.pool)
            .await?
            .rows_affected();
            events += n;
            if n < BATCH as u64 {
                break;
            }
            tokio::task::yield_now().await;
        }
        let mut rows = 0;
        loop {
            let (mut tx, gate) = self.begin_write().await?;
            let deleted: Vec<String> = sqlx::query_scalar(
                "DELETE FROM sandboxes WHERE chat_id IN (SELECT chat_id FROM sandboxes \
                 WHERE phase = 'expired' AND container_id IS NULL AND deleted_at IS NULL \
                 AND updated_at < ?1 LIMIT ?2) RETURNING chat_id",
            )
            .bind(format_time(expired_before))
            .bind(BATCH)
            .fetch_all(&mut *tx)
            .await?;
            let n = deleted.len() as u64;
            rows += n;
            let chats = deleted.iter().filter_map(|c| c.parse().ok()).collect();
            self.finish_write(tx, gate, Touched::Deleted(chats)).await?;
            if n < BATCH as u64 {
                break;
            }
            tokio::task::yield_now().await;
        }
        Ok((events, rows))
    }

    /// Appends an event outside any status change (orphan removals, pass errors).
    #[allow(clippy::too_many_arguments)]
    pub async fn event(
        &self,
        chat_id: &str,
        session_id: Option<&str>,
        container_id: Option<&str>,
        action: &str,
        outcome: &str,
        error: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<()> {
        let (mut tx, _gate) = self.begin_write().await?;
        insert_event(
            &mut tx,
            &format_time(now),
            chat_id,
            session_id,
            container_id,
            action,
            outcome,
            error,
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }
}

/// Reads a chat's row inside a write transaction.
async fn select_row(
    tx: &mut Transaction<'static, Sqlite>,
    chat_id: ChatId,
) -> Result<Option<SandboxRow>> {
    Ok(sqlx::query_as(row::SELECT_ONE)
        .bind(chat_id.to_string())
        .fetch_optional(&mut **tx)
        .await?)
}

/// Appends a successful event about a row's current session and container.
async fn row_event(
    tx: &mut Transaction<'static, Sqlite>,
    at: &str,
    row: &SandboxRow,
    action: &str,
) -> Result<()> {
    let (chat, session) = (row.chat_id.to_string(), row.session_id.to_string());
    insert_event(
        tx,
        at,
        &chat,
        Some(&session),
        row.container_id.as_deref(),
        action,
        "ok",
        None,
    )
    .await
}

/// The old contract for a live session: same agent and volume → reuse; different → conflict
/// if the session has run or its first start is still under way, else `None` (it may be
/// replaced).
fn reuse_or_conflict(
    cur: SandboxRow,
    new: &NewSession,
    now: DateTime<Utc>,
    first_start: chrono::Duration,
) -> Option<CreateOutcome> {
    let starting = cur.attempts == 0 && now < cur.created_at + first_start;
    if cur.agent_id == new.agent_id && cur.volume_host_path == new.volume_host_path {
        Some(CreateOutcome::Reused(cur))
    } else if cur.has_run() || starting {
        Some(CreateOutcome::Conflict(cur))
    } else {
        None
    }
}

/// Writes a brand-new session over whatever the chat had (an expired or deleted session).
async fn write_new_session(
    tx: &mut Transaction<'static, Sqlite>,
    new: &NewSession,
    previous: Option<&SandboxRow>,
    now: DateTime<Utc>,
) -> Result<SandboxRow> {
    let session_id = SessionId::new_random();
    let generation = previous.map_or(1, |p| p.generation + 1);
    let at = format_time(now);
    sqlx::query(
        "INSERT INTO sandboxes (chat_id, session_id, generation, agent_id, volume_host_path, \
           spec_json, spec_hash, created_at, updated_at, expires_at, deleted_at, phase, \
           container_id, endpoint_ip, endpoint_port, attempts, last_error, next_attempt_at, \
           running_since) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8, ?9, NULL, 'pending', NULL, NULL, NULL, 0, \
           NULL, NULL, NULL) \
         ON CONFLICT (chat_id) DO UPDATE SET session_id = excluded.session_id, \
           generation = excluded.generation, agent_id = excluded.agent_id, \
           volume_host_path = excluded.volume_host_path, spec_json = excluded.spec_json, \
           spec_hash = excluded.spec_hash, created_at = excluded.created_at, \
           updated_at = excluded.updated_at, expires_at = excluded.expires_at, \
           deleted_at = NULL, phase = 'pending', container_id = NULL, endpoint_ip = NULL, \
           endpoint_port = NULL, attempts = 0, last_error = NULL, next_attempt_at = NULL, \
           running_since = NULL, restarts = 0",
    )
    .bind(new.chat_id.to_string())
    .bind(session_id.to_string())
    .bind(generation)
    .bind(&new.agent_id)
    .bind(&new.volume_host_path)
    .bind(&new.spec_json)
    .bind(&new.spec_hash)
    .bind(&at)
    .bind(format_time(now + new.ttl))
    .execute(&mut **tx)
    .await?;
    insert_event(
        tx,
        &at,
        &new.chat_id.to_string(),
        Some(&session_id.to_string()),
        None,
        "session_created",
        "ok",
        None,
    )
    .await?;
    Ok(sqlx::query_as(row::SELECT_ONE)
        .bind(new.chat_id.to_string())
        .fetch_one(&mut **tx)
        .await?)
}

#[allow(clippy::too_many_arguments)]
async fn insert_event(
    tx: &mut Transaction<'static, Sqlite>,
    at: &str,
    chat_id: &str,
    session_id: Option<&str>,
    container_id: Option<&str>,
    action: &str,
    outcome: &str,
    error: Option<&str>,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO sandbox_events (at, chat_id, session_id, container_id, action, outcome, error) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )
    .bind(at)
    .bind(chat_id)
    .bind(session_id)
    .bind(container_id)
    .bind(action)
    .bind(outcome)
    .bind(error)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
