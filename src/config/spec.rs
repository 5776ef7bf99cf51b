//! The config's side of a session's spec: a new session's [`ContainerSpec`] is resolved from
//! the settings here, once, and stored; `domain` owns the stored form and knows no settings.

use std::path::Path;

use super::{HardeningSettings, SandboxSettings};
use crate::domain::spec::{
    chat_dir, ContainerSpec, Hardening, MountKind, MountSpec, ProfileSpec, SPEC_VERSION,
};
use crate::domain::ChatId;

/// A stored spec without a `hardening` (or one of its fields) reads the settings' defaults.
impl Default for Hardening {
    fn default() -> Self {
        Self::from(&HardeningSettings::default())
    }
}

impl From<&HardeningSettings> for Hardening {
    fn from(h: &HardeningSettings) -> Self {
        Self {
            cap_add: h.cap_add.clone(),
            no_new_privileges: h.no_new_privileges,
            pids_limit: h.pids_limit,
            memory_mb: h.memory_mb,
            cpu_millis: h.cpu_millis,
            read_only_rootfs: h.read_only_rootfs,
            tmpfs_tmp_mb: h.tmpfs_tmp_mb,
            user: h.user.clone(),
        }
    }
}

/// Resolves the container spec for a new session. `settings` paths must already be absolute
/// (the app canonicalises them at start).
pub fn resolve(
    settings: &SandboxSettings,
    chat_id: ChatId,
    agent_id: &str,
    volume_host_path: &Path,
    profile: Option<&str>,
) -> ContainerSpec {
    // Callers check a requested name; the default exists (config validation).
    let name = profile.unwrap_or(&settings.default_profile);
    let chosen = settings.profiles.get(name);
    let mut env = settings.env.clone();
    env.insert("AGENT_ID".into(), agent_id.to_string());
    let path = |p: &Path| p.display().to_string();
    ContainerSpec {
        version: SPEC_VERSION,
        image: settings.image.clone(),
        network: chosen
            .and_then(|p| p.network.clone())
            .unwrap_or_else(|| settings.network_name.clone()),
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
        hardening: Hardening::from(
            chosen
                .and_then(|p| p.hardening.as_ref())
                .unwrap_or(&settings.hardening),
        ),
        profile: chosen.map(|p| ProfileSpec {
            name: name.to_string(),
            runtime: p.runtime.clone(),
            egress: crate::domain::egress::EgressPolicy {
                egress: p.egress,
                allow_cidrs: p.allow_cidrs.clone(),
                deny_cidrs: p.deny_cidrs.clone(),
            },
        }),
        publish_host_ip: settings
            .publish_agent_port
            .then(|| settings.publish_host_ip.clone()),
    }
}

/// Specs for other modules' unit tests.
#[cfg(test)]
pub mod tests_support {
    use super::*;

    /// The default spec of a chat, under a profile with this runtime and egress.
    pub fn spec_with_profile(
        runtime: &str,
        egress: crate::domain::egress::EgressMode,
        deny_cidrs: &[&str],
    ) -> ContainerSpec {
        let mut s = SandboxSettings::default();
        let profile = s
            .profiles
            .get_mut(crate::config::STANDARD_PROFILE)
            .expect("the built-in profile");
        profile.runtime = runtime.into();
        profile.egress = egress;
        profile.deny_cidrs = deny_cidrs.iter().map(|c| c.to_string()).collect();
        let chat: ChatId = "11111111-2222-3333-4444-555555555555"
            .parse()
            .expect("a uuid");
        resolve(&s, chat, "agent-1", Path::new("/data/vol"), None)
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
        let spec = resolve(&s, chat, "agent-1", Path::new("/data/vol"), None);
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
            resolve(&s, chat, "agent-1", Path::new("/data/vol"), None).hash()
        );
        assert_ne!(
            spec.hash(),
            resolve(&s, chat, "agent-2", Path::new("/data/vol"), None).hash()
        );
    }
}
