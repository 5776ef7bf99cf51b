//! Response bodies. The compatibility shapes match the old service field for field.

use serde::Serialize;
use utoipa::ToSchema;

use crate::domain::hibernation::SandboxState;
use crate::domain::{format_time, Endpoint, Phase};
use crate::store::SandboxRow;

/// `POST /api/v1/create` success body (old contract).
#[derive(Debug, Serialize, ToSchema)]
pub struct SessionResponse {
    pub session_id: String,
    pub chat_id: String,
    pub agent_id: String,
    pub volume_host_path: String,
    pub container_id: String,
    pub endpoint: Endpoint,
    /// Always `running`.
    #[schema(value_type = String)]
    pub status: &'static str,
    pub expires_at: String,
}

impl SessionResponse {
    /// Only for rows in phase `running`, which always carry a container and endpoint.
    pub fn from_running(row: &SandboxRow) -> Option<Self> {
        Some(Self {
            session_id: row.session_id.to_string(),
            chat_id: row.chat_id.to_string(),
            agent_id: row.agent_id.clone(),
            volume_host_path: row.volume_host_path.clone(),
            container_id: row.container_id.clone()?,
            endpoint: Endpoint {
                ip: row.endpoint_ip.clone()?,
                port: row.endpoint_port?,
            },
            status: "running",
            expires_at: format_time(row.expires_at),
        })
    }
}

/// `DELETE /api/v1/sandboxes/{chat_id}` body (old contract).
#[derive(Debug, Serialize, ToSchema)]
pub struct DeleteResponse {
    /// The canonical chat id.
    pub chat_id: String,
    /// `deleted` or `not_found`.
    #[schema(value_type = String)]
    pub result: &'static str,
    pub session_id: Option<String>,
    pub container_id: Option<String>,
}

/// `{"detail": ...}`: every error body.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub detail: String,
}

/// The declarative view: desired spec and observed status together.
#[derive(Debug, Serialize, ToSchema)]
pub struct SandboxView {
    pub chat_id: String,
    pub session_id: String,
    pub generation: i64,
    pub agent_id: String,
    pub volume_host_path: String,
    /// The declared state: `running`, `paused` or `hibernated` (`docs/hibernation.md`).
    pub state: SandboxState,
    /// The idle clock: the last create/reuse, exec, file call, renew or resume.
    pub last_active_at: String,
    pub phase: Phase,
    pub container_id: Option<String>,
    pub endpoint: Option<Endpoint>,
    /// The network the container is on, where the endpoint's address is: the profile's, or
    /// a further one of its settings (`sandbox-1`, …) once that was full
    /// (`sandbox.network_capacity`). Clients reaching sandboxes by address join each.
    pub network: Option<String>,
    /// The agent port's published host port (on `sandbox.publish_host_ip`), when
    /// `sandbox.publish_agent_port` is on; absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_port: Option<u16>,
    pub created_at: String,
    pub updated_at: String,
    pub expires_at: String,
    pub deleted_at: Option<String>,
    /// Failures in a row: failed starts, or quick exits of a crash-looping container.
    pub attempts: u32,
    /// Quick exits in a row of the session's container; restarts wait a growing backoff.
    pub restarts: u32,
    pub last_error: Option<String>,
    pub next_attempt_at: Option<String>,
    pub running_since: Option<String>,
    pub spec_hash: String,
    /// True when the observed status describes the current session.
    pub converged: bool,
    /// The isolation profile and its effective egress rules (one sandbox's view only; lists
    /// leave it out).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<ProfileView>,
}

/// A session's isolation profile as frozen in its spec.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProfileView {
    pub name: String,
    /// `runc`, `runsc` (gVisor), …
    pub runtime: String,
    /// `allow` or `deny`.
    pub egress: String,
    pub allow_cidrs: Vec<String>,
    pub deny_cidrs: Vec<String>,
    /// The rules in force, in order, in words.
    pub rules: Vec<String>,
}

impl SandboxView {
    /// The view with the session's profile (reads the frozen spec).
    pub fn detailed(r: &SandboxRow) -> Self {
        let mut view = Self::from(r);
        view.profile = crate::domain::spec::ContainerSpec::from_json(&r.spec_json)
            .ok()
            .and_then(|s| s.profile)
            .map(|p| ProfileView {
                rules: if p.egress.needs_rules() {
                    p.egress.describe()
                } else {
                    vec!["everything: accept (no rules)".into()]
                },
                egress: match p.egress.egress {
                    crate::egress::EgressMode::Allow => "allow".into(),
                    crate::egress::EgressMode::Deny => "deny".into(),
                },
                allow_cidrs: p.egress.allow_cidrs,
                deny_cidrs: p.egress.deny_cidrs,
                runtime: p.runtime,
                name: p.name,
            });
        view
    }
}

impl From<&SandboxRow> for SandboxView {
    fn from(r: &SandboxRow) -> Self {
        let endpoint = match (&r.endpoint_ip, r.endpoint_port) {
            (Some(ip), Some(port)) => Some(Endpoint {
                ip: ip.clone(),
                port,
            }),
            _ => None,
        };
        Self {
            chat_id: r.chat_id.to_string(),
            session_id: r.session_id.to_string(),
            generation: r.generation,
            agent_id: r.agent_id.clone(),
            volume_host_path: r.volume_host_path.clone(),
            state: r.desired_state,
            last_active_at: format_time(r.last_active_at),
            phase: r.phase,
            container_id: r.container_id.clone(),
            endpoint,
            network: r.network.clone(),
            host_port: r.host_port,
            created_at: format_time(r.created_at),
            updated_at: format_time(r.updated_at),
            expires_at: format_time(r.expires_at),
            deleted_at: r.deleted_at.map(format_time),
            attempts: r.attempts,
            restarts: r.restarts,
            last_error: r.last_error.clone(),
            next_attempt_at: r.next_attempt_at.map(format_time),
            running_since: r.running_since.map(format_time),
            spec_hash: r.spec_hash.clone(),
            converged: match (r.phase, r.desired_state) {
                (Phase::Expired, _) => true,
                (Phase::Running, SandboxState::Running) | (Phase::Paused, SandboxState::Paused) => {
                    r.observed_generation == r.generation
                }
                (Phase::Hibernated, SandboxState::Hibernated) => r.endpoint_ip.is_none(),
                _ => false,
            },
            profile: None,
        }
    }
}

/// One problem with the input, as the old (FastAPI/pydantic) server reported it.
#[derive(Debug, Serialize, ToSchema)]
pub struct ValidationProblem {
    /// `missing`, `string_type`, `uuid_parsing`, `value_error`, `json_invalid`, …
    #[serde(rename = "type")]
    pub kind: String,
    /// Where: `["body", "chat_id"]`, `["path", "chat_id"]`, `["query", "limit"]`, …
    #[schema(value_type = Vec<serde_json::Value>)]
    pub loc: Vec<serde_json::Value>,
    pub msg: String,
    /// The offending value, any JSON (the whole body for a missing field).
    pub input: serde_json::Value,
}

/// `422 {"detail": [...]}`: every problem with the request at once.
#[derive(Debug, Serialize, ToSchema)]
pub struct ValidationErrorBody {
    pub detail: Vec<ValidationProblem>,
}
