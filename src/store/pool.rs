//! The warm pool's table (`pool_members`): desired state of the pool, written by the pool
//! reconciler and by claims. Rows here never touch `sandboxes`, so they skip the mirror.

use chrono::{DateTime, Utc};

use super::{Result, Store};
use crate::domain::{format_time, ChatId, SessionId};

/// A member's lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberState {
    /// Its container is being created and started.
    Starting,
    /// Running, waiting for a claim.
    Idle,
    /// A claim is binding it to a chat; not complete until `Claimed`.
    Claiming,
    /// Bound to a chat: a session's container from now on, never returned to the pool.
    Claimed,
}

impl MemberState {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Starting => "starting",
            MemberState::Idle => "idle",
            MemberState::Claiming => "claiming",
            MemberState::Claimed => "claimed",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "starting" => MemberState::Starting,
            "idle" => MemberState::Idle,
            "claiming" => MemberState::Claiming,
            "claimed" => MemberState::Claimed,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, sqlx::FromRow)]
struct MemberRow {
    slot: String,
    class_hash: String,
    state: String,
    container_id: Option<String>,
    endpoint_ip: Option<String>,
    chat_id: Option<String>,
    session_id: Option<String>,
}

/// One pool member as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub slot: String,
    pub class_hash: String,
    pub state: MemberState,
    pub container_id: Option<String>,
    pub endpoint_ip: Option<String>,
    pub chat_id: Option<ChatId>,
    pub session_id: Option<SessionId>,
}

impl From<MemberRow> for Member {
    fn from(r: MemberRow) -> Self {
        Member {
            state: MemberState::parse(&r.state).unwrap_or(MemberState::Claiming),
            chat_id: r.chat_id.and_then(|c| c.parse().ok()),
            session_id: r.session_id.and_then(|s| s.parse().ok()),
            slot: r.slot,
            class_hash: r.class_hash,
            container_id: r.container_id,
            endpoint_ip: r.endpoint_ip,
        }
    }
}

/// The columns a `Member` is read from (a macro: sqlx takes static SQL only).
macro_rules! member_columns {
    () => {
        "slot, class_hash, state, container_id, endpoint_ip, chat_id, session_id"
    };
}

impl Store {
    /// Every member.
    pub async fn pool_members(&self) -> Result<Vec<Member>> {
        let rows: Vec<MemberRow> = sqlx::query_as(concat!(
            "SELECT ",
            member_columns!(),
            " FROM pool_members ORDER BY created_at"
        ))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(Member::from).collect())
    }

    /// A new member, before its container exists.
    pub async fn pool_insert(
        &self,
        slot: &str,
        class_hash: &str,
        now: DateTime<Utc>,
    ) -> Result<()> {
        let at = format_time(now);
        sqlx::query(
            "INSERT INTO pool_members (slot, class_hash, state, created_at, updated_at) \
             VALUES (?1, ?2, 'starting', ?3, ?3)",
        )
        .bind(slot)
        .bind(class_hash)
        .bind(&at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The member's container (created, not yet running).
    pub async fn pool_created(
        &self,
        slot: &str,
        container_id: &str,
        now: DateTime<Utc>,
    ) -> Result<()> {
        sqlx::query("UPDATE pool_members SET container_id = ?2, updated_at = ?3 WHERE slot = ?1")
            .bind(slot)
            .bind(container_id)
            .bind(format_time(now))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The member runs and waits at `ip`.
    pub async fn pool_idle(&self, slot: &str, ip: &str, now: DateTime<Utc>) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE pool_members SET state = 'idle', endpoint_ip = ?2, updated_at = ?3 \
             WHERE slot = ?1 AND state = 'starting'",
        )
        .bind(slot)
        .bind(ip)
        .bind(format_time(now))
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(done == 1)
    }

    /// Takes the oldest idle member of `class_hash` for a chat, atomically (one statement):
    /// two claims never get the same member.
    pub async fn pool_take(
        &self,
        class_hash: &str,
        chat_id: ChatId,
        session_id: SessionId,
        now: DateTime<Utc>,
    ) -> Result<Option<Member>> {
        let row: Option<MemberRow> = sqlx::query_as(concat!(
            "UPDATE pool_members SET state = 'claiming', chat_id = ?2, session_id = ?3, \
             updated_at = ?4 \
             WHERE slot = (SELECT slot FROM pool_members WHERE class_hash = ?1 AND state = 'idle' \
                           ORDER BY created_at LIMIT 1) AND state = 'idle' \
             RETURNING ",
            member_columns!()
        ))
        .bind(class_hash)
        .bind(chat_id.to_string())
        .bind(session_id.to_string())
        .bind(format_time(now))
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(Member::from))
    }

    /// The claim bound the member completely.
    pub async fn pool_claimed(&self, slot: &str, now: DateTime<Utc>) -> Result<()> {
        sqlx::query(
            "UPDATE pool_members SET state = 'claimed', updated_at = ?2 \
             WHERE slot = ?1 AND state = 'claiming'",
        )
        .bind(slot)
        .bind(format_time(now))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The member is gone (its container removed, its mounts undone).
    pub async fn pool_delete(&self, slot: &str) -> Result<()> {
        sqlx::query("DELETE FROM pool_members WHERE slot = ?1")
            .bind(slot)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::time::Duration;

    use chrono::Utc;

    use crate::domain::{ChatId, SessionId};
    use crate::store::{MemberState, Store};

    /// Thirty claims race for ten idle members over four connections: each member goes to
    /// exactly one chat, twenty claims find the pool empty, a member of another class or
    /// still starting is never taken.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn racing_claims_never_share_a_member() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("db"), Duration::from_secs(5), 4)
            .await
            .expect("store");
        store.migrate().await.expect("migrate");
        let now = Utc::now();
        for i in 0..10 {
            let slot = format!("s{i}");
            store
                .pool_insert(&slot, "class-a", now)
                .await
                .expect("insert");
            store
                .pool_created(&slot, &format!("c{i}"), now)
                .await
                .expect("created");
            assert!(store.pool_idle(&slot, "10.0.0.2", now).await.expect("idle"));
        }
        store
            .pool_insert("other", "class-b", now)
            .await
            .expect("insert");
        store
            .pool_idle("other", "10.0.0.3", now)
            .await
            .expect("idle");
        store
            .pool_insert("starting", "class-a", now)
            .await
            .expect("insert");
        let claims = (0..30).map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                let chat = ChatId(uuid::Uuid::new_v4());
                let taken = store
                    .pool_take("class-a", chat, SessionId(uuid::Uuid::new_v4()), Utc::now())
                    .await
                    .expect("take");
                taken.map(|m| (m.slot, m.chat_id, chat))
            })
        });
        let mut won = Vec::new();
        for c in claims {
            if let Some(w) = c.await.expect("task") {
                won.push(w);
            }
        }
        assert_eq!(won.len(), 10, "every idle member once: {won:?}");
        let slots: HashSet<_> = won.iter().map(|(s, _, _)| s.clone()).collect();
        assert_eq!(slots.len(), 10, "no member twice");
        assert!(won
            .iter()
            .all(|(_, recorded, chat)| *recorded == Some(*chat)));
        let members = store.pool_members().await.expect("members");
        for m in &members {
            let expected = match m.slot.as_str() {
                "other" => MemberState::Idle,
                "starting" => MemberState::Starting,
                _ => MemberState::Claiming,
            };
            assert_eq!(m.state, expected, "{}", m.slot);
        }
    }
}
