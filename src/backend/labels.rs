//! The label scheme: sandboxd's only claim on a container. Containers without
//! `sandboxd.managed=true` and this instance's `sandboxd.instance` are never touched.

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use crate::domain::{format_time, ChatId, SessionId};

pub const MANAGED: &str = "sandboxd.managed";
pub const INSTANCE: &str = "sandboxd.instance";
pub const CHAT_ID: &str = "sandboxd.chat_id";
pub const SESSION_ID: &str = "sandboxd.session_id";
pub const SPEC_HASH: &str = "sandboxd.spec_hash";
pub const AGENT_ID: &str = "sandboxd.agent_id";
/// A warm-pool member's slot (`pool/`): it belongs to no chat until claimed.
pub const POOL_SLOT: &str = "sandboxd.pool_slot";
/// On a network sandboxd added beside a full one: the network it is a shard of.
pub const SHARD_OF: &str = "sandboxd.shard_of";
/// A warm-pool member's class (the hash of what it was started with).
pub const POOL_CLASS: &str = "sandboxd.pool_class";

/// The old Python service's labels. Every sandboxd container carries them too, so its tooling
/// (`docker ps --filter label=chat_id=…`) keeps working; sandboxd itself reads only its own
/// labels, except to take over containers the old service started (`legacy`).
pub mod legacy {
    pub const SESSION_ID: &str = "session_id";
    pub const CHAT_ID: &str = "chat_id";
    /// The session's expiry when the container was created: labels cannot change, so a
    /// renew does not move it. The row's `expires_at` is the truth.
    pub const EXPIRES_AT: &str = "expires_at";
    pub const AGENT_ID: &str = "agent_id";
    pub const VOLUME_HOST_PATH: &str = "volume_host_path";
    pub const ENDPOINT_PORT: &str = "endpoint_port";
    pub const ALL: [&str; 6] = [
        SESSION_ID,
        CHAT_ID,
        EXPIRES_AT,
        AGENT_ID,
        VOLUME_HOST_PATH,
        ENDPOINT_PORT,
    ];
}

/// What a session's labels say.
#[derive(Debug, Clone, Copy)]
pub struct SessionLabels<'a> {
    pub instance: &'a str,
    pub chat_id: ChatId,
    pub session_id: SessionId,
    pub spec_hash: &'a str,
    pub agent_id: &'a str,
    pub volume_host_path: &'a str,
    pub endpoint_port: u16,
    pub expires_at: DateTime<Utc>,
}

/// The labels of the container (or service) a start request makes, for `instance`.
pub fn for_request(
    instance: &str,
    req: &crate::backend::StartRequest<'_>,
) -> HashMap<String, String> {
    for_session(&SessionLabels {
        instance,
        chat_id: req.chat_id,
        session_id: req.session_id,
        spec_hash: req.spec_hash,
        agent_id: req.agent_id,
        volume_host_path: req.volume_host_path,
        endpoint_port: req.spec.agent_port,
        expires_at: req.expires_at,
    })
}

/// All labels of a session's container: sandboxd's own and the old service's.
pub fn for_session(s: &SessionLabels<'_>) -> HashMap<String, String> {
    HashMap::from([
        (MANAGED.to_string(), "true".to_string()),
        (INSTANCE.to_string(), s.instance.to_string()),
        (CHAT_ID.to_string(), s.chat_id.to_string()),
        (SESSION_ID.to_string(), s.session_id.to_string()),
        (SPEC_HASH.to_string(), s.spec_hash.to_string()),
        (AGENT_ID.to_string(), s.agent_id.to_string()),
        (legacy::SESSION_ID.to_string(), s.session_id.to_string()),
        (legacy::CHAT_ID.to_string(), s.chat_id.to_string()),
        (legacy::EXPIRES_AT.to_string(), format_time(s.expires_at)),
        (legacy::AGENT_ID.to_string(), s.agent_id.to_string()),
        (
            legacy::VOLUME_HOST_PATH.to_string(),
            s.volume_host_path.to_string(),
        ),
        (
            legacy::ENDPOINT_PORT.to_string(),
            s.endpoint_port.to_string(),
        ),
    ])
}

/// A container the old service started, as its labels describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegacySession {
    pub chat_id: ChatId,
    pub session_id: SessionId,
    pub agent_id: String,
    pub volume_host_path: String,
    pub endpoint_port: u16,
    pub expires_at: DateTime<Utc>,
}

/// Reads the old service's six labels the way it did (`_session_from_container`): `None`
/// when any is missing or malformed, or when the container is sandboxd's own.
pub fn parse_legacy(labels: &HashMap<String, String>) -> Option<LegacySession> {
    if labels.contains_key(MANAGED) {
        return None;
    }
    let get = |k: &str| labels.get(k).map(String::as_str);
    let volume_host_path = get(legacy::VOLUME_HOST_PATH)?;
    let endpoint_port: u16 = get(legacy::ENDPOINT_PORT)?.trim().parse().ok()?;
    if !volume_host_path.starts_with('/') || endpoint_port == 0 {
        return None;
    }
    Some(LegacySession {
        chat_id: get(legacy::CHAT_ID)?.parse().ok()?,
        session_id: get(legacy::SESSION_ID)?.parse().ok()?,
        agent_id: get(legacy::AGENT_ID)?.to_string(),
        volume_host_path: volume_host_path.to_string(),
        endpoint_port,
        expires_at: parse_python_time(get(legacy::EXPIRES_AT)?)?,
    })
}

/// Python's `datetime.isoformat()` (`2026-04-02T12:05:00+00:00`, optional fraction) or any
/// RFC 3339 time. A time without an offset is read as UTC, as the old service wrote UTC.
fn parse_python_time(s: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
        .ok()
        .map(|t| t.and_utc())
}

/// Whether labels mark a container (or service) as this instance's: the only ones sandboxd
/// ever touches.
pub fn is_ours(labels: &HashMap<String, String>, instance: &str) -> bool {
    labels.get(INSTANCE).map(String::as_str) == Some(instance)
        && labels.get(MANAGED).map(String::as_str) == Some("true")
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
    pub pool_slot: Option<String>,
}

pub fn parse(labels: &HashMap<String, String>) -> Parsed {
    Parsed {
        chat_id: labels.get(CHAT_ID).and_then(|v| v.parse().ok()),
        session_id: labels.get(SESSION_ID).and_then(|v| v.parse().ok()),
        spec_hash: labels.get(SPEC_HASH).cloned(),
        pool_slot: labels.get(POOL_SLOT).cloned(),
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

    fn labels_of(chat: ChatId, session: SessionId) -> HashMap<String, String> {
        for_session(&SessionLabels {
            instance: "inst",
            chat_id: chat,
            session_id: session,
            spec_hash: "abc",
            agent_id: "agent",
            volume_host_path: "/data/v",
            endpoint_port: 8000,
            expires_at: Utc::now(),
        })
    }

    #[test]
    fn old_labels_are_carried_but_sandboxd_containers_are_never_legacy() {
        let chat: ChatId = "11111111-2222-3333-4444-555555555555".parse().unwrap();
        let labels = labels_of(chat, SessionId::new_random());
        for k in legacy::ALL {
            assert!(labels.contains_key(k), "{k}");
        }
        assert_eq!(labels[legacy::CHAT_ID], chat.to_string());
        assert_eq!(parse_legacy(&labels), None);
    }

    #[test]
    fn old_service_labels_parse_like_it_did() {
        let mut l: HashMap<String, String> = HashMap::from([
            (
                "session_id".into(),
                "aaaaaaaa-2222-3333-4444-555555555555".into(),
            ),
            (
                "chat_id".into(),
                "11111111-2222-3333-4444-555555555555".into(),
            ),
            (
                "expires_at".into(),
                "2026-04-02T12:05:00.123456+00:00".into(),
            ),
            ("agent_id".into(), "agent-1".into()),
            ("volume_host_path".into(), "/srv/v".into()),
            ("endpoint_port".into(), "8000".into()),
        ]);
        let s = parse_legacy(&l).expect("legacy");
        assert_eq!(s.endpoint_port, 8000);
        assert_eq!(format_time(s.expires_at), "2026-04-02T12:05:00.123456Z");
        l.insert("expires_at".into(), "2026-04-02T12:05:00".into());
        assert!(parse_legacy(&l).is_some());
        l.insert("volume_host_path".into(), "relative".into());
        assert_eq!(parse_legacy(&l), None);
    }

    #[test]
    fn round_trip() {
        let chat: ChatId = "11111111-2222-3333-4444-555555555555".parse().unwrap();
        let session = SessionId::new_random();
        let labels = labels_of(chat, session);
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
            let _ = parse_legacy(&labels);
        }
    }
}
