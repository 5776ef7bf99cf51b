//! Chat storage's vocabulary: workspaces (one per user, with a quota), chats in them, and the
//! names attachments may have. Pure: where the bytes live is `crate::storage`'s.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The one file of a chat directory that is not an attachment: the chat's history.
pub const HISTORY_FILE: &str = "history.md";

/// The longest attachment name, in bytes (a file name's limit on Linux file systems).
pub const MAX_NAME_BYTES: usize = 255;

/// A workspace's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WorkspaceId(pub Uuid);

impl WorkspaceId {
    pub fn new_random() -> Self {
        Self(Uuid::new_v4())
    }
}

impl fmt::Display for WorkspaceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

impl FromStr for WorkspaceId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(Self)
    }
}

/// Why an attachment name is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("must not be empty")]
    Empty,
    #[error("must not be `.` or `..`")]
    Dots,
    #[error("must not contain `/` or `\\`")]
    Separator,
    #[error("`history.md` is reserved for the chat's history")]
    Reserved,
    #[error("must not contain NUL or control characters")]
    Control,
    #[error("must be at most 255 bytes")]
    TooLong,
}

/// An attachment's file name in its chat directory: one path component, never the history.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AttachmentName(String);

impl AttachmentName {
    pub fn parse(raw: &str) -> Result<Self, NameError> {
        if raw.is_empty() {
            return Err(NameError::Empty);
        }
        if raw == "." || raw == ".." {
            return Err(NameError::Dots);
        }
        if raw.contains(['/', '\\']) {
            return Err(NameError::Separator);
        }
        if raw.chars().any(char::is_control) {
            return Err(NameError::Control);
        }
        if raw.len() > MAX_NAME_BYTES {
            return Err(NameError::TooLong);
        }
        if raw == HISTORY_FILE {
            return Err(NameError::Reserved);
        }
        Ok(Self(raw.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AttachmentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attachment_names_are_one_component_and_never_the_history() {
        for ok in [
            "a.txt",
            "report 2026.pdf",
            "ünïcödé.md",
            ".hidden",
            "...",
            "history.md.bak",
        ] {
            assert_eq!(
                AttachmentName::parse(ok).map(|n| n.to_string()),
                Ok(ok.into())
            );
        }
        let refused = [
            ("", NameError::Empty),
            (".", NameError::Dots),
            ("..", NameError::Dots),
            ("a/b", NameError::Separator),
            ("/etc", NameError::Separator),
            ("a\\b", NameError::Separator),
            ("history.md", NameError::Reserved),
            ("a\0b", NameError::Control),
            ("line\nbreak", NameError::Control),
            ("tab\t", NameError::Control),
        ];
        for (raw, why) in refused {
            assert_eq!(AttachmentName::parse(raw), Err(why), "{raw:?}");
        }
        assert_eq!(AttachmentName::parse(&"x".repeat(255)).map(|_| ()), Ok(()));
        assert_eq!(
            AttachmentName::parse(&"x".repeat(256)),
            Err(NameError::TooLong)
        );
        // 255 bytes, not characters: 128 two-byte characters are too long.
        assert_eq!(
            AttachmentName::parse(&"é".repeat(128)),
            Err(NameError::TooLong)
        );
    }
}
