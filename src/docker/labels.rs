//! The label scheme: sandboxd's only claim on a container. Containers without
//! `sandboxd.managed=true` and this instance's `sandboxd.instance` are never touched.

use std::collections::HashMap;

use crate::domain::{ChatId, SessionId};

pub const MANAGED: &str = "sandboxd.managed";
pub const INSTANCE: &str = "sandboxd.instance";
pub const CHAT_ID: &str = "sandboxd.chat_id";
pub const SESSION_ID: &str = "sandboxd.session_id";
pub const SPEC_HASH: &str = "sandboxd.spec_hash";
pub const AGENT_ID: &str = "sandboxd.agent_id";

/// All labels of a session's container.
pub fn for_session(
    instance: &str,
    chat_id: ChatId,
    session_id: SessionId,
    spec_hash: &str,
    agent_id: &str,
) -> HashMap<String, String> {
    HashMap::from([
        (MANAGED.to_string(), "true".to_string()),
        (INSTANCE.to_string(), instance.to_string()),
        (CHAT_ID.to_string(), chat_id.to_string()),
        (SESSION_ID.to_string(), session_id.to_string()),
        (SPEC_HASH.to_string(), spec_hash.to_string()),
        (AGENT_ID.to_string(), agent_id.to_string()),
    ])
}

/// The Docker list filter selecting exactly this instance's containers.
pub fn instance_filter(instance: &str) -> Vec<String> {
    vec![format!("{MANAGED}=true"), format!("{INSTANCE}={instance}")]
}

/// What the labels say about a container; missing or malformed values are `None`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Parsed {
    pub chat_id: Option<ChatId>,
    pub session_id: Option<SessionId>,
    pub spec_hash: Option<String>,
}

pub fn parse(labels: &HashMap<String, String>) -> Parsed {
    Parsed {
        chat_id: labels.get(CHAT_ID).and_then(|v| v.parse().ok()),
        session_id: labels.get(SESSION_ID).and_then(|v| v.parse().ok()),
        spec_hash: labels.get(SPEC_HASH).cloned(),
    }
}

/// Deterministic name: a retry after a crash collides with the container it already made
/// (and adopts it) instead of making a second one.
pub fn container_name(instance: &str, chat_id: ChatId, session_id: SessionId) -> String {
    let session = session_id.to_string();
    format!("sandboxd-{instance}-{chat_id}-{}", &session[..8])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip() {
        let chat: ChatId = "11111111-2222-3333-4444-555555555555".parse().unwrap();
        let session = SessionId::new_random();
        let labels = for_session("inst", chat, session, "abc", "agent");
        let p = parse(&labels);
        assert_eq!(p.chat_id, Some(chat));
        assert_eq!(p.session_id, Some(session));
        assert_eq!(p.spec_hash.as_deref(), Some("abc"));
        let name = container_name("inst", chat, session);
        assert!(name.starts_with("sandboxd-inst-11111111-2222-3333-4444-555555555555-"));
    }

    proptest! {
        #[test]
        fn parser_never_panics(labels in prop::collection::hash_map(".*", ".*", 0..8),
                               chat in ".*", session in ".*") {
            let mut labels = labels;
            labels.insert(CHAT_ID.into(), chat);
            labels.insert(SESSION_ID.into(), session);
            let _ = parse(&labels);
        }
    }
}
