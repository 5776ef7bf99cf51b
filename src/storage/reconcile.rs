//! Chat storage at start-up, like containers: the file systems of every workspace mounted,
//! and metadata and directories made to agree after whatever a crash interrupted. A chat's
//! directory is made before its row and its row removed before its directory, so a directory
//! without a row is a remnant (removed); a row without a directory was never left by
//! sandboxd (made again, empty, and said in the log).

use std::collections::HashSet;

use tracing::{info, warn};

use super::{files, ChatStorage, Result};
use crate::store::Store;

/// What the start-up reconcile did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    pub workspaces: usize,
    pub remnants_removed: usize,
    pub directories_made: usize,
    /// Attachment rows made to say what is on disk (a replace a crash cut between the rename
    /// and the row), or dropped (a file gone by hand).
    pub rows_mended: usize,
}

/// Makes a chat's attachment rows say what is on disk: a file is renamed into place before
/// its row is written, so a crash between them leaves a row with the old size (mended) or no
/// row (the file stays: the chat directory is also the agent's, and a complete file is never
/// removed; the client, never answered, writes it again). A row whose file is gone goes.
async fn mend_rows(
    store: &Store,
    chat: crate::domain::ChatId,
    dir: &std::path::Path,
) -> Result<usize> {
    let failed = |e: crate::store::StoreError| {
        super::StorageError::Command(format!("attachments of {chat}: {e}"))
    };
    let mut mended = 0;
    for mut f in store.files(chat).await.map_err(failed)? {
        match std::fs::metadata(dir.join(&f.name)) {
            Ok(m) if m.len() == f.size_bytes => {}
            Ok(m) => {
                f.size_bytes = m.len();
                store.file_put(&f).await.map_err(failed)?;
                mended += 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                store.file_delete(chat, &f.name).await.map_err(failed)?;
                mended += 1;
            }
            Err(e) => return Err(super::StorageError::io("stat", dir)(e)),
        }
    }
    Ok(mended)
}

pub async fn at_start(store: &Store, storage: &ChatStorage) -> Result<Reconciled> {
    let mut done = Reconciled::default();
    let workspaces = store
        .workspaces(None)
        .await
        .map_err(|e| super::StorageError::Command(format!("reading workspaces: {e}")))?;
    let chats = store
        .chats(None)
        .await
        .map_err(|e| super::StorageError::Command(format!("reading chats: {e}")))?;
    for w in &workspaces {
        if let Err(e) = storage
            .ensure_workspace(w.workspace_id, w.quota_bytes)
            .await
        {
            warn!(workspace_id = %w.workspace_id, error = %e, "workspace file system unavailable");
            continue;
        }
        done.workspaces += 1;
        let chats_dir = storage.mount_point(w.workspace_id).join("chats");
        let known: HashSet<String> = chats
            .iter()
            .filter(|c| c.workspace_id == w.workspace_id)
            .map(|c| c.chat_id.to_string())
            .collect();
        done.remnants_removed += files::sweep(&chats_dir);
        for entry in std::fs::read_dir(&chats_dir)
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if known.contains(&name) {
                done.remnants_removed += files::sweep(&entry.path());
            } else {
                files::remove_chat(&entry.path())?;
                done.remnants_removed += 1;
                warn!(workspace_id = %w.workspace_id, chat_id = %name, "removed a chat directory without metadata (a create or delete a crash interrupted)");
            }
        }
        for c in chats.iter().filter(|c| c.workspace_id == w.workspace_id) {
            let dir = storage.chat_dir(c.workspace_id, c.chat_id);
            if !dir.is_dir() {
                files::init_chat(&dir).await?;
                done.directories_made += 1;
                warn!(chat_id = %c.chat_id, "a chat's directory was missing; made again, empty");
            }
            done.rows_mended += mend_rows(store, c.chat_id, &dir).await?;
        }
    }
    if !workspaces.is_empty() {
        info!(?done, "chat storage reconciled");
    }
    Ok(done)
}

/// The storage figures of the metrics: bytes in use over every workspace, and workspaces by
/// how full they are (a bounded label set). One `statvfs` per workspace.
pub async fn figures(store: &Store, storage: &ChatStorage, metrics: &crate::metrics::Metrics) {
    let Ok(workspaces) = store.workspaces(None).await else {
        return;
    };
    const BANDS: [&str; 5] = ["under_50", "50_to_80", "80_to_95", "over_95", "unmounted"];
    let mut counts = [0i64; 5];
    let mut used_total = 0u64;
    for w in &workspaces {
        let band = match storage.usage(w.workspace_id, w.quota_bytes) {
            Ok(u) => {
                used_total += u.used_bytes;
                let percent = u.used_bytes.saturating_mul(100) / u.quota_bytes.max(1);
                match percent {
                    0..50 => 0,
                    50..80 => 1,
                    80..95 => 2,
                    _ => 3,
                }
            }
            Err(_) => 4,
        };
        counts[band] += 1;
    }
    metrics
        .storage_used_bytes
        .set(i64::try_from(used_total).unwrap_or(i64::MAX));
    for (state, n) in BANDS.iter().zip(counts) {
        metrics
            .storage_workspaces
            .get_or_create(&crate::metrics::StateLabel { state })
            .set(n);
    }
}
