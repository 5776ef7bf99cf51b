//! Chat storage on the host: each workspace's chats live on a file system of its own, an ext4
//! image under `storage.root` sized to the workspace's quota and loop-mounted at
//! `mnt/<workspace>/`. The kernel holds the quota for every writer, the API and an agent
//! inside its sandbox alike (`ENOSPC`), and the usage is one `statvfs`, whatever the number of
//! files. The image is sparse: a workspace costs the disk it uses.
//!
//! The quota is exact to the block: the image is made 1.75 times the quota and every block
//! past the quota is reserved (`tune2fs -r`), for a user no process runs as (`tune2fs -u/-g`),
//! so only a process with `CAP_SYS_RESOURCE` may use them; sandboxes never have it, and the API
//! checks the quota before it writes. Changing a quota within the image is online and instant
//! (the reserve changes). Past it the image grows: online (`losetup -c`, `resize2fs`) where
//! sandboxd has `CAP_SYS_RESOURCE`, else offline, only while no sandbox of the workspace
//! runs (docs/storage.md).

pub mod files;
pub mod reconcile;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use tokio::process::Command;
use tokio::sync::{Mutex, MutexGuard};
use tracing::info;

use crate::domain::storage::WorkspaceId;
use crate::domain::ChatId;

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The workspace's file system is full: the write was refused (nothing written).
    #[error("workspace_quota_exceeded")]
    QuotaExceeded,
    #[error("no such file")]
    NotFound,
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Command(String),
    /// The change needs the workspace unused (no sandbox running on it).
    #[error("{0}")]
    Busy(String),
    /// A body longer than its bound (the bound, in bytes).
    #[error("longer than {0} bytes")]
    TooLarge(u64),
}

impl StorageError {
    pub fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.display().to_string();
        move |source| match source.raw_os_error() {
            // A full workspace file system (or a quota) is the quota, whoever wrote.
            Some(ENOSPC | EDQUOT) => StorageError::QuotaExceeded,
            _ if source.kind() == std::io::ErrorKind::NotFound => StorageError::NotFound,
            _ => StorageError::Io { op, path, source },
        }
    }
}

const ENOSPC: i32 = 28;
const EDQUOT: i32 = 122;

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// Bytes used and allowed on a workspace's file system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub used_bytes: u64,
    pub quota_bytes: u64,
}

/// The host side of chat storage.
#[derive(Debug, Clone)]
pub struct ChatStorage {
    root: PathBuf,
    /// Workspace file systems are made and mounted one at a time.
    making: Arc<Mutex<()>>,
    /// History rewrites (replace, append) one at a time: an append reads, then renames.
    history: Arc<Mutex<()>>,
}

/// The image for `quota`: 1.75 times it and a MiB (room for ext4's own metadata, and for
/// raising the quota online up to about 1.75 times; tune2fs reserves at most half the
/// blocks). Sparse: the room costs nothing until used.
fn image_size(quota: u64) -> u64 {
    quota + quota / 4 * 3 + (1 << 20)
}

/// The owner of the reserved blocks: a user and group no process runs as, so root in a
/// sandbox (or sandboxd without `CAP_SYS_RESOURCE`) cannot write into them.
const RESERVED_FOR: &str = "2147483646";

async fn run(program: &str, args: &[&str]) -> Result<String> {
    run_accepting(program, args, &[0]).await
}

/// Runs `program`; its stdout when it exits with one of `ok` (a tool whose exit codes say
/// more than success and failure, such as `e2fsck`'s 1, "errors corrected"). A failure names
/// what the tool said (stderr, else stdout: `e2fsck` reports on stdout).
async fn run_accepting(program: &str, args: &[&str], ok: &[i32]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| StorageError::Command(format!("{program}: {e}")))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.code().is_some_and(|c| ok.contains(&c)) {
        return Ok(stdout);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let said = if stderr.trim().is_empty() {
        stdout.trim()
    } else {
        stderr.trim()
    };
    Err(StorageError::Command(format!(
        "{program} {} exited {:?}: {said}",
        args.join(" "),
        out.status.code()
    )))
}

impl ChatStorage {
    /// `root` must be absolute (the app makes it so at start).
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
            making: Arc::default(),
            history: Arc::default(),
        }
    }

    /// Held while a history is rewritten.
    pub async fn history_lock(&self) -> MutexGuard<'_, ()> {
        self.history.lock().await
    }

    /// The workspace's file system, made if it is not there yet and mounted if it is not.
    pub async fn ensure_workspace(&self, ws: WorkspaceId, quota: u64) -> Result<()> {
        if crate::pool::mounts::is_mount_point(&self.mount_point(ws)) {
            return Ok(());
        }
        if self.image(ws).exists() {
            let _one = self.making.lock().await;
            self.mount(ws).await
        } else {
            self.create_workspace(ws, quota).await
        }
    }

    fn image(&self, ws: WorkspaceId) -> PathBuf {
        self.root.join("images").join(format!("{ws}.img"))
    }

    /// Where the workspace's file system is mounted.
    pub fn mount_point(&self, ws: WorkspaceId) -> PathBuf {
        self.root.join("mnt").join(ws.to_string())
    }

    /// The chat's directory: the one its sandbox mounts at the chat path.
    pub fn chat_dir(&self, ws: WorkspaceId, chat: ChatId) -> PathBuf {
        self.mount_point(ws).join("chats").join(chat.to_string())
    }

    /// Makes the workspace's file system (sized to `quota`) and mounts it; idempotent, so a
    /// start that finds a workspace half made completes it.
    pub async fn create_workspace(&self, ws: WorkspaceId, quota: u64) -> Result<()> {
        let _one = self.making.lock().await;
        let image = self.image(ws);
        let dir = self.mount_point(ws);
        for d in [image.parent().unwrap_or(&self.root), dir.as_path()] {
            tokio::fs::create_dir_all(d)
                .await
                .map_err(StorageError::io("mkdir", d))?;
        }
        if !image.exists() {
            // Made under a temporary name and renamed: an image is complete or absent.
            let partial = image.with_extension("img.partial");
            let file =
                std::fs::File::create(&partial).map_err(StorageError::io("create", &partial))?;
            file.set_len(image_size(quota))
                .map_err(StorageError::io("size", &partial))?;
            drop(file);
            let path = partial.display().to_string();
            // Inode tables and the journal are not zeroed ahead: the image is a fresh sparse
            // file, which reads as zeros, so the room stays unallocated until used.
            run(
                "mkfs.ext4",
                &[
                    "-q",
                    "-F",
                    "-m",
                    "0",
                    "-L",
                    "sandboxd-ws",
                    "-E",
                    "lazy_itable_init=1,lazy_journal_init=1",
                    &path,
                ],
            )
            .await?;
            // Before the first mount: the kernel reads the reserve's owner only when mounting.
            run("tune2fs", &["-u", RESERVED_FOR, "-g", RESERVED_FOR, &path]).await?;
            std::fs::rename(&partial, &image).map_err(StorageError::io("rename", &partial))?;
            files::sync_dir(image.parent().unwrap_or(&self.root))?;
        }
        self.mount(ws).await?;
        tokio::fs::create_dir_all(dir.join("chats"))
            .await
            .map_err(StorageError::io("mkdir", &dir))?;
        drop(_one);
        self.set_quota(ws, quota, true).await
    }

    /// Mounts the workspace's image if it is not mounted (after a reboot, say).
    pub async fn mount(&self, ws: WorkspaceId) -> Result<()> {
        let dir = self.mount_point(ws);
        if crate::pool::mounts::is_mount_point(&dir) {
            return Ok(());
        }
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(StorageError::io("mkdir", &dir))?;
        let image = self.image(ws).display().to_string();
        let target = dir.display().to_string();
        run(
            "mount",
            &["-t", "ext4", "-o", "loop,nosuid,nodev", &image, &target],
        )
        .await?;
        info!(workspace_id = %ws, "mounted workspace file system");
        Ok(())
    }

    /// Sets the workspace's quota on its mounted file system: reserves every block past the
    /// quota, growing the image first when the quota passes it (online where this process
    /// may resize a mounted file system; else offline when `may_unmount`, which the caller
    /// sets only while no sandbox of the workspace runs).
    pub async fn set_quota(&self, ws: WorkspaceId, quota: u64, may_unmount: bool) -> Result<()> {
        let dir = self.mount_point(ws);
        let mut fs = statvfs(&dir)?;
        if !fs.fits(quota) {
            let _one = self.making.lock().await;
            self.grow(ws, quota, may_unmount).await?;
            fs = statvfs(&dir)?;
            if !fs.fits(quota) {
                return Err(StorageError::Command(format!(
                    "the file system of workspace {ws} could not be grown to {quota} bytes"
                )));
            }
        }
        if !fs.can_reserve_past(quota) {
            return Err(StorageError::Busy(format!(
                "{quota} bytes is below half of the workspace's file system; a quota can be \
                 lowered to about half of the largest it had"
            )));
        }
        let allowed_free = quota.saturating_sub(fs.used());
        let reserved_blocks = (fs.free - allowed_free) / fs.block;
        let device = self.device(ws).await?;
        run("tune2fs", &["-r", &reserved_blocks.to_string(), &device]).await?;
        Ok(())
    }

    /// Grows the image to hold `quota`: online, or offline when that is refused (no
    /// `CAP_SYS_RESOURCE`) and `may_unmount`.
    async fn grow(&self, ws: WorkspaceId, quota: u64, may_unmount: bool) -> Result<()> {
        let image = self.image(ws);
        let size = std::fs::metadata(&image)
            .map_err(StorageError::io("stat", &image))?
            .len();
        let wanted = image_size(quota).max(size);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .and_then(|f| f.set_len(wanted))
            .map_err(StorageError::io("grow", &image))?;
        let device = self.device(ws).await?;
        run("losetup", &["-c", &device]).await?;
        let online = run("resize2fs", &[&device]).await;
        let Err(refused) = online else {
            return Ok(());
        };
        if !may_unmount {
            return Err(StorageError::Busy(format!(
                "growing the file system online was refused ({refused}); stop the \
                 workspace's sandboxes and set the quota again"
            )));
        }
        let dir = self.mount_point(ws).display().to_string();
        let path = image.display().to_string();
        run("umount", &[&dir]).await?;
        // The image is free only once no mount anywhere holds it: a container's mount
        // namespace may, for a moment after the container is gone. Its loop device detaches
        // then (autoclear). Still held: mounted again from the same device (the same live
        // file system), and nothing is changed.
        let mut free = false;
        for _ in 0..50 {
            if run("losetup", &["-j", &path]).await?.trim().is_empty() {
                free = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        if !free {
            run(
                "mount",
                &["-t", "ext4", "-o", "nosuid,nodev", &device, &dir],
            )
            .await?;
            return Err(StorageError::Busy(
                "the workspace's file system is still in use; set the quota again".into(),
            ));
        }
        let offline = async {
            // resize2fs wants a checked file system; -p repairs only what is safe, and its
            // exit code 1 says it did.
            run_accepting("e2fsck", &["-f", "-p", &path], &[0, 1]).await?;
            run("resize2fs", &[&path]).await
        }
        .await;
        self.mount(ws).await?;
        offline.map(|_| ())
    }

    /// Bytes used on the workspace's file system (metadata of its own not counted) and its
    /// quota: one `statvfs`.
    pub fn usage(&self, ws: WorkspaceId, quota: u64) -> Result<Usage> {
        let fs = statvfs(&self.mount_point(ws))?;
        Ok(Usage {
            used_bytes: fs.used(),
            quota_bytes: quota,
        })
    }

    /// The loop device the workspace's image is mounted from.
    async fn device(&self, ws: WorkspaceId) -> Result<String> {
        let dir = self.mount_point(ws).display().to_string();
        let source = run("findmnt", &["-n", "-o", "SOURCE", "--target", &dir]).await?;
        let source = source.trim().to_string();
        if source.starts_with("/dev/loop") {
            Ok(source)
        } else {
            Err(StorageError::Command(format!(
                "{dir} is not a workspace file system (mounted from {source:?})"
            )))
        }
    }
}

impl FsFigures {
    /// Bytes in use (the file system's own metadata not counted: ext4 leaves it out of
    /// `f_blocks`).
    fn used(&self) -> u64 {
        self.total.saturating_sub(self.free)
    }

    /// Whether `quota` fits: what is in use plus what the quota still allows is free.
    fn fits(&self, quota: u64) -> bool {
        self.free >= quota.saturating_sub(self.used())
    }

    /// Whether the blocks past `quota` can be reserved: tune2fs reserves at most half of a
    /// file system (kept under 45% here, its own metadata aside).
    fn can_reserve_past(&self, quota: u64) -> bool {
        let allowed_free = quota.saturating_sub(self.used());
        self.free.saturating_sub(allowed_free) <= self.total / 100 * 45
    }
}

/// A file system's figures, in bytes.
struct FsFigures {
    block: u64,
    total: u64,
    /// Free, reserved blocks included.
    free: u64,
}

fn statvfs(dir: &Path) -> Result<FsFigures> {
    let s = rustix::fs::statvfs(dir).map_err(|e| StorageError::io("statvfs", dir)(e.into()))?;
    let block = s.f_frsize.max(1);
    Ok(FsFigures {
        block,
        total: s.f_blocks * block,
        free: s.f_bfree * block,
    })
}
