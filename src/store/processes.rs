//! The `processes` table: the record of each background process (what ran, where, how it
//! ended), so that a restarted sandboxd lists them again and can still signal or kill the
//! ones that run. Never their output (that is in memory: `dataplane::processes`).

use chrono::{DateTime, Utc};

use super::{Result, Store, StoreError};
use crate::domain::{format_time, parse_time, ChatId, SessionId};

/// Where a process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessState {
    Running,
    Exited,
    /// Killed through the API (`DELETE`).
    Killed,
    /// Its container went away, or it ended while sandboxd was down and the engine no longer
    /// has its exit code.
    Lost,
}

impl ProcessState {
    pub fn as_str(self) -> &'static str {
        match self {
            ProcessState::Running => "running",
            ProcessState::Exited => "exited",
            ProcessState::Killed => "killed",
            ProcessState::Lost => "lost",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "running" => ProcessState::Running,
            "exited" => ProcessState::Exited,
            "killed" => ProcessState::Killed,
            "lost" => ProcessState::Lost,
            _ => return None,
        })
    }
}

/// One background process, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessRecord {
    pub process_id: String,
    pub chat_id: ChatId,
    pub session_id: SessionId,
    pub container_id: String,
    pub exec_id: String,
    /// `NAME=value`: inherited by every process of its tree.
    pub marker: String,
    /// The argv as JSON.
    pub command: String,
    pub workdir: String,
    pub pid: Option<u32>,
    pub state: ProcessState,
    pub exit_code: Option<i64>,
    pub started_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
    pub output_bytes: u64,
}

#[derive(sqlx::FromRow)]
struct Row {
    process_id: String,
    chat_id: String,
    session_id: String,
    container_id: String,
    exec_id: String,
    marker: String,
    command: String,
    workdir: String,
    pid: Option<i64>,
    state: String,
    exit_code: Option<i64>,
    started_at: String,
    ended_at: Option<String>,
    output_bytes: i64,
}

/// The columns, in `Row`'s order (a macro: sqlx takes only static SQL).
macro_rules! columns {
    () => {
        "process_id, chat_id, session_id, container_id, exec_id, marker, command, workdir, pid, \
         state, exit_code, started_at, ended_at, output_bytes"
    };
}

impl TryFrom<Row> for ProcessRecord {
    type Error = StoreError;
    fn try_from(r: Row) -> Result<Self> {
        let bad = |m: String| StoreError::Corrupt {
            chat_id: r.chat_id.clone(),
            message: format!("process {}: {m}", r.process_id),
        };
        Ok(Self {
            chat_id: r.chat_id.parse().map_err(|e| bad(format!("{e}")))?,
            session_id: r.session_id.parse().map_err(|e| bad(format!("{e}")))?,
            pid: r.pid.and_then(|p| u32::try_from(p).ok()),
            state: ProcessState::parse(&r.state)
                .ok_or_else(|| bad(format!("state {}", r.state)))?,
            started_at: parse_time(&r.started_at).map_err(|e| bad(e.to_string()))?,
            ended_at: r
                .ended_at
                .as_deref()
                .map(parse_time)
                .transpose()
                .map_err(|e| bad(e.to_string()))?,
            output_bytes: u64::try_from(r.output_bytes).unwrap_or(0),
            exit_code: r.exit_code,
            process_id: r.process_id,
            container_id: r.container_id,
            exec_id: r.exec_id,
            marker: r.marker,
            command: r.command,
            workdir: r.workdir,
        })
    }
}

impl Store {
    pub async fn process_insert(&self, p: &ProcessRecord) -> Result<()> {
        sqlx::query(concat!(
            "INSERT INTO processes (",
            columns!(),
            ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)"
        ))
        .bind(&p.process_id)
        .bind(p.chat_id.to_string())
        .bind(p.session_id.to_string())
        .bind(&p.container_id)
        .bind(&p.exec_id)
        .bind(&p.marker)
        .bind(&p.command)
        .bind(&p.workdir)
        .bind(p.pid.map(i64::from))
        .bind(p.state.as_str())
        .bind(p.exit_code)
        .bind(format_time(p.started_at))
        .bind(p.ended_at.map(format_time))
        .bind(i64::try_from(p.output_bytes).unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn process_set_pid(&self, process_id: &str, pid: u32) -> Result<()> {
        sqlx::query("UPDATE processes SET pid = ?2 WHERE process_id = ?1")
            .bind(process_id)
            .bind(i64::from(pid))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records how a running process ended; `false` when it was no longer running (the
    /// first ending recorded wins: a kill before the stream's end stays a kill).
    pub async fn process_end(
        &self,
        process_id: &str,
        state: ProcessState,
        exit_code: Option<i64>,
        output_bytes: u64,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE processes SET state = ?2, exit_code = ?3, ended_at = ?4, \
             output_bytes = MAX(output_bytes, ?5) WHERE process_id = ?1 AND state = 'running'",
        )
        .bind(process_id)
        .bind(state.as_str())
        .bind(exit_code)
        .bind(format_time(now))
        .bind(i64::try_from(output_bytes).unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(done == 1)
    }

    /// The session's processes, oldest first.
    pub async fn processes(
        &self,
        chat_id: ChatId,
        session_id: SessionId,
    ) -> Result<Vec<ProcessRecord>> {
        let rows: Vec<Row> = sqlx::query_as(concat!(
            "SELECT ",
            columns!(),
            " FROM processes WHERE chat_id = ?1 AND session_id = ?2 \
             ORDER BY started_at, process_id"
        ))
        .bind(chat_id.to_string())
        .bind(session_id.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(ProcessRecord::try_from).collect()
    }

    pub async fn process(
        &self,
        chat_id: ChatId,
        process_id: &str,
    ) -> Result<Option<ProcessRecord>> {
        let row: Option<Row> = sqlx::query_as(concat!(
            "SELECT ",
            columns!(),
            " FROM processes WHERE chat_id = ?1 AND process_id = ?2"
        ))
        .bind(chat_id.to_string())
        .bind(process_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(ProcessRecord::try_from).transpose()
    }

    /// Forgets the records of one session of a chat (it ended).
    pub async fn processes_forget(&self, chat_id: ChatId, session_id: SessionId) -> Result<u64> {
        let removed = sqlx::query("DELETE FROM processes WHERE chat_id = ?1 AND session_id = ?2")
            .bind(chat_id.to_string())
            .bind(session_id.to_string())
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(removed)
    }

    /// Forgets the chat's processes of other sessions (they died with their container) and
    /// all but the newest `keep_ended` ended ones of this session.
    pub async fn processes_prune(
        &self,
        chat_id: ChatId,
        session_id: SessionId,
        keep_ended: usize,
    ) -> Result<u64> {
        let removed = sqlx::query(
            "DELETE FROM processes WHERE chat_id = ?1 AND (session_id != ?2 OR process_id IN ( \
               SELECT process_id FROM processes WHERE chat_id = ?1 AND session_id = ?2 \
               AND state != 'running' ORDER BY started_at DESC, process_id DESC \
               LIMIT -1 OFFSET ?3))",
        )
        .bind(chat_id.to_string())
        .bind(session_id.to_string())
        .bind(i64::try_from(keep_ended).unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(chat: ChatId, session: SessionId, id: &str, at: i64) -> ProcessRecord {
        ProcessRecord {
            process_id: id.into(),
            chat_id: chat,
            session_id: session,
            container_id: "c".into(),
            exec_id: "e".into(),
            marker: format!("M={id}"),
            command: r#"["sleep","1"]"#.into(),
            workdir: "/".into(),
            pid: None,
            state: ProcessState::Running,
            exit_code: None,
            started_at: DateTime::from_timestamp(1_700_000_000 + at, 0).unwrap_or_default(),
            ended_at: None,
            output_bytes: 0,
        }
    }

    #[tokio::test]
    async fn records_end_once_and_prune_keeps_the_newest() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| StoreError::Task(e.to_string()))?;
        let store = Store::open(
            &dir.path().join("s.db"),
            std::time::Duration::from_secs(5),
            2,
        )
        .await?;
        store.migrate().await?;
        let (chat, session, old) = (
            ChatId(uuid::Uuid::new_v4()),
            SessionId::new_random(),
            SessionId::new_random(),
        );
        for (i, id) in ["a", "b", "c"].iter().enumerate() {
            store
                .process_insert(&record(chat, session, id, i as i64))
                .await?;
        }
        store.process_insert(&record(chat, old, "z", 0)).await?;
        store.process_set_pid("a", 7).await?;
        let now = Utc::now();
        assert!(
            store
                .process_end("a", ProcessState::Killed, None, 5, now)
                .await?
        );
        assert!(
            !store
                .process_end("a", ProcessState::Exited, Some(0), 9, now)
                .await?
        );
        assert!(
            store
                .process_end("b", ProcessState::Exited, Some(3), 2, now)
                .await?
        );
        let a = store
            .process(chat, "a")
            .await?
            .ok_or(StoreError::Task("a".into()))?;
        assert_eq!(
            (a.state, a.pid, a.output_bytes),
            (ProcessState::Killed, Some(7), 5)
        );
        // One ended kept (the newest, b), the running c kept, the other session's gone.
        assert_eq!(store.processes_prune(chat, session, 1).await?, 2);
        let left: Vec<String> = store
            .processes(chat, session)
            .await?
            .into_iter()
            .map(|p| p.process_id)
            .collect();
        assert_eq!(left, ["b", "c"]);
        assert!(store.process(chat, "z").await?.is_none());
        Ok(())
    }
}
