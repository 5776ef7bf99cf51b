//! The host side of a member: its slot directory, made a shared mount so what a claim mounts
//! under it reaches the container (which sees the slot's subdirectories with `rslave`
//! propagation), and the claim's bind mounts. Everything here is undone when the member goes.

use std::path::{Path, PathBuf};

use rustix::mount::{mount_bind, mount_change, unmount, MountPropagationFlags, UnmountFlags};

#[derive(Debug, thiserror::Error)]
#[error("{op} {path}: {source}")]
pub struct MountError {
    pub op: &'static str,
    pub path: String,
    #[source]
    pub source: std::io::Error,
}

fn err(op: &'static str, path: &Path) -> impl FnOnce(rustix::io::Errno) -> MountError {
    let path = path.display().to_string();
    move |e| MountError {
        op,
        path,
        source: e.into(),
    }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> MountError {
    let path = path.display().to_string();
    move |source| MountError { op, path, source }
}

/// A member's host directory: `chat/` and `volume/` (claim mount points), `claim/` (the FIFO
/// `go` and the file `env`).
#[derive(Debug, Clone)]
pub struct Slot {
    pub dir: PathBuf,
}

impl Slot {
    pub fn new(root: &Path, slot: &str) -> Self {
        Self {
            dir: root.join(slot),
        }
    }

    pub fn chat(&self) -> PathBuf {
        self.dir.join("chat")
    }

    pub fn volume(&self) -> PathBuf {
        self.dir.join("volume")
    }

    pub fn claim(&self) -> PathBuf {
        self.dir.join("claim")
    }

    /// Makes the directories and the FIFO, and makes the slot a shared mount of itself.
    pub fn prepare(&self) -> Result<(), MountError> {
        for d in [self.chat(), self.volume(), self.claim()] {
            std::fs::create_dir_all(&d).map_err(io_err("mkdir", &d))?;
        }
        let fifo = self.claim().join("go");
        if !fifo.exists() {
            rustix::fs::mkfifoat(
                rustix::fs::CWD,
                &fifo,
                rustix::fs::Mode::from_raw_mode(0o600),
            )
            .map_err(err("mkfifo", &fifo))?;
        }
        if !is_mount_point(&self.dir) {
            mount_bind(&self.dir, &self.dir).map_err(err("bind", &self.dir))?;
        }
        mount_change(&self.dir, MountPropagationFlags::SHARED)
            .map_err(err("make-shared", &self.dir))
    }

    /// Binds the chat directory and the request volume onto the slot (the container sees
    /// them at once, at its chat and volume paths).
    pub fn bind(&self, chat_dir: &Path, volume: &Path) -> Result<(), MountError> {
        mount_bind(chat_dir, self.chat()).map_err(err("bind", chat_dir))?;
        if let Err(e) = mount_bind(volume, self.volume()) {
            let _ = unmount(self.chat(), UnmountFlags::DETACH);
            return Err(err("bind", volume)(e));
        }
        Ok(())
    }

    /// Undoes every mount of the slot (and the slot's own), then removes its directory.
    /// Mounts already gone count as undone.
    pub fn remove(&self) -> Result<(), MountError> {
        for m in [self.chat(), self.volume(), self.dir.clone()] {
            while is_mount_point(&m) {
                unmount(&m, UnmountFlags::DETACH).map_err(err("unmount", &m))?;
            }
        }
        match std::fs::remove_dir_all(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("rmdir", &self.dir)(e)),
        }
    }
}

/// Whether `path` is a mount point in this process's mount table.
pub fn is_mount_point(path: &Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let wanted = path.to_string_lossy();
    table
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|mp| unescape(mp) == wanted)
}

/// Every mount point at or below `dir` (for tests and cleanup checks).
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let prefix = dir.to_string_lossy().to_string();
    table
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape)
        .filter(|mp| mp == &prefix || mp.starts_with(&format!("{prefix}/")))
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// Whether this process may make mounts and share them (root, or CAP_SYS_ADMIN): tried on a
/// scratch directory under `root`, undone at once. The pool is off without it.
pub fn can_share_mounts(root: &Path) -> Result<(), MountError> {
    let probe = Slot::new(root, ".probe");
    let result = probe.prepare();
    let cleanup = probe.remove();
    result.and(cleanup)
}

#[cfg(test)]
mod tests {
    use super::unescape;

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape("/a\\040b"), "/a b");
        assert_eq!(unescape("/plain"), "/plain");
    }
}
