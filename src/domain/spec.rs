//! The container spec of a session: resolved once from the config when the session is created,
//! stored in its row, and never recomputed, so a config change only affects new sessions.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::ChatId;
use crate::config::{HardeningSettings, SandboxSettings};

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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerSpec {
    pub image: String,
    pub network: String,
    pub agent_port: u16,
    /// Sorted, so the JSON (and hash) is stable.
    pub env: BTreeMap<String, String>,
    pub mounts: Vec<MountSpec>,
    pub hardening: HardeningSettings,
}

impl ContainerSpec {
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

/// Resolves the container spec for a new session. `settings` paths must already be absolute
/// (the app canonicalises them at start).
pub fn resolve(
    settings: &SandboxSettings,
    chat_id: ChatId,
    agent_id: &str,
    volume_host_path: &Path,
) -> ContainerSpec {
    let mut env = settings.env.clone();
    env.insert("AGENT_ID".into(), agent_id.to_string());
    let path = |p: &Path| p.display().to_string();
    ContainerSpec {
        image: settings.image.clone(),
        network: settings.network_name.clone(),
        agent_port: settings.agent_service_port,
        env,
        mounts: vec![
            MountSpec {
                kind: MountKind::Chat,
                source: path(&chat_dir(&settings.chats_root, chat_id)),
                target: settings.chat_mount_path.clone(),
                read_only: false,
            },
            MountSpec {
                kind: MountKind::Volume,
                source: path(volume_host_path),
                target: settings.volume_mount_path.clone(),
                read_only: false,
            },
            MountSpec {
                kind: MountKind::Dependencies,
                source: path(&settings.dependencies_host_path),
                target: settings.dependencies_mount_path.clone(),
                read_only: true,
            },
            MountSpec {
                kind: MountKind::Tools,
                source: path(&settings.lambda_tools_host_path),
                target: settings.lambda_tools_mount_path.clone(),
                read_only: true,
            },
        ],
        hardening: settings.hardening.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_has_four_mounts_and_agent_env_and_a_stable_hash() {
        let mut s = SandboxSettings {
            chats_root: "/srv/chats".into(),
            ..Default::default()
        };
        s.env.insert("B".into(), "2".into());
        s.env.insert("A".into(), "1".into());
        let chat: ChatId = "11111111-2222-3333-4444-555555555555".parse().unwrap();
        let spec = resolve(&s, chat, "agent-1", Path::new("/data/vol"));
        assert_eq!(spec.env["AGENT_ID"], "agent-1");
        assert_eq!(spec.env["A"], "1");
        assert_eq!(
            spec.mounts[0].source,
            "/srv/chats/11111111-2222-3333-4444-555555555555"
        );
        assert_eq!(
            spec.mounts.iter().map(|m| m.read_only).collect::<Vec<_>>(),
            [false, false, true, true]
        );
        assert_eq!(
            spec.hash(),
            resolve(&s, chat, "agent-1", Path::new("/data/vol")).hash()
        );
        assert_ne!(
            spec.hash(),
            resolve(&s, chat, "agent-2", Path::new("/data/vol")).hash()
        );
    }
}
