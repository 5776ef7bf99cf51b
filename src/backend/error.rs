//! One error for every backend: what went wrong as a typed [`ErrorKind`] (callers decide on
//! the kind, never on the text), and a message for people. Kinds come from the engine's
//! status codes or from the backend's own checks, never from parsing an engine's message.

use std::error::Error as StdError;

use bollard::errors::Error as BollardError;

/// What kind of failure, as the controller and the data plane act on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The engine did not answer (transport failure, timeout): the connection may be gone.
    Unavailable,
    /// The object of the call (container, service, exec, network) does not exist.
    NotFound,
    /// A path inside a container does not exist (its container does).
    NoSuchPath,
    /// The session's container (or service) name is held by another.
    NameTaken,
    /// The image is not there, and the pull policy does not fetch it.
    ImageMissing,
    /// The engine refused the request as malformed (400), or the backend refuses what it
    /// cannot do safely (a protection no node gives).
    Refused,
    /// The engine refused the operation (403: a read-only file system or mount).
    Forbidden,
    /// The object is in the wrong state (409: not running, removal in progress).
    Conflict,
    /// The backend cannot do this here (a swarm node whose engine is not configured).
    Unsupported,
    /// Anything else.
    Other,
}

/// A backend's failure.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct BackendError {
    kind: ErrorKind,
    message: String,
    #[source]
    source: Option<Box<dyn StdError + Send + Sync>>,
}

pub type Result<T, E = BackendError> = std::result::Result<T, E>;

impl BackendError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// A failed engine call: the kind from the answer's status (no answer: `Unavailable`).
    pub fn engine(op: &'static str, e: BollardError) -> Self {
        let kind = match status_of(&e) {
            None if is_answer(&e) => ErrorKind::Other,
            None => ErrorKind::Unavailable,
            Some(404) => ErrorKind::NotFound,
            Some(409) => ErrorKind::Conflict,
            Some(403) => ErrorKind::Forbidden,
            Some(400) => ErrorKind::Refused,
            Some(_) => ErrorKind::Other,
        };
        let message = if kind == ErrorKind::Unavailable {
            format!("docker engine unavailable: {op} failed: {e}")
        } else {
            format!("docker {op} failed: {e}")
        };
        Self {
            kind,
            message,
            source: Some(Box::new(e)),
        }
    }

    /// `engine(op, _)` as a closure, for `map_err`.
    pub fn from_engine(op: &'static str) -> impl FnOnce(BollardError) -> Self {
        move |e| Self::engine(op, e)
    }

    /// The same failure as another kind (a 409 on create means the name is taken).
    pub fn with_kind(mut self, kind: ErrorKind) -> Self {
        self.kind = kind;
        self
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The engine did not answer: the connection may be gone (the supervisor reconnects).
    pub fn unavailable(&self) -> bool {
        self.kind == ErrorKind::Unavailable
    }

    /// The session's container (or service) name is held by another.
    pub fn name_taken(&self) -> bool {
        self.kind == ErrorKind::NameTaken
    }

    /// The engine's own words, when it answered (the data plane shows them to its caller).
    pub fn engine_message(&self) -> Option<&str> {
        let e = self.source.as_ref()?.downcast_ref::<BollardError>()?;
        match e {
            BollardError::DockerResponseServerError { message, .. } => Some(message),
            _ => None,
        }
    }
}

/// The HTTP status of an engine answer (`None`: no answer, or not an HTTP error).
pub fn status_of(e: &BollardError) -> Option<u16> {
    match e {
        BollardError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// The engine answered, but not as its API says (a body that does not parse).
fn is_answer(e: &BollardError) -> bool {
    matches!(
        e,
        BollardError::JsonDataError { .. } | BollardError::JsonSerdeError { .. }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status_code: u16) -> BollardError {
        BollardError::DockerResponseServerError {
            status_code,
            message: "whatever the engine says".into(),
        }
    }

    #[test]
    fn kinds_come_from_the_status_never_the_text() {
        let kind = |s| BackendError::engine("op", answer(s)).kind();
        assert_eq!(kind(404), ErrorKind::NotFound);
        assert_eq!(kind(409), ErrorKind::Conflict);
        assert_eq!(kind(403), ErrorKind::Forbidden);
        assert_eq!(kind(400), ErrorKind::Refused);
        assert_eq!(kind(500), ErrorKind::Other);
        let lost = BackendError::engine("list", BollardError::RequestTimeoutError);
        assert!(lost.unavailable());
        assert!(lost.to_string().starts_with("docker engine unavailable"));
    }

    #[test]
    fn the_engine_message_is_kept_for_callers() {
        let e = BackendError::engine("get_archive", answer(404));
        assert_eq!(e.engine_message(), Some("whatever the engine says"));
        assert_eq!(
            BackendError::new(ErrorKind::Other, "x").engine_message(),
            None
        );
    }
}
