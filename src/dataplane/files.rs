//! Files through the engine's archive API (no exec, so no shell or tools are needed in the
//! image): a write is a one-file tar extracted into the parent directory, a read streams the
//! one entry of a tar, a listing reads a directory's tar headers without keeping contents.
//!
//! The engine resolves paths inside the container's own file system, never the host's. On
//! top of that: a symlink met as the path itself is followed only to targets on the sandbox's
//! mounts (at most [`MAX_HOPS`]), and a write replaces a symlink instead of writing through
//! it. Missing parents of a written file are created with the sandbox user as owner.

use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use serde::Serialize;
use serde_json::json;
use tokio_tar::{Archive, Builder, EntryType, Header};
use tokio_util::io::{ReaderStream, StreamReader};

use super::paths::{writable, SandboxPath};
use super::{Caller, DataPlane, DataPlaneError, Result, Target};
use crate::domain::ChatId;
use crate::store::{EventAction, EventOutcome};

/// How these calls name themselves in a resume's event.
const CALL: &str = "files";

/// Symlinks followed for one read or listing.
pub const MAX_HOPS: usize = 8;
/// Entries a listing looks at (children and everything under them) before it stops.
const LIST_SCAN_MAX: usize = 100_000;
/// Bytes of the directory's tar a listing reads (file contents stream past) before it stops.
const LIST_SCAN_MAX_BYTES: u64 = 256 * 1024 * 1024;
/// Longest a listing reads the directory's tar.
const LIST_SCAN_MAX_TIME: Duration = Duration::from_secs(10);

/// A written file.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Written {
    /// The absolute container path.
    pub path: String,
    pub bytes: u64,
    /// Octal, e.g. `0644`.
    pub mode: String,
    /// Parent directories that had to be created.
    pub created_dirs: Vec<String>,
}

/// A file being read.
pub struct FileStream {
    pub path: String,
    pub size: u64,
    pub body: Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>,
}

/// One directory entry.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DirEntry {
    pub name: String,
    /// `file`, `dir`, `symlink` or `other`.
    pub kind: &'static str,
    pub size: u64,
    /// Octal permission bits.
    pub mode: String,
    /// ISO-8601 modification time.
    pub modified: Option<String>,
    /// For symlinks: where they point (as written, not resolved).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// A directory listing.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Listing {
    pub path: String,
    pub entries: Vec<DirEntry>,
    /// More entries exist than `data_plane.list_max_entries` (or were scanned).
    pub truncated: bool,
}

type TarReader = StreamReader<Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>, Bytes>;

impl DataPlane {
    /// Writes `data` to `path` with `mode`, creating missing parent directories. The write
    /// and its audit line run on their own task: a caller that hangs up cannot leave a
    /// written file unaudited.
    pub async fn write_file(
        &self,
        chat_id: ChatId,
        path: &str,
        mode: u32,
        data: Bytes,
        caller: &Caller,
    ) -> Result<Written> {
        let (t, slot) = self.target(chat_id, CALL).await?;
        let file = t.mounts.resolve(path, None)?;
        writable(&file)?;
        let (this, caller) = (self.clone(), caller.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let result = this.write_checked(&t, &file, mode, &data).await;
            let (outcome, error) = match &result {
                Ok(_) => (EventOutcome::Ok, None),
                Err(e) => (EventOutcome::Error, Some(e.to_string())),
            };
            let created = result.as_ref().map(Vec::len).unwrap_or(0);
            this.audit(
                &t,
                &caller,
                EventAction::FileWrite,
                outcome,
                json!({
                    "path": file.absolute,
                    "bytes": data.len(),
                    "mode": format!("{mode:04o}"),
                    "created_dirs": created,
                    "error": error,
                }),
            )
            .await;
            result.map(|created_dirs| Written {
                path: file.absolute.clone(),
                bytes: data.len() as u64,
                mode: format!("{mode:04o}"),
                created_dirs,
            })
        })
        .await
        .map_err(|e| DataPlaneError::Engine(format!("file write task failed: {e}")))?
    }

    /// The write itself, after the path rules: refuses symlinked directories, extracts into
    /// the parent, or creates the missing parents. Returns the directories it created.
    async fn write_checked(
        &self,
        t: &Target,
        file: &SandboxPath,
        mode: u32,
        data: &Bytes,
    ) -> Result<Vec<String>> {
        self.refuse_symlinked_dirs(t, file).await?;
        let parent = file.parent().ok_or_else(|| {
            DataPlaneError::Path(super::paths::PathError::MountRoot(file.absolute.clone()))
        })?;
        // The usual case: the parent exists. Extract the one file into it.
        let tar = one_file_tar(file.file_name(), data, mode, t.owner, &[]).await?;
        match t
            .io
            .put_archive(&t.container_id, &parent.absolute, tar)
            .await
        {
            Ok(()) => Ok(Vec::new()),
            Err(e) => match DataPlaneError::engine(e, Some(&parent.absolute)) {
                DataPlaneError::NoSuchPath(_) => self.write_with_parents(t, file, mode, data).await,
                other => Err(other),
            },
        }
    }

    /// Finds the deepest existing ancestor and extracts the missing directories (owned by
    /// the sandbox user) and the file into it.
    async fn write_with_parents(
        &self,
        t: &Target,
        file: &SandboxPath,
        mode: u32,
        data: &Bytes,
    ) -> Result<Vec<String>> {
        let mut missing = Vec::new();
        let mut dir = file.parent();
        let base = loop {
            let Some(d) = dir else {
                return Err(DataPlaneError::NoSuchPath(file.mount.clone()));
            };
            match t.io.stat(&t.container_id, &d.absolute).await {
                Ok(Some(s)) if s.is_dir || s.is_symlink => break d,
                Ok(Some(_)) => {
                    return Err(DataPlaneError::NotDirectory {
                        path: d.absolute.clone(),
                    })
                }
                Ok(None) => {
                    dir = d.parent();
                    missing.push(d);
                }
                Err(e) => return Err(DataPlaneError::engine(e, Some(&d.absolute))),
            }
        };
        missing.reverse();
        let rel = |p: &SandboxPath| {
            p.absolute[base.absolute.len()..]
                .trim_start_matches('/')
                .to_string()
        };
        let dirs: Vec<String> = missing.iter().map(rel).collect();
        let tar = one_file_tar(&rel(file), data, mode, t.owner, &dirs).await?;
        t.io.put_archive(&t.container_id, &base.absolute, tar)
            .await
            .map_err(|e| DataPlaneError::engine(e, Some(&base.absolute)))?;
        Ok(missing.into_iter().map(|d| d.absolute).collect())
    }

    /// Streams a regular file's contents (following symlinks on the mounts).
    pub async fn read_file(&self, chat_id: ChatId, path: &str) -> Result<FileStream> {
        let (t, slot) = self.target(chat_id, CALL).await?;
        let (at, entry, _rest) = self.resolved_archive(&t, path).await?;
        let kind = entry.header().entry_type();
        if kind.is_dir() {
            return Err(DataPlaneError::IsDirectory { path: at.absolute });
        }
        if !kind.is_file() {
            return Err(DataPlaneError::Refused(format!(
                "{} is not a regular file",
                at.absolute
            )));
        }
        let size = entry.effective_size();
        let limit = self.ctx.settings.data_plane.file_read_limit_bytes;
        if size > limit {
            return Err(DataPlaneError::TooLarge(format!(
                "{} is {size} bytes, over data_plane.file_read_limit_bytes ({limit})",
                at.absolute
            )));
        }
        // The slot is held until the body is sent (or the client goes away).
        let body = ReaderStream::new(entry).map(move |chunk| {
            let _held = &slot;
            chunk
        });
        Ok(FileStream {
            path: at.absolute,
            size,
            body: Box::pin(body),
        })
    }

    /// The first entry of the engine's tar of a client path, after following symlinks on the
    /// mounts (at most [`MAX_HOPS`]), with the entries after it.
    async fn resolved_archive(
        &self,
        t: &Target,
        path: &str,
    ) -> Result<(
        SandboxPath,
        tokio_tar::Entry<Archive<TarReader>>,
        tokio_tar::Entries<TarReader>,
    )> {
        let mut at = t.mounts.resolve(path, None)?;
        for _ in 0..=MAX_HOPS {
            self.refuse_symlinked_dirs(t, &at).await?;
            let mut entries = self.archive(t, &at).await?;
            let Some(first) = entries.next().await else {
                return Err(DataPlaneError::NoSuchPath(at.absolute));
            };
            let first =
                first.map_err(|e| DataPlaneError::Engine(format!("unreadable archive: {e}")))?;
            if first.header().entry_type().is_symlink() {
                at = follow(t, &at, link_name(&first)?, false)?;
                continue;
            }
            return Ok((at, first, entries));
        }
        Err(DataPlaneError::Refused(format!(
            "more than {MAX_HOPS} symlinks from {path}"
        )))
    }

    /// Lists a directory's entries (following symlinks on the mounts).
    pub async fn list_dir(&self, chat_id: ChatId, path: Option<&str>) -> Result<Listing> {
        let (t, _slot) = self.target(chat_id, CALL).await?;
        let max = self.ctx.settings.data_plane.list_max_entries;
        let (at, first, mut entries) = self.resolved_archive(&t, path.unwrap_or(".")).await?;
        if !first.header().entry_type().is_dir() {
            return Err(DataPlaneError::NotDirectory { path: at.absolute });
        }
        let mut listing = Listing {
            path: at.absolute.clone(),
            entries: Vec::new(),
            truncated: false,
        };
        let (mut scanned, mut bytes) = (0usize, 0u64);
        let until = tokio::time::Instant::now() + LIST_SCAN_MAX_TIME;
        loop {
            let next = match tokio::time::timeout_at(until, entries.next()).await {
                Ok(Some(entry)) => entry,
                Ok(None) => break,
                Err(_) => {
                    listing.truncated = true;
                    break;
                }
            };
            let entry =
                next.map_err(|e| DataPlaneError::Engine(format!("unreadable archive: {e}")))?;
            scanned += 1;
            // Every entry streams past: its header and its contents.
            bytes += entry.effective_size() + 512;
            if bytes > LIST_SCAN_MAX_BYTES {
                listing.truncated = true;
                break;
            }
            if let Some(child) = child_entry(&entry) {
                if listing.entries.len() == max {
                    listing.truncated = true;
                    break;
                }
                listing.entries.push(child);
            }
            if scanned >= LIST_SCAN_MAX {
                listing.truncated = true;
                break;
            }
        }
        listing.entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(listing)
    }

    /// Refuses a path whose directories below the mount root include a symlink: the engine
    /// would follow it anywhere in the container. Checked all at once (one stat each).
    async fn refuse_symlinked_dirs(&self, t: &Target, at: &SandboxPath) -> Result<()> {
        let mut dirs = Vec::new();
        let mut dir = at.parent();
        while let Some(d) = dir {
            if d.absolute == d.mount {
                break;
            }
            dir = d.parent();
            dirs.push(d);
        }
        let stats =
            futures::future::join_all(dirs.iter().map(|d| t.io.stat(&t.container_id, &d.absolute)))
                .await;
        for (d, stat) in dirs.iter().zip(stats) {
            match stat {
                Ok(Some(s)) if s.is_symlink => {
                    return Err(DataPlaneError::Forbidden(format!(
                        "{} is a symlink: paths through symlinked directories are refused \
                         (name its target instead)",
                        d.absolute
                    )))
                }
                Ok(_) => {}
                Err(e) => return Err(DataPlaneError::engine(e, Some(&d.absolute))),
            }
        }
        Ok(())
    }

    /// The entries of the engine's tar of `at`.
    async fn archive(&self, t: &Target, at: &SandboxPath) -> Result<tokio_tar::Entries<TarReader>> {
        let stream =
            t.io.get_archive(&t.container_id, &at.absolute)
                .await
                .map_err(|e| DataPlaneError::engine(e, Some(&at.absolute)))?
                .map_err(std::io::Error::other);
        let boxed: Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>> = Box::pin(stream);
        let mut archive = Archive::new(StreamReader::new(boxed));
        archive
            .entries()
            .map_err(|e| DataPlaneError::Engine(format!("unreadable archive: {e}")))
    }
}

/// Where a symlink at `at` points, checked against the mounts.
fn follow(t: &Target, at: &SandboxPath, target: String, write: bool) -> Result<SandboxPath> {
    let joined = if target.starts_with('/') {
        target
    } else {
        let dir = at.parent().map_or_else(|| at.mount.clone(), |p| p.absolute);
        format!("{dir}/{target}")
    };
    let resolved = lexical(&joined);
    t.mounts.resolved_target(&resolved, write).map_err(|e| {
        DataPlaneError::Forbidden(format!("{} is a symlink to {resolved}: {e}", at.absolute))
    })
}

/// Resolves `.` and `..` in an absolute path text (a symlink's target may use them).
fn lexical(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            p => out.push(p),
        }
    }
    format!("/{}", out.join("/"))
}

fn link_name<R: tokio::io::AsyncRead + Unpin>(entry: &tokio_tar::Entry<R>) -> Result<String> {
    entry
        .link_name()
        .ok()
        .flatten()
        .map(|p| p.to_string_lossy().into_owned())
        .ok_or_else(|| DataPlaneError::Engine("a symlink without a target".into()))
}

/// A direct child of the listed directory (its tar path has two components).
fn child_entry<R: tokio::io::AsyncRead + Unpin>(entry: &tokio_tar::Entry<R>) -> Option<DirEntry> {
    let path = entry.path().ok()?.to_string_lossy().into_owned();
    let mut parts = path.trim_end_matches('/').splitn(3, '/');
    let (_top, name, deeper) = (parts.next()?, parts.next()?, parts.next());
    if deeper.is_some() || name.is_empty() {
        return None;
    }
    let h = entry.header();
    let kind = h.entry_type();
    Some(DirEntry {
        name: name.to_string(),
        kind: if kind.is_dir() {
            "dir"
        } else if kind.is_symlink() {
            "symlink"
        } else if kind.is_file() {
            "file"
        } else {
            "other"
        },
        size: entry.effective_size(),
        mode: format!("{:04o}", h.mode().unwrap_or(0) & 0o7777),
        modified: h
            .mtime()
            .ok()
            .and_then(|s| chrono::DateTime::from_timestamp(i64::try_from(s).ok()?, 0))
            .map(crate::domain::format_time),
        target: kind.is_symlink().then(|| link_name(entry).ok()).flatten(),
    })
}

/// A tar with `dirs` (relative, in creation order) and one file at `name`.
async fn one_file_tar(
    name: &str,
    data: &[u8],
    mode: u32,
    (uid, gid): (u64, u64),
    dirs: &[String],
) -> Result<Vec<u8>> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    let mut tar = Builder::new(Vec::with_capacity(data.len() + 1024 * (dirs.len() + 2)));
    let err = |e: std::io::Error| DataPlaneError::Engine(format!("cannot build the archive: {e}"));
    for dir in dirs {
        let mut h = Header::new_gnu();
        h.set_entry_type(EntryType::Directory);
        h.set_size(0);
        h.set_mode(0o755);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_mtime(now);
        tar.append_data(&mut h, format!("{dir}/"), tokio::io::empty())
            .await
            .map_err(err)?;
    }
    let mut h = Header::new_gnu();
    h.set_entry_type(EntryType::Regular);
    h.set_size(data.len() as u64);
    h.set_mode(mode);
    h.set_uid(uid);
    h.set_gid(gid);
    h.set_mtime(now);
    tar.append_data(&mut h, name, data).await.map_err(err)?;
    tar.into_inner().await.map_err(err)
}

#[cfg(test)]
mod tests {
    use super::lexical;

    #[test]
    fn symlink_targets_resolve_dots_lexically() {
        assert_eq!(
            lexical("/workspace/chat/a/../../volume/x"),
            "/workspace/volume/x"
        );
        assert_eq!(lexical("/workspace/chat/./b"), "/workspace/chat/b");
        assert_eq!(lexical("/../../proc"), "/proc");
    }
}
