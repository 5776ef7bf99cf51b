//! The container spec of a session: resolved once from the config when the session is created,
//! stored in its row, and never recomputed, so a config change only affects new sessions.
//!
//! The stored form is owned here, not by `config`, and versioned: a config key can be renamed
//! or added without making stored rows unreadable. Reading tolerates unknown fields and fills
//! missing ones with defaults; a spec from a newer sandboxd is refused by name.
//! `tests/fixtures/spec-v1.json` is a spec exactly as release 1 wrote it; a unit test reads it.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::ChatId;

/// The version this sandboxd writes. Release 1 wrote no version field: a missing one is 1.
pub const SPEC_VERSION: u32 = 1;

fn version_one() -> u32 {
    1
}

/// A stored spec that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("unreadable spec: {0}")]
    Json(#[from] serde_json::Error),
    #[error("spec version {0} is newer than this sandboxd understands ({SPEC_VERSION})")]
    TooNew(u32),
}

/// What a bind mount is for; decides how its host side is prepared and checked at create time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MountKind {
    /// `chats_root/<chat_id>`, created on demand.
    Chat,
    /// The client's volume, re-checked against the volume policy.
    Volume,
    Dependencies,
    Tools,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountSpec {
    pub kind: MountKind,
    pub source: String,
    pub target: String,
    pub read_only: bool,
}

/// Container hardening as stored with a session (the config's `sandbox.hardening` at the
/// time). Missing fields read as the strict defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Hardening {
    pub cap_add: Vec<String>,
    pub no_new_privileges: bool,
    pub pids_limit: i64,
    pub memory_mb: u64,
    pub cpu_millis: u64,
    pub read_only_rootfs: bool,
    pub tmpfs_tmp_mb: u64,
    pub user: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerSpec {
    /// The stored form's version ([`SPEC_VERSION`]).
    #[serde(default = "version_one")]
    pub version: u32,
    pub image: String,
    pub network: String,
    pub agent_port: u16,
    /// Sorted, so the JSON (and hash) is stable.
    pub env: BTreeMap<String, String>,
    pub mounts: Vec<MountSpec>,
    #[serde(default)]
    pub hardening: Hardening,
    /// The host address the agent port is published on (at an ephemeral port), when
    /// `sandbox.publish_agent_port` was on. Absent otherwise, so older specs hash the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish_host_ip: Option<String>,
    /// The isolation profile the session runs under (absent in specs from before profiles:
    /// those ran under runc without egress rules).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<ProfileSpec>,
}

/// A profile as frozen with a session: its name, runtime and egress policy (its hardening is
/// the spec's `hardening`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileSpec {
    pub name: String,
    pub runtime: String,
    pub egress: super::egress::EgressPolicy,
}

impl ContainerSpec {
    /// The runtime to run under (`None`: the engine's default).
    pub fn runtime(&self) -> Option<&str> {
        self.profile.as_ref().map(|p| p.runtime.as_str())
    }

    /// The egress policy, when it needs host rules.
    pub fn egress_rules(&self) -> Option<&super::egress::EgressPolicy> {
        self.profile
            .as_ref()
            .map(|p| &p.egress)
            .filter(|e| e.needs_rules())
    }
}

impl ContainerSpec {
    /// Reads a stored spec: any version up to [`SPEC_VERSION`], unknown fields ignored.
    pub fn from_json(text: &str) -> Result<Self, SpecError> {
        let spec: Self = serde_json::from_str(text)?;
        if spec.version > SPEC_VERSION {
            return Err(SpecError::TooNew(spec.version));
        }
        Ok(spec)
    }

    /// Canonical JSON: field order is fixed by the struct, maps are sorted.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// sha256 of the canonical JSON, hex; carried as a label to detect drift.
    pub fn hash(&self) -> String {
        hex::encode(Sha256::digest(self.to_json().as_bytes()))
    }
}

/// The per-chat directory: `chats_root/<chat_id>`. A canonical UUID has no separators, so the
/// result always stays inside the root.
pub fn chat_dir(chats_root: &Path, chat_id: ChatId) -> std::path::PathBuf {
    chats_root.join(chat_id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A spec as release 1 stored it (no version field, hardening as the config had it) must
    /// stay readable, whatever the config types become.
    #[test]
    fn a_spec_stored_by_release_1_is_read() {
        let text = include_str!("../../tests/fixtures/spec-v1.json");
        let spec = ContainerSpec::from_json(text).expect("release 1 spec");
        assert_eq!(spec.version, 1);
        assert_eq!(spec.image, "sandboxd/agent-busybox:latest");
        assert_eq!(spec.agent_port, 8000);
        assert_eq!(spec.env["AGENT_ID"], "agent-1");
        assert_eq!(spec.mounts.len(), 4);
        assert_eq!(spec.mounts[1].kind, MountKind::Volume);
        assert_eq!(spec.hardening.cap_add, ["NET_BIND_SERVICE"]);
        assert_eq!(spec.hardening.pids_limit, 512);
        // Written again, it keeps every value (now with its version).
        let again = ContainerSpec::from_json(&spec.to_json()).unwrap();
        assert_eq!(again, spec);
    }

    #[test]
    fn unknown_fields_are_tolerated_and_newer_versions_refused() {
        let text = include_str!("../../tests/fixtures/spec-v1.json");
        let mut v: serde_json::Value = serde_json::from_str(text).unwrap();
        v["hardening"]["renamed_key"] = serde_json::json!(true);
        v["hardening"]
            .as_object_mut()
            .unwrap()
            .remove("tmpfs_tmp_mb");
        v["future_field"] = serde_json::json!({"x": 1});
        let spec = ContainerSpec::from_json(&v.to_string()).expect("tolerant");
        assert_eq!(
            spec.hardening.tmpfs_tmp_mb,
            Hardening::default().tmpfs_tmp_mb
        );
        v["version"] = serde_json::json!(SPEC_VERSION + 1);
        assert!(matches!(
            ContainerSpec::from_json(&v.to_string()),
            Err(SpecError::TooNew(_))
        ));
    }
}
