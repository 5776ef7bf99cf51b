//! The vocabulary shared by every layer: identifiers, phases, the frozen container spec and
//! the validation of client input. No I/O here except path canonicalisation in [`request`].

pub mod egress;
pub mod hibernation;
pub mod request;
pub mod spec;
pub mod storage;
pub mod volume;

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A chat's id: any UUID spelling on input, lowercase hyphenated everywhere else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ChatId(pub Uuid);

/// One incarnation of a chat's sandbox; a new session always means a new container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SessionId(pub Uuid);

impl SessionId {
    pub fn new_random() -> Self {
        Self(Uuid::new_v4())
    }
}

macro_rules! uuid_text {
    ($t:ty) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0.hyphenated(), f)
            }
        }
        impl FromStr for $t {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }
    };
}
uuid_text!(ChatId);
uuid_text!(SessionId);

/// Where a sandbox is in its life, as the controller last observed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Desired, no running container yet.
    Pending,
    /// A container for the current session runs and has an endpoint.
    Running,
    /// The last start attempt failed; it is retried with backoff while desired.
    Failed,
    /// The session's TTL passed; its container is removed, the row is kept.
    Expired,
    /// Deletion requested; the row goes once the container is gone.
    Deleting,
    /// The engine's pause is under way (written before it, so a call arriving meanwhile
    /// waits for a resume instead of meeting a frozen container).
    Pausing,
    /// The session's container is frozen in place (the engine's pause): memory kept, no CPU.
    Paused,
    /// The stop is under way (written before it, so that a stop is never mistaken for the
    /// agent's crash, even across a restart of sandboxd).
    Hibernating,
    /// The session's container is stopped, its writable layer and mounts kept; a resume
    /// starts the same container again.
    Hibernated,
}

impl Phase {
    pub const ALL: [Phase; 9] = [
        Phase::Pending,
        Phase::Running,
        Phase::Failed,
        Phase::Expired,
        Phase::Deleting,
        Phase::Pausing,
        Phase::Paused,
        Phase::Hibernating,
        Phase::Hibernated,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "pending",
            Phase::Running => "running",
            Phase::Failed => "failed",
            Phase::Expired => "expired",
            Phase::Deleting => "deleting",
            Phase::Pausing => "pausing",
            Phase::Paused => "paused",
            Phase::Hibernating => "hibernating",
            Phase::Hibernated => "hibernated",
        }
    }
}

impl FromStr for Phase {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Phase::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| format!("unknown phase `{s}`"))
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where clients reach the agent: the container's IP on the sandbox network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Endpoint {
    pub ip: String,
    pub port: u16,
}

/// ISO-8601 UTC with microseconds and `Z`, the format of every stored and returned time.
pub fn format_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// Parses times written by [`format_time`] (any RFC 3339 time is accepted).
pub fn parse_time(s: &str) -> Result<DateTime<Utc>, chrono::ParseError> {
    DateTime::parse_from_rfc3339(s).map(|t| t.with_timezone(&Utc))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_ids_are_canonicalised() {
        let forms = [
            "11111111-2222-3333-4444-555555555555",
            "11111111222233334444555555555555",
            "{11111111-2222-3333-4444-555555555555}",
            "urn:uuid:11111111-2222-3333-4444-555555555555",
            "11111111-2222-3333-4444-555555555555".to_uppercase().leak(),
        ];
        for f in forms {
            let id: ChatId = f.parse().unwrap();
            assert_eq!(id.to_string(), "11111111-2222-3333-4444-555555555555");
        }
    }

    #[test]
    fn times_round_trip() {
        let t = Utc::now();
        let s = format_time(t);
        assert!(s.ends_with('Z'));
        let back = parse_time(&s).unwrap();
        assert_eq!(back.timestamp_micros(), t.timestamp_micros());
    }

    #[test]
    fn phases_round_trip() {
        for p in Phase::ALL {
            assert_eq!(p.as_str().parse::<Phase>().unwrap(), p);
        }
        assert!("nope".parse::<Phase>().is_err());
    }
}
