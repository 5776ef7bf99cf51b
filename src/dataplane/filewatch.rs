//! File watch: create, modify, delete and rename events under a path on a sandbox's mounts.
//!
//! Watched with inotify (the `notify` crate) on the host side of the bind mount, not from
//! inside the sandbox: the files are the same inodes, so a write in the sandbox is seen
//! without an exec, a process in the sandbox, or any engine call, and a paused or hibernated
//! sandbox is not woken (a watch is not activity). The host path is resolved without
//! following symlinks off the mount (a link to `/` in the chat directory cannot widen a
//! watch), and a recursive watch does not follow links either.
//!
//! Events go through a bounded channel (`data_plane.watch_buffer_events`); a client that
//! falls further behind, or an inotify queue overflow, ends the stream with `resync`: the
//! client lists the directory again and watches anew.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use notify::event::{CreateKind, ModifyKind, RemoveKind, RenameMode};
use notify::{EventKind, RecursiveMode, Watcher};
use serde::Serialize;
use tokio::sync::mpsc;

use super::limits::Slot;
use super::{DataPlane, DataPlaneError, Result};
use crate::domain::spec::ContainerSpec;
use crate::domain::ChatId;

/// One change under the watched path, with container paths.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct FileEvent {
    /// `create`, `modify`, `delete`, or `rename` (each side of a rename is one event:
    /// `side` `from` with the old path, `to` with the new; `cookie` pairs them).
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub path: String,
    /// When the kernel said (a create or delete).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub is_dir: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub side: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cookie: Option<usize>,
    /// Found by scanning a directory that was just made (its contents came before its
    /// watch could exist).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scanned: Option<bool>,
}

/// What the stream carries.
#[derive(Debug)]
pub enum WatchItem {
    Event(FileEvent),
    /// Events were lost (the client fell behind, or the kernel's queue overflowed): the
    /// stream ends here.
    Resync(&'static str),
}

/// A running watch: its events; the watcher stops when this is dropped.
pub struct FileWatch {
    events: mpsc::Receiver<WatchItem>,
    /// The watched path, as the client may name it (in the container).
    pub path: String,
    /// Set when events were lost: after the last one received, the stream says `resync`.
    overflowed: Arc<AtomicBool>,
    /// Watches every directory of the tree on its own (when recursive): a new directory is
    /// watched, then scanned, by [`FileWatch::next`].
    watcher: notify::RecommendedWatcher,
    recursive: bool,
    map: PathMap,
    /// Directories watched (bounded by `MAX_DIRS`).
    dirs: usize,
    /// Creates found by scanning a new directory, sent before the next kernel event.
    scanned: std::collections::VecDeque<WatchItem>,
    _slot: Slot,
}

/// Most directories one recursive watch covers (each is an inotify watch on the host).
pub const MAX_DIRS: usize = 10_000;

impl FileWatch {
    /// The next item; after the last event, `Resync` when events were lost, then `None`.
    ///
    /// A directory created under a recursive watch is watched, then scanned: what was made
    /// in it before its watch existed comes as `create` events with `scanned: true` (a file
    /// made at that very moment may be reported twice, never missed).
    pub async fn next(&mut self) -> Option<WatchItem> {
        if let Some(item) = self.scanned.pop_front() {
            return Some(item);
        }
        let item = match self.events.recv().await {
            Some(item) => item,
            None if self.overflowed.swap(false, Ordering::Relaxed) => {
                return Some(WatchItem::Resync(
                    "events were lost: the client fell behind; list again and watch anew",
                ))
            }
            None => return None,
        };
        if let WatchItem::Event(e) = &item {
            // A directory made in the tree, or moved into it, is watched from now on; one
            // removed no longer counts.
            let arrived = (e.kind == "create" && e.is_dir == Some(true))
                || (e.kind == "rename" && e.side == Some("to"));
            if self.recursive && arrived {
                if let Some(host) = self.map.to_host(&e.path) {
                    if let Err(why) = self.add_tree(&host, true) {
                        self.scanned.push_back(WatchItem::Resync(why.reason()));
                    }
                }
            }
            if e.kind == "delete" && e.is_dir == Some(true) {
                self.dirs = self.dirs.saturating_sub(1);
            }
        }
        Some(item)
    }

    /// Watches `dir` and every directory below it; with `report`, queues a `create` for
    /// every entry found. Only real directories under the watched root: a path whose
    /// canonical form is not itself has a symlink in it (a directory swapped for a link to
    /// `/` by the sandbox), and is neither watched nor read; the check is made again after
    /// the watch is added, so a swap in between is undone.
    fn add_tree(&mut self, dir: &Path, report: bool) -> std::result::Result<(), TreeError> {
        let real_dir = |d: &Path| {
            std::fs::symlink_metadata(d).is_ok_and(|m| m.is_dir())
                && std::fs::canonicalize(d).is_ok_and(|c| c == d)
                && d.starts_with(&self.map.host_root)
        };
        let mut todo = vec![dir.to_path_buf()];
        while let Some(dir) = todo.pop() {
            if self.dirs >= MAX_DIRS {
                return Err(TreeError::TooMany);
            }
            if !real_dir(&dir) {
                continue;
            }
            match self.watcher.watch(&dir, RecursiveMode::NonRecursive) {
                Ok(()) => self.dirs += 1,
                Err(e) if matches!(e.kind, notify::ErrorKind::MaxFilesWatch) => {
                    return Err(TreeError::HostLimit)
                }
                Err(_) => continue, // gone meanwhile: its delete comes as an event
            }
            if !real_dir(&dir) {
                let _ = self.watcher.unwatch(&dir);
                self.dirs -= 1;
                continue;
            }
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                // The entry itself, never what a link points to.
                let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
                if report {
                    if let Some(path) = self.map.to_container(&entry.path()) {
                        self.scanned.push_back(WatchItem::Event(FileEvent {
                            kind: "create",
                            path,
                            is_dir: Some(is_dir),
                            side: None,
                            cookie: None,
                            scanned: Some(true),
                        }));
                    }
                }
                if is_dir {
                    todo.push(entry.path());
                }
            }
        }
        Ok(())
    }
}

/// Why a tree could not be watched whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TreeError {
    /// More than `MAX_DIRS` directories.
    TooMany,
    /// The host's inotify limit (`fs.inotify.max_user_watches`).
    HostLimit,
}

impl TreeError {
    fn reason(self) -> &'static str {
        match self {
            TreeError::TooMany => "the tree has more directories than one watch covers (10,000)",
            TreeError::HostLimit => "the host's inotify watch limit is reached",
        }
    }
}

impl From<TreeError> for DataPlaneError {
    fn from(e: TreeError) -> Self {
        match e {
            TreeError::TooMany => {
                DataPlaneError::TooLarge(format!("{}: watch a smaller part", e.reason()))
            }
            TreeError::HostLimit => {
                DataPlaneError::Busy(format!("{} (fs.inotify.max_user_watches)", e.reason()))
            }
        }
    }
}

/// Maps host paths under a mount's source back to the container.
#[derive(Debug, Clone)]
struct PathMap {
    host_root: PathBuf,
    container_root: String,
}

impl PathMap {
    fn to_host(&self, container: &str) -> Option<PathBuf> {
        let rest = container.strip_prefix(&self.container_root)?;
        if !(rest.is_empty() || rest.starts_with('/') || self.container_root == "/") {
            return None;
        }
        Some(self.host_root.join(rest.trim_start_matches('/')))
    }

    fn to_container(&self, host: &Path) -> Option<String> {
        let rest = host.strip_prefix(&self.host_root).ok()?;
        let rest = rest.to_str()?;
        Some(if rest.is_empty() {
            self.container_root.clone()
        } else if self.container_root == "/" {
            format!("/{rest}")
        } else {
            format!("{}/{rest}", self.container_root)
        })
    }
}

/// The events a notify event stands for (pure).
fn translate(event: &notify::Event, map: &PathMap) -> Vec<FileEvent> {
    let kind = match event.kind {
        EventKind::Create(k) => Some(("create", dir_of_create(k), None)),
        EventKind::Remove(k) => Some(("delete", dir_of_remove(k), None)),
        EventKind::Modify(ModifyKind::Name(RenameMode::From)) => {
            Some(("rename", None, Some("from")))
        }
        EventKind::Modify(ModifyKind::Name(RenameMode::To)) => Some(("rename", None, Some("to"))),
        // The pair again, in one event: its sides were already sent.
        EventKind::Modify(ModifyKind::Name(_)) => None,
        EventKind::Modify(_) => Some(("modify", None, None)),
        EventKind::Access(_) | EventKind::Any | EventKind::Other => None,
    };
    let Some((kind, is_dir, side)) = kind else {
        return Vec::new();
    };
    event
        .paths
        .iter()
        .filter_map(|p| map.to_container(p))
        .map(|path| FileEvent {
            kind,
            path,
            is_dir,
            side,
            cookie: side.and(event.attrs.tracker()),
            scanned: None,
        })
        .collect()
}

fn dir_of_create(k: CreateKind) -> Option<bool> {
    match k {
        CreateKind::File => Some(false),
        CreateKind::Folder => Some(true),
        _ => None,
    }
}

fn dir_of_remove(k: RemoveKind) -> Option<bool> {
    match k {
        RemoveKind::File => Some(false),
        RemoveKind::Folder => Some(true),
        _ => None,
    }
}

/// Where the watcher's thread puts events: a bounded channel, dropped at the first loss so
/// that the stream ends (with `resync`) after what the client already has.
struct Sink {
    tx: std::sync::Mutex<Option<mpsc::Sender<WatchItem>>>,
    lost: Arc<AtomicBool>,
    map: PathMap,
}

impl Sink {
    fn handle(&self, res: notify::Result<notify::Event>) {
        let mut guard = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        let Some(sender) = guard.as_ref() else {
            return;
        };
        let items = match res {
            Ok(ev) if ev.need_rescan() => {
                vec![WatchItem::Resync("the kernel's event queue overflowed")]
            }
            Ok(ev) => translate(&ev, &self.map)
                .into_iter()
                .map(WatchItem::Event)
                .collect(),
            Err(_) => vec![WatchItem::Resync("the watch failed")],
        };
        for item in items {
            let last = matches!(item, WatchItem::Resync(_));
            if sender.try_send(item).is_err() || last {
                self.lost.store(true, Ordering::Relaxed);
                *guard = None;
                return;
            }
        }
    }
}

impl DataPlane {
    /// Starts watching `raw` (relative to the chat mount, or absolute on a mount) of a live
    /// sandbox, recursively or not.
    pub async fn watch_files(
        &self,
        chat_id: ChatId,
        raw: &str,
        recursive: bool,
    ) -> Result<FileWatch> {
        let row = self
            .ctx
            .store
            .get(chat_id)
            .await?
            .ok_or(DataPlaneError::NotFound)?;
        if row.deleted_at.is_some() || !row.is_live(chrono::Utc::now()) {
            return Err(DataPlaneError::NotRunning(
                "not live (deleted or expired)".into(),
            ));
        }
        let spec = ContainerSpec::from_json(&row.spec_json)
            .map_err(|e| DataPlaneError::Spec(e.to_string()))?;
        let mounts = super::paths::Mounts::of(&spec);
        let path = mounts.resolve(raw, None)?;
        let mount = spec
            .mounts
            .iter()
            .find(|m| super::paths::normalise_abs(&m.target) == path.mount)
            .ok_or_else(|| DataPlaneError::Spec(format!("no mount at {}", path.mount)))?;
        let source_root = std::fs::canonicalize(&mount.source)
            .map_err(|_| DataPlaneError::NoSuchPath(path.mount.clone()))?;
        let wanted = source_root.join(path.within_mount());
        let host = std::fs::canonicalize(&wanted)
            .map_err(|_| DataPlaneError::NoSuchPath(path.absolute.clone()))?;
        if !host.starts_with(&source_root) {
            return Err(DataPlaneError::Forbidden(format!(
                "{}: a symlink leads off the sandbox's mounts",
                path.absolute
            )));
        }
        let slot = self.file_watches.try_take(chat_id).map_err(|b| {
            DataPlaneError::Busy(b.detail("max_file_watches", "max_file_watches_per_sandbox"))
        })?;
        let map = PathMap {
            container_root: path.absolute.clone(),
            host_root: host.clone(),
        };
        let map_for_tree = map.clone();
        let (tx, events) = mpsc::channel(self.ctx.settings.data_plane.watch_buffer_events);
        let overflowed = Arc::new(AtomicBool::new(false));
        let sink = Sink {
            tx: std::sync::Mutex::new(Some(tx)),
            lost: overflowed.clone(),
            map,
        };
        let handler = move |res: notify::Result<notify::Event>| sink.handle(res);
        let config = notify::Config::default().with_follow_symlinks(false);
        let watcher = notify::RecommendedWatcher::new(handler, config).map_err(watch_error)?;
        let mut watch = FileWatch {
            events,
            path: path.absolute,
            overflowed,
            watcher,
            recursive,
            map: map_for_tree,
            dirs: 0,
            scanned: Default::default(),
            _slot: slot,
        };
        if recursive && host.is_dir() {
            watch.add_tree(&host, false)?;
        } else {
            watch
                .watcher
                .watch(&host, RecursiveMode::NonRecursive)
                .map_err(watch_error)?;
        }
        Ok(watch)
    }
}

/// A watcher that cannot start: the kernel's inotify limits, mostly.
fn watch_error(e: notify::Error) -> DataPlaneError {
    match e.kind {
        notify::ErrorKind::MaxFilesWatch => DataPlaneError::Busy(
            "the host's inotify watch limit is reached (fs.inotify.max_user_watches)".into(),
        ),
        notify::ErrorKind::PathNotFound => DataPlaneError::NoSuchPath(String::new()),
        notify::ErrorKind::Io(ref io) if io.kind() == std::io::ErrorKind::PermissionDenied => {
            DataPlaneError::Forbidden(format!("cannot watch: {e}"))
        }
        _ => DataPlaneError::Host(format!("cannot watch: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{DataChange, EventAttributes};

    fn event(kind: EventKind, paths: &[&str]) -> notify::Event {
        let mut e = notify::Event::new(kind);
        e.paths = paths.iter().map(PathBuf::from).collect();
        e.attrs = EventAttributes::new();
        e
    }

    #[test]
    fn a_client_that_falls_behind_loses_the_rest_and_is_told() {
        let (tx, mut rx) = mpsc::channel(2);
        let lost = Arc::new(AtomicBool::new(false));
        let sink = Sink {
            tx: std::sync::Mutex::new(Some(tx)),
            lost: lost.clone(),
            map: PathMap {
                host_root: "/h".into(),
                container_root: "/c".into(),
            },
        };
        for i in 0..5 {
            let path = format!("/h/f{i}");
            sink.handle(Ok(event(EventKind::Create(CreateKind::File), &[&path])));
        }
        let mut got = Vec::new();
        while let Ok(WatchItem::Event(e)) = rx.try_recv() {
            got.push(e.path);
        }
        assert_eq!(got, ["/c/f0", "/c/f1"], "what fitted, in order");
        assert!(lost.load(Ordering::Relaxed));
        assert!(
            rx.try_recv().is_err(),
            "the sender is gone: the stream ends"
        );
    }

    #[test]
    fn host_events_become_container_events_under_the_watched_path() {
        let map = PathMap {
            host_root: "/srv/chats/c1".into(),
            container_root: "/workspace/chat".into(),
        };
        let created = translate(
            &event(
                EventKind::Create(CreateKind::File),
                &["/srv/chats/c1/a.txt"],
            ),
            &map,
        );
        assert_eq!(created.len(), 1);
        assert_eq!(
            (created[0].kind, created[0].path.as_str(), created[0].is_dir),
            ("create", "/workspace/chat/a.txt", Some(false))
        );
        let modified = translate(
            &event(
                EventKind::Modify(ModifyKind::Data(DataChange::Any)),
                &["/srv/chats/c1/d/b"],
            ),
            &map,
        );
        assert_eq!(modified[0].kind, "modify");
        assert_eq!(modified[0].path, "/workspace/chat/d/b");
        let gone = translate(
            &event(EventKind::Remove(RemoveKind::Folder), &["/srv/chats/c1/d"]),
            &map,
        );
        assert_eq!((gone[0].kind, gone[0].is_dir), ("delete", Some(true)));
        let from = translate(
            &event(
                EventKind::Modify(ModifyKind::Name(RenameMode::From)),
                &["/srv/chats/c1/x"],
            ),
            &map,
        );
        assert_eq!((from[0].kind, from[0].side), ("rename", Some("from")));
        // The paired event repeats both sides: nothing new. Access and paths off the root
        // are not events.
        assert!(translate(
            &event(
                EventKind::Modify(ModifyKind::Name(RenameMode::Both)),
                &["/srv/chats/c1/x", "/srv/chats/c1/y"]
            ),
            &map
        )
        .is_empty());
        assert!(translate(
            &event(
                EventKind::Access(notify::event::AccessKind::Any),
                &["/srv/chats/c1/x"]
            ),
            &map
        )
        .is_empty());
        assert!(translate(
            &event(EventKind::Create(CreateKind::File), &["/etc/passwd"]),
            &map
        )
        .is_empty());
        // The watched root itself.
        let root = translate(
            &event(EventKind::Remove(RemoveKind::Any), &["/srv/chats/c1"]),
            &map,
        );
        assert_eq!(root[0].path, "/workspace/chat");
    }
}
