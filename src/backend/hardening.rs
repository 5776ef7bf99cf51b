//! The one translation of a session's [`Hardening`] into what an engine enforces. A
//! container body (docker, podman) and a service body (swarm) both take it from here, so a
//! new hardening field is added once: [`Translated::of`] destructures `Hardening` without
//! `..`, and adding a field there fails to compile until it is carried; the tests below fail
//! if a carried field is left out of either body.

use std::collections::HashMap;

use bollard::models::{
    HostConfig, Limit, Mount, MountTmpfsOptions, MountType, ResourcesUlimits, TaskSpecContainerSpec,
};

use crate::domain::spec::Hardening;

/// The mode of the `/tmp` tmpfs a read-only root file system gets.
const TMP_MODE: i64 = 0o1777;

/// A session's hardening, in the engine's units.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Translated {
    /// `uid[:gid]` or a name; `None` keeps the image's user.
    pub user: Option<String>,
    /// Always every capability; `cap_add` gives some back.
    pub cap_drop: Vec<String>,
    pub cap_add: Vec<String>,
    pub no_new_privileges: bool,
    pub pids_limit: i64,
    pub memory_bytes: Option<i64>,
    pub nano_cpus: Option<i64>,
    pub read_only_rootfs: bool,
    /// With a read-only root: `/tmp` as a tmpfs of this many MiB.
    pub tmp_mb: Option<u64>,
}

impl Translated {
    pub fn of(h: &Hardening) -> Self {
        // No `..`: a new field must be decided on here.
        let Hardening {
            cap_add,
            no_new_privileges,
            pids_limit,
            memory_mb,
            cpu_millis,
            read_only_rootfs,
            tmpfs_tmp_mb,
            user,
        } = h;
        Self {
            user: user.clone(),
            cap_drop: vec!["ALL".into()],
            cap_add: cap_add.clone(),
            no_new_privileges: *no_new_privileges,
            pids_limit: *pids_limit,
            memory_bytes: i64::try_from(memory_mb.saturating_mul(1024 * 1024)).ok(),
            nano_cpus: i64::try_from(cpu_millis.saturating_mul(1_000_000)).ok(),
            read_only_rootfs: *read_only_rootfs,
            tmp_mb: read_only_rootfs.then_some(*tmpfs_tmp_mb),
        }
    }

    /// The container's host config: these protections on top of `base` (mounts, network,
    /// runtime, ports), with `ulimits` where the backend must set them.
    pub fn host_config(&self, base: HostConfig, ulimits: &[(String, i64)]) -> HostConfig {
        HostConfig {
            privileged: Some(false),
            cap_drop: Some(self.cap_drop.clone()),
            cap_add: Some(self.cap_add.clone()),
            // The engine's default seccomp profile stays in force: it is never overridden.
            security_opt: self
                .no_new_privileges
                .then(|| vec!["no-new-privileges:true".to_string()]),
            pids_limit: Some(self.pids_limit),
            memory: self.memory_bytes,
            nano_cpus: self.nano_cpus,
            readonly_rootfs: Some(self.read_only_rootfs),
            tmpfs: self.tmp_mb.map(|mb| {
                HashMap::from([(
                    "/tmp".to_string(),
                    format!("rw,nosuid,nodev,size={mb}m,mode={TMP_MODE:o}"),
                )])
            }),
            ulimits: (!ulimits.is_empty()).then(|| {
                ulimits
                    .iter()
                    .map(|(name, limit)| ResourcesUlimits {
                        name: Some(name.clone()),
                        soft: Some(*limit),
                        hard: Some(*limit),
                    })
                    .collect()
            }),
            ..base
        }
    }

    /// A service's container: these protections on top of `base` (image, env, labels,
    /// mounts). No-new-privileges is not here: at API 1.41 the engine ignores
    /// `privileges.no_new_privileges` silently, so placement puts such sandboxes on nodes
    /// whose engine enforces it (`swarm/placement.rs`).
    pub fn task_container(&self, base: TaskSpecContainerSpec) -> TaskSpecContainerSpec {
        let mut mounts = base.mounts.unwrap_or_default();
        if let Some(mb) = self.tmp_mb {
            mounts.push(Mount {
                target: Some("/tmp".into()),
                typ: Some(MountType::TMPFS),
                tmpfs_options: Some(MountTmpfsOptions {
                    size_bytes: i64::try_from(mb.saturating_mul(1024 * 1024)).ok(),
                    mode: Some(TMP_MODE),
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
        TaskSpecContainerSpec {
            user: self.user.clone(),
            read_only: Some(self.read_only_rootfs),
            mounts: Some(mounts),
            capability_drop: Some(self.cap_drop.clone()),
            capability_add: Some(self.cap_add.clone()),
            ..base
        }
    }

    /// A service's resource limits.
    pub fn task_limits(&self) -> Limit {
        Limit {
            nano_cpus: self.nano_cpus,
            memory_bytes: self.memory_bytes,
            pids: Some(self.pids_limit),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every field away from its default, so a body that drops one shows it.
    fn unusual() -> Hardening {
        Hardening {
            cap_add: vec!["NET_BIND_SERVICE".into()],
            no_new_privileges: true,
            pids_limit: 77,
            memory_mb: 33,
            cpu_millis: 250,
            read_only_rootfs: true,
            tmpfs_tmp_mb: 9,
            user: Some("1234:1234".into()),
        }
    }

    #[test]
    fn every_field_reaches_a_container_body() {
        let t = Translated::of(&unusual());
        let hc = t.host_config(HostConfig::default(), &[]);
        assert_eq!(hc.cap_drop.as_deref(), Some(&["ALL".to_string()][..]));
        assert_eq!(hc.cap_add, Some(vec!["NET_BIND_SERVICE".to_string()]));
        assert_eq!(
            hc.security_opt,
            Some(vec!["no-new-privileges:true".to_string()])
        );
        assert_eq!(hc.pids_limit, Some(77));
        assert_eq!(hc.memory, Some(33 * 1024 * 1024));
        assert_eq!(hc.nano_cpus, Some(250_000_000));
        assert_eq!(hc.readonly_rootfs, Some(true));
        assert!(hc.tmpfs.unwrap()["/tmp"].contains("size=9m"));
        assert_eq!(hc.privileged, Some(false));
        // The user is the body's, not the host config's: carried by the backends' bodies,
        // checked in their tests; here it is at least translated.
        assert_eq!(t.user.as_deref(), Some("1234:1234"));
    }

    #[test]
    fn every_field_reaches_a_service_body() {
        let t = Translated::of(&unusual());
        let c = t.task_container(TaskSpecContainerSpec::default());
        let limits = t.task_limits();
        assert_eq!(c.user.as_deref(), Some("1234:1234"));
        assert_eq!(c.capability_drop, Some(vec!["ALL".to_string()]));
        assert_eq!(c.capability_add, Some(vec!["NET_BIND_SERVICE".to_string()]));
        assert_eq!(c.read_only, Some(true));
        let tmp = c.mounts.unwrap();
        let tmp = tmp.iter().find(|m| m.target.as_deref() == Some("/tmp"));
        assert_eq!(
            tmp.and_then(|m| m.tmpfs_options.as_ref())
                .and_then(|o| o.size_bytes),
            Some(9 * 1024 * 1024)
        );
        assert_eq!(limits.pids, Some(77));
        assert_eq!(limits.memory_bytes, Some(33 * 1024 * 1024));
        assert_eq!(limits.nano_cpus, Some(250_000_000));
        // no_new_privileges is enforced by placement in swarm mode (see `task_container`).
        assert!(t.no_new_privileges);
    }

    #[test]
    fn a_writable_root_gets_no_tmpfs_and_the_defaults_stay_strict() {
        let t = Translated::of(&Hardening::default());
        assert_eq!(t.tmp_mb, None);
        let hc = t.host_config(HostConfig::default(), &[("nofile".into(), 1024)]);
        assert!(hc.tmpfs.is_none());
        assert!(t.no_new_privileges);
        let u = &hc.ulimits.unwrap()[0];
        assert_eq!(
            (u.name.as_deref(), u.soft, u.hard),
            (Some("nofile"), Some(1024), Some(1024))
        );
    }
}
