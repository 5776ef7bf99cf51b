//! SQLite adapter: desired state, observed status and the event log.
//!
//! Every read-modify-write runs in a `BEGIN IMMEDIATE` transaction, so concurrent requests for
//! one chat serialise on the write lock instead of racing. Controller status writes are
//! conditional on the session they are about, so a stale action can never overwrite a newer
//! session. Every commit bumps a watch channel that waiting requests listen on. The server
//! answers its reads from an in-memory mirror of the table (`mirror.rs`).
//!
//! Here: opening, the write gate and commits, reads. By concern: `sessions.rs` (desired-state
//! writes), `status.rs` (the controller's conditional status writes), `events.rs` (the event
//! log, with typed actions and outcomes), `retention.rs`, `row.rs` (typed rows), `mirror.rs`.
//! Phase names are bound from [`Phase`], never spelt in SQL.

mod events;
mod hibernation;
mod mirror;
mod pool;
mod processes;
mod retention;
mod row;
mod sessions;
mod status;
mod storage;
pub mod wait;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Sqlite, Transaction};
use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::domain::{ChatId, Phase};

pub use events::{EventAction, EventOutcome, NewEvent};
pub use hibernation::{Declared, Touch};
pub use pool::{Member, MemberState};
pub use processes::{ProcessRecord, ProcessState};
pub use row::{SandboxRow, StoredEvent};
pub use sessions::{ApplyOutcome, CreateOutcome, ImportOutcome, LegacyImport};
pub use status::RunningContainer;
pub use storage::{Chat, ChatFile, Workspace};

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
    /// A write kept losing its race (another writer changed the row every time).
    #[error("{0}")]
    Conflict(String),
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
    /// The profile the request named (`None`: the default). A live session under another
    /// profile is not reused by a create.
    pub profile: Option<String>,
    /// The declared state (`PUT`'s `state`; a create always wants it running).
    pub state: crate::domain::hibernation::SandboxState,
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
    /// Poked after every commit that may have appended events (the watch feed's tailer).
    appended: Arc<tokio::sync::Notify>,
    /// How far the idle clock may lag before a call writes it (`touch`).
    activity_granularity: chrono::Duration,
    /// Chats whose idle clock a background write is restarting (`touch_later`).
    touching: Arc<std::sync::Mutex<std::collections::HashSet<ChatId>>>,
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
    /// One chat's row, re-read; no event was appended.
    Quiet(ChatId),
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
            appended: Arc::default(),
            activity_granularity: chrono::Duration::seconds(1),
            touching: Arc::default(),
        }
    }

    /// How far the idle clock may lag: 1 s (the default) where an idle policy acts on it;
    /// coarser where it is only shown, so a busy host's calls do not become writes.
    pub fn with_activity_granularity(mut self, lag: chrono::Duration) -> Self {
        self.activity_granularity = lag;
        self
    }

    pub(crate) fn activity_granularity(&self) -> chrono::Duration {
        self.activity_granularity
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
        self.changed_row(chat_id);
        self.appended.notify_one();
    }

    /// Announces a committed write that appended no event: the watch feed need not look.
    fn changed_row(&self, chat_id: Option<ChatId>) {
        // No receiver is not an error: nobody is waiting.
        let _ = self.changes.send(chat_id);
    }

    /// Resolves after a commit that may have appended events (one waiter: the watch feed).
    pub async fn events_appended(&self) {
        self.appended.notified().await
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

    /// Commits a write about one chat that appended no event (the idle clock).
    async fn commit_without_events(
        &self,
        tx: Transaction<'static, Sqlite>,
        gate: WriteGate,
        chat_id: ChatId,
    ) -> Result<()> {
        self.finish_write(tx, gate, Touched::Quiet(chat_id)).await
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
                Touched::Chat(chat_id) | Touched::Quiet(chat_id) => {
                    let row = match &store.mirror {
                        Some(_) => select_row(&mut tx, chat_id).await?,
                        None => None,
                    };
                    tx.commit().await?;
                    if let Some(mirror) = &store.mirror {
                        mirror.set(chat_id, row);
                    }
                    drop(gate);
                    if matches!(touched, Touched::Quiet(_)) {
                        store.changed_row(Some(chat_id));
                    } else {
                        store.changed(Some(chat_id));
                    }
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

    /// A chat's idle clock as the in-memory copy has it (`None` without the copy or the
    /// row: the caller asks SQLite through a write).
    pub(crate) fn last_active(&self, chat_id: ChatId) -> Option<chrono::DateTime<chrono::Utc>> {
        self.mirror.as_ref()?.last_active(chat_id)
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
}

/// Reads a chat's row inside a write transaction.
pub(super) async fn select_row(
    tx: &mut Transaction<'static, Sqlite>,
    chat_id: ChatId,
) -> Result<Option<SandboxRow>> {
    Ok(sqlx::query_as(row::SELECT_ONE)
        .bind(chat_id.to_string())
        .fetch_optional(&mut **tx)
        .await?)
}
