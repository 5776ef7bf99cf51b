//! Validation of what clients send. Every failure names the field, so the HTTP layer can answer
//! `422 {"detail": "..."}` and write nothing.

use super::ChatId;

/// Longest accepted `agent_id`; it becomes a label and an environment value.
pub const MAX_AGENT_ID_LEN: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidInput {
    #[error("invalid chat_id: expected a UUID")]
    ChatId,
    #[error("invalid agent_id: must not be blank")]
    AgentIdBlank,
    #[error("invalid agent_id: at most {MAX_AGENT_ID_LEN} bytes, no control characters")]
    AgentIdMalformed,
    #[error("invalid volume_host_path: {0}")]
    Volume(&'static str),
}

pub fn parse_chat_id(raw: &str) -> Result<ChatId, InvalidInput> {
    raw.parse().map_err(|_| InvalidInput::ChatId)
}

/// Non-blank, bounded, printable. The value is kept as given (the old service did the same).
pub fn validate_agent_id(raw: &str) -> Result<&str, InvalidInput> {
    if raw.trim().is_empty() {
        return Err(InvalidInput::AgentIdBlank);
    }
    if raw.len() > MAX_AGENT_ID_LEN || raw.chars().any(char::is_control) {
        return Err(InvalidInput::AgentIdMalformed);
    }
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn agent_ids() {
        assert_eq!(validate_agent_id("a"), Ok("a"));
        assert_eq!(validate_agent_id("  "), Err(InvalidInput::AgentIdBlank));
        assert_eq!(validate_agent_id(""), Err(InvalidInput::AgentIdBlank));
        assert_eq!(
            validate_agent_id("a\nb"),
            Err(InvalidInput::AgentIdMalformed)
        );
        assert_eq!(
            validate_agent_id(&"x".repeat(300)),
            Err(InvalidInput::AgentIdMalformed)
        );
    }

    proptest! {
        #[test]
        fn validators_never_panic(s in ".*") {
            let _ = parse_chat_id(&s);
            let _ = validate_agent_id(&s);
        }
    }
}
