//! Chat storage's tables (`workspaces`, `chats`, `chat_files`): metadata only, never a file's
//! contents. The directories they describe are `crate::storage`'s; writes here come after
//! the file system's (a file is on disk before its row says so) and a chat's row goes before
//! its directory, so a crash leaves at worst a directory without metadata, which the start-up
//! reconcile removes.

use chrono::{DateTime, Utc};

use super::{Result, Store, StoreError};
use crate::domain::storage::WorkspaceId;
use crate::domain::{format_time, parse_time, ChatId};

/// A user's workspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workspace {
    pub workspace_id: WorkspaceId,
    pub user_id: String,
    pub quota_bytes: u64,
    pub created_at: DateTime<Utc>,
}

/// A chat of a workspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chat {
    pub chat_id: ChatId,
    pub workspace_id: WorkspaceId,
    pub created_at: DateTime<Utc>,
}

/// An attachment's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatFile {
    pub file_id: String,
    pub chat_id: ChatId,
    pub name: String,
    pub content_type: Option<String>,
    pub size_bytes: u64,
    pub created_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct WorkspaceRow {
    workspace_id: String,
    user_id: String,
    quota_bytes: i64,
    created_at: String,
}

#[derive(sqlx::FromRow)]
struct ChatRow {
    chat_id: String,
    workspace_id: String,
    created_at: String,
}

#[derive(sqlx::FromRow)]
struct FileRow {
    file_id: String,
    chat_id: String,
    name: String,
    content_type: Option<String>,
    size_bytes: i64,
    created_at: String,
}

fn corrupt(what: &str, message: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        chat_id: what.to_string(),
        message: message.to_string(),
    }
}

impl TryFrom<WorkspaceRow> for Workspace {
    type Error = StoreError;
    fn try_from(r: WorkspaceRow) -> Result<Self> {
        Ok(Self {
            workspace_id: r
                .workspace_id
                .parse()
                .map_err(|e| corrupt(&r.workspace_id, e))?,
            quota_bytes: u64::try_from(r.quota_bytes).map_err(|e| corrupt(&r.workspace_id, e))?,
            created_at: parse_time(&r.created_at).map_err(|e| corrupt(&r.workspace_id, e))?,
            user_id: r.user_id,
        })
    }
}

impl TryFrom<ChatRow> for Chat {
    type Error = StoreError;
    fn try_from(r: ChatRow) -> Result<Self> {
        Ok(Self {
            chat_id: r.chat_id.parse().map_err(|e| corrupt(&r.chat_id, e))?,
            workspace_id: r.workspace_id.parse().map_err(|e| corrupt(&r.chat_id, e))?,
            created_at: parse_time(&r.created_at).map_err(|e| corrupt(&r.chat_id, e))?,
        })
    }
}

impl TryFrom<FileRow> for ChatFile {
    type Error = StoreError;
    fn try_from(r: FileRow) -> Result<Self> {
        Ok(Self {
            chat_id: r.chat_id.parse().map_err(|e| corrupt(&r.chat_id, e))?,
            size_bytes: u64::try_from(r.size_bytes).map_err(|e| corrupt(&r.chat_id, e))?,
            created_at: parse_time(&r.created_at).map_err(|e| corrupt(&r.chat_id, e))?,
            file_id: r.file_id,
            name: r.name,
            content_type: r.content_type,
        })
    }
}

fn rows<R, T: TryFrom<R, Error = StoreError>>(rows: Vec<R>) -> Result<Vec<T>> {
    rows.into_iter().map(T::try_from).collect()
}

impl Store {
    /// The user's workspace, made with `quota_bytes` if the user had none (`true` when made
    /// now). One per user, whatever races: the `user_id` is unique.
    pub async fn workspace_for_user(
        &self,
        user_id: &str,
        quota_bytes: u64,
        now: DateTime<Utc>,
    ) -> Result<(Workspace, bool)> {
        let id = WorkspaceId::new_random();
        let made = sqlx::query(
            "INSERT INTO workspaces (workspace_id, user_id, quota_bytes, created_at) \
             VALUES (?1, ?2, ?3, ?4) ON CONFLICT (user_id) DO NOTHING",
        )
        .bind(id.to_string())
        .bind(user_id)
        .bind(i64::try_from(quota_bytes).unwrap_or(i64::MAX))
        .bind(format_time(now))
        .execute(&self.pool)
        .await?
        .rows_affected()
            == 1;
        let row: WorkspaceRow = sqlx::query_as(
            "SELECT workspace_id, user_id, quota_bytes, created_at FROM workspaces \
             WHERE user_id = ?1",
        )
        .bind(user_id)
        .fetch_one(&self.pool)
        .await?;
        Ok((Workspace::try_from(row)?, made))
    }

    pub async fn workspace(&self, id: WorkspaceId) -> Result<Option<Workspace>> {
        let row: Option<WorkspaceRow> = sqlx::query_as(
            "SELECT workspace_id, user_id, quota_bytes, created_at FROM workspaces \
             WHERE workspace_id = ?1",
        )
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.map(Workspace::try_from).transpose()
    }

    /// Every workspace, or the one of `user_id`.
    pub async fn workspaces(&self, user_id: Option<&str>) -> Result<Vec<Workspace>> {
        let found: Vec<WorkspaceRow> = sqlx::query_as(
            "SELECT workspace_id, user_id, quota_bytes, created_at FROM workspaces \
             WHERE ?1 IS NULL OR user_id = ?1 ORDER BY created_at",
        )
        .bind(user_id)
        .fetch_all(&self.pool)
        .await?;
        rows(found)
    }

    pub async fn workspace_set_quota(&self, id: WorkspaceId, quota_bytes: u64) -> Result<()> {
        sqlx::query("UPDATE workspaces SET quota_bytes = ?2 WHERE workspace_id = ?1")
            .bind(id.to_string())
            .bind(i64::try_from(quota_bytes).unwrap_or(i64::MAX))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Forgets a workspace that was never completed (its file system could not be made).
    pub async fn workspace_delete(&self, id: WorkspaceId) -> Result<()> {
        sqlx::query("DELETE FROM workspaces WHERE workspace_id = ?1")
            .bind(id.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records a chat whose directory exists; `false` when the chat id is taken.
    pub async fn chat_insert(&self, chat: &Chat) -> Result<bool> {
        let done = sqlx::query(
            "INSERT INTO chats (chat_id, workspace_id, created_at) VALUES (?1, ?2, ?3) \
             ON CONFLICT (chat_id) DO NOTHING",
        )
        .bind(chat.chat_id.to_string())
        .bind(chat.workspace_id.to_string())
        .bind(format_time(chat.created_at))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn chat(&self, chat_id: ChatId) -> Result<Option<Chat>> {
        let row: Option<ChatRow> = sqlx::query_as(
            "SELECT chat_id, workspace_id, created_at FROM chats WHERE chat_id = ?1",
        )
        .bind(chat_id.to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.map(Chat::try_from).transpose()
    }

    /// A workspace's chats, oldest first; every chat when `None`.
    pub async fn chats(&self, workspace_id: Option<WorkspaceId>) -> Result<Vec<Chat>> {
        let found: Vec<ChatRow> = sqlx::query_as(
            "SELECT chat_id, workspace_id, created_at FROM chats \
             WHERE ?1 IS NULL OR workspace_id = ?1 ORDER BY created_at, chat_id",
        )
        .bind(workspace_id.map(|w| w.to_string()))
        .fetch_all(&self.pool)
        .await?;
        rows(found)
    }

    /// Forgets a chat and its attachments' metadata (one transaction).
    pub async fn chat_delete(&self, chat_id: ChatId) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM chat_files WHERE chat_id = ?1")
            .bind(chat_id.to_string())
            .execute(&mut *tx)
            .await?;
        let done = sqlx::query("DELETE FROM chats WHERE chat_id = ?1")
            .bind(chat_id.to_string())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records an attachment written to disk (replacing one of the same name).
    pub async fn file_put(&self, file: &ChatFile) -> Result<()> {
        sqlx::query(
            "INSERT INTO chat_files (file_id, chat_id, name, content_type, size_bytes, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
             ON CONFLICT (chat_id, name) DO UPDATE SET file_id = excluded.file_id, \
             content_type = excluded.content_type, size_bytes = excluded.size_bytes, \
             created_at = excluded.created_at",
        )
        .bind(&file.file_id)
        .bind(file.chat_id.to_string())
        .bind(&file.name)
        .bind(&file.content_type)
        .bind(i64::try_from(file.size_bytes).unwrap_or(i64::MAX))
        .bind(format_time(file.created_at))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn file(&self, chat_id: ChatId, name: &str) -> Result<Option<ChatFile>> {
        let row: Option<FileRow> = sqlx::query_as(
            "SELECT file_id, chat_id, name, content_type, size_bytes, created_at \
             FROM chat_files WHERE chat_id = ?1 AND name = ?2",
        )
        .bind(chat_id.to_string())
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        row.map(ChatFile::try_from).transpose()
    }

    pub async fn files(&self, chat_id: ChatId) -> Result<Vec<ChatFile>> {
        let found: Vec<FileRow> = sqlx::query_as(
            "SELECT file_id, chat_id, name, content_type, size_bytes, created_at \
             FROM chat_files WHERE chat_id = ?1 ORDER BY name",
        )
        .bind(chat_id.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows(found)
    }

    pub async fn file_delete(&self, chat_id: ChatId, name: &str) -> Result<bool> {
        let done = sqlx::query("DELETE FROM chat_files WHERE chat_id = ?1 AND name = ?2")
            .bind(chat_id.to_string())
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }
}
