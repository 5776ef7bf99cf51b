//! Retention: old events and long-expired rows are deleted in small batches.

use chrono::{DateTime, Utc};

use super::{Result, Store, Touched};
use crate::domain::{format_time, Phase};

impl Store {
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
                 WHERE phase = ?3 AND container_id IS NULL AND deleted_at IS NULL \
                 AND updated_at < ?1 LIMIT ?2) RETURNING chat_id",
            )
            .bind(format_time(expired_before))
            .bind(BATCH)
            .bind(Phase::Expired.as_str())
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
        // Background processes' records outlive nothing: their session's row is gone or
        // replaced (a sandboxd that was down when it ended did not forget them).
        sqlx::query(
            "DELETE FROM processes WHERE NOT EXISTS (SELECT 1 FROM sandboxes s \
             WHERE s.chat_id = processes.chat_id AND s.session_id = processes.session_id)",
        )
        .execute(&self.pool)
        .await?;
        Ok((events, rows))
    }
}
