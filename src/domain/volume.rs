//! Which host directories a client may have bind-mounted read-write into a sandbox.
//!
//! A request volume is resolved to its canonical path (symlinks and `..` gone) and then:
//! - refused if it is, lies under or contains a system location (`/etc`, `/proc`, `/sys`,
//!   `/dev`, `/boot`, `/usr`, `/lib*`, `/bin`, `/sbin`, `/run`, `/var/run`, `/var/lib/docker`,
//!   `/var/lib/containerd`, `/var/spool`, `/root`) — so `/var` and `/var/lib` are refused too;
//! - refused if it is or contains a directory holding sandboxd's own state (its database and
//!   config directories, the Docker socket's directory) — `/` and `/var` are refused this way;
//! - refused if it is, contains or lies under a sandbox directory (the chats root, which holds
//!   every other chat; the dependencies and tools directories, which are mounted read-only);
//! - when `sandbox.allowed_volume_roots` is set, accepted only under one of those roots
//!   (compared by path components, so `/data` does not admit `/database`).
//!
//! The same check runs again right before the container is created, so a directory swapped for
//! a symlink after the request was accepted is caught.

use std::path::{Component, Path, PathBuf};

use super::request::InvalidInput;

/// Top-level system locations: a volume may be none of these nor lie under them.
const SYSTEM_PREFIXES: &[&str] = &[
    "/etc",
    "/proc",
    "/sys",
    "/dev",
    "/boot",
    "/usr",
    "/bin",
    "/sbin",
    "/run",
    "/var/run",
    "/var/lib/docker",
    "/var/lib/containerd",
    "/var/spool",
    "/root",
    "/snap",
];

#[derive(Debug, Clone, Default)]
pub struct VolumePolicy {
    /// `None`: any directory that passes the other checks (old configs; a warning at start).
    pub allowed_roots: Option<Vec<PathBuf>>,
    /// Directories holding sandboxd's own state: a volume may not be or contain any of them.
    pub sensitive: Vec<PathBuf>,
    /// Sandbox directories: a volume may not be, contain or lie under any of them.
    pub protected: Vec<PathBuf>,
}

impl VolumePolicy {
    /// Canonicalises `raw` and applies the policy.
    pub fn check(&self, raw: &str) -> Result<PathBuf, InvalidInput> {
        if raw.contains('\0') {
            return Err(InvalidInput::Volume("contains a NUL byte"));
        }
        let path = Path::new(raw);
        if !path.is_absolute() {
            return Err(InvalidInput::Volume("must be an absolute path"));
        }
        let canonical = std::fs::canonicalize(path)
            .map_err(|_| InvalidInput::Volume("does not exist on the host"))?;
        if !canonical.is_dir() {
            return Err(InvalidInput::Volume("is not a directory"));
        }
        self.check_canonical(&canonical)?;
        Ok(canonical)
    }

    /// The policy on an already canonical path (pure: no file-system access).
    pub fn check_canonical(&self, canonical: &Path) -> Result<(), InvalidInput> {
        let text = canonical
            .to_str()
            .ok_or(InvalidInput::Volume("is not UTF-8"))?;
        if text.contains(':') || text.contains(',') {
            // Docker's mount syntax cannot carry these unambiguously.
            return Err(InvalidInput::Volume("contains `:` or `,`"));
        }
        if canonical
            .components()
            .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
        {
            return Err(InvalidInput::Volume("is not canonical"));
        }
        if canonical == Path::new("/") {
            return Err(InvalidInput::Volume("is a protected system location"));
        }
        let is_lib = canonical
            .components()
            .nth(1)
            .and_then(|c| c.as_os_str().to_str())
            .is_some_and(|first| first.starts_with("lib"));
        // Under a system location, or above one (`/var` holds `/var/lib/docker`).
        let system = SYSTEM_PREFIXES
            .iter()
            .any(|p| canonical.starts_with(p) || Path::new(p).starts_with(canonical));
        if is_lib || system {
            return Err(InvalidInput::Volume("is a protected system location"));
        }
        if self.sensitive.iter().any(|p| p.starts_with(canonical)) {
            return Err(InvalidInput::Volume(
                "contains sandboxd's own state (its database, config or the Docker socket)",
            ));
        }
        if self
            .protected
            .iter()
            .any(|p| canonical.starts_with(p) || p.starts_with(canonical))
        {
            return Err(InvalidInput::Volume(
                "overlaps a sandbox directory (chats root, dependencies or tools)",
            ));
        }
        if let Some(roots) = &self.allowed_roots {
            if !roots.iter().any(|r| canonical.starts_with(r)) {
                return Err(InvalidInput::Volume(
                    "is outside sandbox.allowed_volume_roots",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy() -> VolumePolicy {
        VolumePolicy {
            allowed_roots: Some(vec!["/data".into(), "/srv/volumes".into()]),
            sensitive: vec!["/srv/sandboxd/db".into()],
            protected: vec!["/srv/volumes/chats".into()],
        }
    }

    #[test]
    fn system_locations_are_refused_always() {
        let open = VolumePolicy::default();
        for p in [
            "/",
            "/etc",
            "/etc/ssh",
            "/proc",
            "/proc/self/root",
            "/sys",
            "/dev",
            "/boot",
            "/usr",
            "/usr/lib",
            "/lib",
            "/lib64",
            "/run",
            "/var/run",
            "/var/run/docker.sock",
            "/var/lib/docker/volumes",
            "/root",
            "/var",
            "/var/lib",
            "/var/spool/cron",
        ] {
            assert!(open.check_canonical(Path::new(p)).is_err(), "{p} accepted");
        }
        assert!(open.check_canonical(Path::new("/home/user/work")).is_ok());
        assert!(open
            .check_canonical(Path::new("/var/lib/sandboxd/volumes"))
            .is_ok());
        assert!(open.check_canonical(Path::new("/srv")).is_ok());
        assert!(
            open.check_canonical(Path::new("/library")).is_err(),
            "/lib* is refused"
        );
    }

    #[test]
    fn protected_locations_refused_as_ancestor_equal_or_descendant() {
        let _ = policy();
        let open = VolumePolicy {
            allowed_roots: None,
            ..policy()
        };
        for bad in [
            "/srv",
            "/srv/sandboxd",
            "/srv/sandboxd/db",
            "/srv/volumes",
            "/srv/volumes/chats",
            "/srv/volumes/chats/1",
        ] {
            assert!(
                open.check_canonical(Path::new(bad)).is_err(),
                "{bad} accepted"
            );
        }
        // Beside or below the database directory is fine: the database is not in it.
        assert!(open
            .check_canonical(Path::new("/srv/sandboxd/db/volumes"))
            .is_ok());
        assert!(open
            .check_canonical(Path::new("/srv/sandboxd/other"))
            .is_ok());
    }

    #[test]
    fn allowed_roots_are_separator_aware() {
        let p = policy();
        assert!(p.check_canonical(Path::new("/data")).is_ok());
        assert!(p.check_canonical(Path::new("/data/chat-1")).is_ok());
        assert!(p.check_canonical(Path::new("/srv/volumes/a")).is_ok());
        assert!(p.check_canonical(Path::new("/database")).is_err());
        assert!(p.check_canonical(Path::new("/dat")).is_err());
        assert!(p.check_canonical(Path::new("/home/x")).is_err());
    }

    #[test]
    fn symlinks_are_judged_by_their_target() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let allowed = root.join("allowed");
        std::fs::create_dir_all(&allowed).unwrap();
        let outside = root.join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, allowed.join("escape")).unwrap();
        std::os::unix::fs::symlink("/etc", allowed.join("etc")).unwrap();
        let p = VolumePolicy {
            allowed_roots: Some(vec![allowed.clone()]),
            ..Default::default()
        };
        assert!(p.check(allowed.join("escape").to_str().unwrap()).is_err());
        assert!(p.check(allowed.join("etc").to_str().unwrap()).is_err());
        assert!(p
            .check(&format!("{}/../outside", allowed.display()))
            .is_err());
        assert_eq!(p.check(allowed.to_str().unwrap()).unwrap(), allowed);
        assert!(p.check("%2e%2e/etc").is_err());
    }

    proptest! {
        #[test]
        fn never_panics(s in ".*") {
            let _ = policy().check(&s);
            let _ = policy().check_canonical(Path::new(&s));
        }
    }
}
