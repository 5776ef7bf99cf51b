//! A converged world of N desired rows × N observed containers: what every resync pass plans
//! over in steady state. Shared by the `plan` (criterion) and `e2e` benches.

use sandboxd::domain::{ChatId, Phase, SessionId};
use sandboxd::planner::{Desired, Observed};

pub fn converged(n: usize) -> (Vec<Desired>, Vec<Observed>) {
    let now = chrono::Utc::now();
    let mut d = Vec::with_capacity(n);
    let mut o = Vec::with_capacity(n);
    for i in 0..n {
        let chat = ChatId(uuid::Uuid::from_u128(i as u128 + 1));
        let session = SessionId(uuid::Uuid::from_u128((i as u128 + 1) << 64));
        let id = format!("{i:064x}");
        d.push(Desired {
            chat_id: chat,
            session_id: session,
            spec_hash: "h".repeat(64),
            expires_at: now + chrono::Duration::hours(1),
            deleted: false,
            phase: Phase::Running,
            container_id: Some(id.clone()),
            endpoint_ip: Some("10.0.0.1".into()),
            next_attempt_at: None,
            state: sandboxd::domain::hibernation::SandboxState::Running,
            state_changes_at: None,
            hibernate_at_expiry: false,
        });
        o.push(Observed {
            container_id: id,
            chat_id: Some(chat),
            session_id: Some(session),
            spec_hash: Some("h".repeat(64)),
            running: true,
            paused: false,
            ip: Some("10.0.0.1".into()),
            legacy: false,
            pool_slot: None,
            network: None,
        });
    }
    (d, o)
}
