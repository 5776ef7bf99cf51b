//! A chat directory's files, crash-safe: a write is all or nothing (a temporary file in the
//! same directory, fsync, rename over the name, fsync of the directory), a chat directory goes
//! by one rename out of sight before it is removed.

use std::io::Write;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::io::AsyncWriteExt;

use super::{Result, StorageError};
use crate::domain::storage::HISTORY_FILE;

/// Prefix of names that are never a chat's files: writes in flight, chats being removed.
pub const TEMP_PREFIX: &str = ".sandboxd-";

/// Makes what a rename or a removal in `dir` did durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(StorageError::io("fsync", dir))
}

fn temp_in(dir: &Path) -> PathBuf {
    dir.join(format!(
        "{TEMP_PREFIX}tmp-{}",
        uuid::Uuid::new_v4().simple()
    ))
}

/// Makes a chat's directory with an empty `history.md`; one already there is kept as it is.
pub async fn init_chat(dir: &Path) -> Result<()> {
    match tokio::fs::create_dir(dir).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(StorageError::io("mkdir", dir)(e)),
    }
    if !dir.join(HISTORY_FILE).exists() {
        write_all(dir, HISTORY_FILE, b"").await?;
    }
    if let Some(parent) = dir.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

/// Writes `name` in `dir` from `body`, all or nothing; its size. A body longer than
/// `max_bytes` is [`StorageError::TooLarge`], and nothing is written.
pub async fn write_stream<S>(dir: &Path, name: &str, mut body: S, max_bytes: u64) -> Result<u64>
where
    S: Stream<Item = std::result::Result<Bytes, std::io::Error>> + Unpin,
{
    let temp = temp_in(dir);
    let written = async {
        let mut file = tokio::fs::File::create(&temp)
            .await
            .map_err(StorageError::io("create", &temp))?;
        let mut size = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(StorageError::io("read body", &temp))?;
            if size + chunk.len() as u64 > max_bytes {
                return Err(StorageError::TooLarge(max_bytes));
            }
            file.write_all(&chunk)
                .await
                .map_err(StorageError::io("write", &temp))?;
            size += chunk.len() as u64;
        }
        file.sync_all()
            .await
            .map_err(StorageError::io("fsync", &temp))?;
        Ok::<_, StorageError>(size)
    }
    .await;
    finish(dir, name, &temp, written)
}

/// Writes `name` in `dir` with `content`, all or nothing.
pub async fn write_all(dir: &Path, name: &str, content: &[u8]) -> Result<u64> {
    let temp = temp_in(dir);
    let written = (|| {
        let mut file = std::fs::File::create(&temp).map_err(StorageError::io("create", &temp))?;
        file.write_all(content)
            .map_err(StorageError::io("write", &temp))?;
        file.sync_all().map_err(StorageError::io("fsync", &temp))?;
        Ok::<_, StorageError>(content.len() as u64)
    })();
    finish(dir, name, &temp, written)
}

/// Renames a complete temporary file over `name`; removes it when the write failed.
fn finish(dir: &Path, name: &str, temp: &Path, written: Result<u64>) -> Result<u64> {
    let size = match written {
        Ok(size) => size,
        Err(e) => {
            let _ = std::fs::remove_file(temp);
            return Err(e);
        }
    };
    let target = dir.join(name);
    if let Err(e) = std::fs::rename(temp, &target) {
        let _ = std::fs::remove_file(temp);
        return Err(StorageError::io("rename", &target)(e));
    }
    sync_dir(dir)?;
    Ok(size)
}

/// Removes `name` from `dir`; `false` when it was not there.
pub fn remove(dir: &Path, name: &str) -> Result<bool> {
    let path = dir.join(name);
    match std::fs::remove_file(&path) {
        Ok(()) => {
            sync_dir(dir)?;
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(StorageError::io("remove", &path)(e)),
    }
}

/// Removes a chat's directory: renamed out of sight first (one atomic step), then removed,
/// so a crash leaves either the whole directory or a hidden remnant the next start removes.
pub fn remove_chat(dir: &Path) -> Result<()> {
    let Some(parent) = dir.parent() else {
        return Ok(());
    };
    let gone = parent.join(format!(
        "{TEMP_PREFIX}gone-{}",
        uuid::Uuid::new_v4().simple()
    ));
    match std::fs::rename(dir, &gone) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(StorageError::io("rename", dir)(e)),
    }
    sync_dir(parent)?;
    std::fs::remove_dir_all(&gone).map_err(StorageError::io("remove", &gone))?;
    sync_dir(parent)
}

/// Removes remnants of writes and removals a crash interrupted (names with [`TEMP_PREFIX`])
/// in `dir`; how many.
pub fn sweep(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
            continue;
        }
        let path = entry.path();
        let done = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        removed += usize::from(done.is_ok());
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn writes_are_whole_and_leave_no_temporary_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let chat = dir.path().join("chat");
        init_chat(&chat).await.expect("init");
        assert_eq!(
            std::fs::read(chat.join(HISTORY_FILE)).expect("history"),
            b""
        );
        write_all(&chat, "a.txt", b"one").await.expect("write");
        write_all(&chat, "a.txt", b"two").await.expect("replace");
        assert_eq!(std::fs::read(chat.join("a.txt")).expect("read"), b"two");
        let body = futures::stream::iter([Ok(Bytes::from("x")), Ok(Bytes::from("yz"))]);
        assert_eq!(
            write_stream(&chat, "b.bin", body, 3).await.expect("stream"),
            3
        );
        // One byte over its bound: refused, nothing written.
        let body = futures::stream::iter([Ok(Bytes::from("x")), Ok(Bytes::from("yz"))]);
        assert!(matches!(
            write_stream(&chat, "big.bin", body, 2).await,
            Err(StorageError::TooLarge(2))
        ));
        assert!(!chat.join("big.bin").exists());
        // A body that fails half-way writes nothing and leaves nothing.
        let broken = futures::stream::iter([
            Ok(Bytes::from("partial")),
            Err(std::io::Error::other("client went away")),
        ]);
        assert!(write_stream(&chat, "c.bin", broken, 1 << 20).await.is_err());
        assert!(!chat.join("c.bin").exists());
        let mut names: Vec<String> = std::fs::read_dir(&chat)
            .expect("list")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["a.txt", "b.bin", "history.md"]);
        assert!(remove(&chat, "a.txt").expect("remove"));
        assert!(!remove(&chat, "a.txt").expect("again"));
        // Remnants of a crash are swept; a chat directory goes whole.
        std::fs::write(chat.join(format!("{TEMP_PREFIX}tmp-x")), b"half").expect("remnant");
        assert_eq!(sweep(&chat), 1);
        remove_chat(&chat).expect("remove chat");
        assert!(!chat.exists());
        assert_eq!(
            std::fs::read_dir(dir.path()).expect("list").count(),
            0,
            "nothing left"
        );
    }
}
