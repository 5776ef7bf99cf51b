//! Path rules of the file routes (pure). A client path is relative to the sandbox's working
//! directory (the chat mount unless the call names another) or absolute under one of the
//! sandbox's mounts; nothing else in the container is reachable through the data plane.
//! `..`, NUL and over-long paths are refused before any engine call; symlinks are checked
//! afterwards against what the engine resolves them to (`resolved_target`).

use crate::domain::spec::{ContainerSpec, MountSpec};

/// Longest path accepted (Linux's `PATH_MAX`).
pub const MAX_PATH_BYTES: usize = 4096;
/// Longest path component (Linux's `NAME_MAX`).
pub const MAX_NAME_BYTES: usize = 255;

/// Why a path is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path is empty")]
    Empty,
    #[error("path contains a NUL byte")]
    Nul,
    #[error("path is longer than {MAX_PATH_BYTES} bytes")]
    TooLong,
    #[error("a path component is longer than {MAX_NAME_BYTES} bytes")]
    NameTooLong,
    #[error("path contains `..`")]
    DotDot,
    #[error("{0} is not under one of the sandbox's mounts ({1})")]
    OutsideMounts(String, String),
    #[error("{0} is on the read-only mount {1}")]
    ReadOnly(String, String),
    #[error("{0} is a mount point itself, not a file in it")]
    MountRoot(String),
}

impl PathError {
    /// Refused by the rules (422) rather than by a mount's permissions (403).
    pub fn is_invalid_input(&self) -> bool {
        !matches!(self, PathError::ReadOnly(..))
    }
}

/// A checked absolute container path and the mount it lies on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxPath {
    /// Normalised: absolute, no `.`, no empty components, no trailing `/`.
    pub absolute: String,
    /// The mount's container path.
    pub mount: String,
    pub read_only: bool,
}

impl SandboxPath {
    /// The path relative to its mount root (empty for the root itself).
    pub fn within_mount(&self) -> &str {
        self.absolute[self.mount.len()..].trim_start_matches('/')
    }

    /// The parent directory, when it is still on the mount.
    pub fn parent(&self) -> Option<SandboxPath> {
        if self.absolute == self.mount {
            return None;
        }
        let cut = self.absolute.rfind('/')?;
        Some(SandboxPath {
            absolute: if cut == 0 {
                "/".into()
            } else {
                self.absolute[..cut].to_string()
            },
            mount: self.mount.clone(),
            read_only: self.read_only,
        })
    }

    pub fn file_name(&self) -> &str {
        self.absolute.rsplit('/').next().unwrap_or("")
    }
}

/// The mounts a sandbox's paths may use, and its default working directory.
#[derive(Debug, Clone)]
pub struct Mounts {
    mounts: Vec<(String, bool)>,
    workdir: String,
}

impl Mounts {
    /// From a session's frozen spec: its bind mounts, working directory the chat mount.
    pub fn of(spec: &ContainerSpec) -> Self {
        let workdir = spec
            .mounts
            .iter()
            .find(|m| m.kind == crate::domain::spec::MountKind::Chat)
            .or(spec.mounts.first())
            .map_or_else(|| "/".to_string(), |m: &MountSpec| m.target.clone());
        Self {
            mounts: spec
                .mounts
                .iter()
                .map(|m| (normalise_abs(&m.target), m.read_only))
                .collect(),
            workdir: normalise_abs(&workdir),
        }
    }

    pub fn workdir(&self) -> &str {
        &self.workdir
    }

    /// Checks a client path: relative ones are taken from `workdir` (itself checked), or the
    /// default working directory.
    pub fn resolve(&self, raw: &str, workdir: Option<&str>) -> Result<SandboxPath, PathError> {
        let base = match workdir {
            Some(w) => self.resolve(w, None)?.absolute,
            None => self.workdir.clone(),
        };
        syntax(raw)?;
        let joined = if raw.starts_with('/') {
            raw.to_string()
        } else {
            format!("{base}/{raw}")
        };
        self.locate(&normalise_abs(&joined))
    }

    /// Finds the mount of an absolute, normalised path (the longest mount that holds it).
    pub fn locate(&self, absolute: &str) -> Result<SandboxPath, PathError> {
        self.mounts
            .iter()
            .filter(|(m, _)| under(absolute, m))
            .max_by_key(|(m, _)| m.len())
            .map(|(m, ro)| SandboxPath {
                absolute: absolute.to_string(),
                mount: m.clone(),
                read_only: *ro,
            })
            .ok_or_else(|| {
                let list: Vec<&str> = self.mounts.iter().map(|(m, _)| m.as_str()).collect();
                PathError::OutsideMounts(absolute.to_string(), list.join(", "))
            })
    }

    /// What a symlink's engine-resolved target means: it must stay on a mount (and on a
    /// writable one when writing through it).
    pub fn resolved_target(&self, target: &str, write: bool) -> Result<SandboxPath, PathError> {
        syntax(target)?;
        let path = self.locate(&normalise_abs(target))?;
        if write {
            writable(&path)?;
        }
        Ok(path)
    }
}

/// A path a write may target: on a writable mount, and not a mount root.
pub fn writable(path: &SandboxPath) -> Result<(), PathError> {
    if path.read_only {
        return Err(PathError::ReadOnly(
            path.absolute.clone(),
            path.mount.clone(),
        ));
    }
    if path.absolute == path.mount {
        return Err(PathError::MountRoot(path.absolute.clone()));
    }
    Ok(())
}

/// Checks the text of a path before it is joined.
fn syntax(raw: &str) -> Result<(), PathError> {
    if raw.is_empty() {
        return Err(PathError::Empty);
    }
    if raw.contains('\0') {
        return Err(PathError::Nul);
    }
    if raw.len() > MAX_PATH_BYTES {
        return Err(PathError::TooLong);
    }
    for part in raw.split('/') {
        if part == ".." {
            return Err(PathError::DotDot);
        }
        if part.len() > MAX_NAME_BYTES {
            return Err(PathError::NameTooLong);
        }
    }
    Ok(())
}

/// `/a//b/./c/` → `/a/b/c` (no `..` handling: `syntax` refused those).
pub(crate) fn normalise_abs(path: &str) -> String {
    let parts: Vec<&str> = path
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    format!("/{}", parts.join("/"))
}

fn under(path: &str, mount: &str) -> bool {
    mount == "/"
        || path == mount
        || (path.starts_with(mount) && path.as_bytes().get(mount.len()) == Some(&b'/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mounts() -> Mounts {
        Mounts {
            mounts: vec![
                ("/workspace/chat".into(), false),
                ("/workspace/volume".into(), false),
                ("/opt/dependencies".into(), true),
            ],
            workdir: "/workspace/chat".into(),
        }
    }

    #[test]
    fn relative_paths_start_at_the_working_directory() {
        let p = mounts().resolve("a/./b//c.txt", None).unwrap();
        assert_eq!(p.absolute, "/workspace/chat/a/b/c.txt");
        assert_eq!(p.within_mount(), "a/b/c.txt");
        assert_eq!(p.file_name(), "c.txt");
        assert_eq!(p.parent().unwrap().absolute, "/workspace/chat/a/b");
        let p = mounts()
            .resolve("x", Some("/workspace/volume/sub"))
            .unwrap();
        assert_eq!(p.absolute, "/workspace/volume/sub/x");
    }

    #[test]
    fn absolute_paths_must_lie_on_a_mount() {
        assert!(mounts().resolve("/workspace/volume/f", None).is_ok());
        for outside in [
            "/etc/passwd",
            "/workspace/chatty",
            "/proc/self/environ",
            "/",
        ] {
            assert!(
                matches!(
                    mounts().resolve(outside, None),
                    Err(PathError::OutsideMounts(..))
                ),
                "{outside}"
            );
        }
    }

    #[test]
    fn dot_dot_nul_and_long_paths_are_refused() {
        let m = mounts();
        assert_eq!(m.resolve("../etc", None), Err(PathError::DotDot));
        assert_eq!(m.resolve("a/../../x", None), Err(PathError::DotDot));
        assert_eq!(
            m.resolve("/workspace/chat/..", None),
            Err(PathError::DotDot)
        );
        assert_eq!(m.resolve("a\0b", None), Err(PathError::Nul));
        assert_eq!(m.resolve("", None), Err(PathError::Empty));
        assert_eq!(
            m.resolve(&"a".repeat(256), None),
            Err(PathError::NameTooLong)
        );
        assert_eq!(m.resolve(&"a/".repeat(2100), None), Err(PathError::TooLong));
        // `..` in the working directory is refused too.
        assert_eq!(m.resolve("x", Some("..")), Err(PathError::DotDot));
        // Names merely containing dots are fine.
        assert!(m.resolve("..hidden/a..b", None).is_ok());
    }

    #[test]
    fn writes_need_a_writable_mount_and_a_name() {
        let m = mounts();
        let dep = m.resolve("/opt/dependencies/lib.py", None).unwrap();
        assert!(matches!(writable(&dep), Err(PathError::ReadOnly(..))));
        assert!(!PathError::ReadOnly(String::new(), String::new()).is_invalid_input());
        let root = m.resolve("/workspace/chat/", None).unwrap();
        assert!(matches!(writable(&root), Err(PathError::MountRoot(_))));
        assert!(writable(&m.resolve("f", None).unwrap()).is_ok());
    }

    #[test]
    fn symlink_targets_are_checked_like_paths() {
        let m = mounts();
        assert!(m.resolved_target("/workspace/volume/x", true).is_ok());
        assert!(matches!(
            m.resolved_target("/proc/self", false),
            Err(PathError::OutsideMounts(..))
        ));
        assert!(matches!(
            m.resolved_target("/opt/dependencies/x", true),
            Err(PathError::ReadOnly(..))
        ));
        assert!(m.resolved_target("/opt/dependencies/x", false).is_ok());
    }
}
