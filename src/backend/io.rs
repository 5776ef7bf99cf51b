//! The data plane's seam: what it asks of the engine that runs a sandbox (exec, a kill of
//! everything an exec started, the archive calls for files), and how it finds that engine
//! ([`Locate`]). Docker and Podman implement it with the engine's exec and archive API; in
//! swarm mode the manager says which node's engine runs a sandbox.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use tokio::io::AsyncWrite;

use super::error::Result;

/// The variable every exec's processes inherit; a timeout kills every process carrying it.
pub const EXEC_MARKER_VAR: &str = "SANDBOXD_EXEC_ID";

/// Defines `collect MARKER`, which sets `$marked` to " pid pid … " for every process whose
/// environment carries the marker and every descendant of one (a process that rewrites its
/// title can overwrite its environment). Needs only `sh`, `grep` and `read` (busybox has
/// them). Not `grep -F`: busybox's stops at the first NUL of `environ`; the marker has no
/// regex metacharacters. PID 1 (the sandbox's own process) is never a descendant of an exec.
macro_rules! collect_marked {
    () => {
        r#"collect() {
  marked=" "
  for d in /proc/[0-9]*; do
    p=${d#/proc/}
    [ "$p" = "$$" ] && continue
    grep -q "$1" "$d/environ" 2>/dev/null && marked="$marked$p "
  done
  changed=1
  while [ -n "$changed" ]; do
    changed=
    for d in /proc/[0-9]*; do
      p=${d#/proc/}
      case "$marked" in *" $p "*) continue;; esac
      [ "$p" = "$$" ] && continue
      read -r _ _ _ pp _ < "$d/stat" 2>/dev/null || continue
      case "$marked" in *" $pp "*) marked="$marked$p "; changed=1;; esac
    done
  done
}
"#
    };
}

/// Kills every marked process (`$1`), again until none is left: they are stopped first, so
/// none can fork while the others die. The kernel ignores SIGKILL to PID 1 anyway.
const KILL_MARKED: &str = concat!(
    collect_marked!(),
    r#"i=0
while [ $i -lt 50 ]; do
  collect "$1"
  [ "$marked" = " " ] && exit 0
  for p in $marked; do kill -STOP "$p" 2>/dev/null; done
  for p in $marked; do kill -9 "$p" 2>/dev/null; done
  i=$((i+1))
done
exit 1"#
);

/// Sends signal `$2` (a name such as `TERM`, or a number; `0` only checks) to every marked
/// process (`$1`) once, and prints how many got it.
const SIGNAL_MARKED: &str = concat!(
    collect_marked!(),
    r#"collect "$1"
n=0
for p in $marked; do kill -"$2" "$p" 2>/dev/null && n=$((n+1)); done
echo "$n""#
);

/// One chunk of an exec's output.
#[derive(Debug, Clone)]
pub enum ExecChunk {
    Stdout(Bytes),
    Stderr(Bytes),
}

/// What an exec runs.
#[derive(Debug, Clone)]
pub struct ExecSpec {
    pub cmd: Vec<String>,
    /// `NAME=value`, the marker included by the caller.
    pub env: Vec<String>,
    pub workdir: String,
    pub stdin: bool,
    /// A terminal: output comes as one stream (stdout), and the size can be changed.
    pub tty: bool,
}

/// A started exec: its output, and its stdin when asked for.
pub struct StartedExec {
    pub id: String,
    pub output: Pin<Box<dyn Stream<Item = Result<ExecChunk>> + Send>>,
    pub input: Option<Pin<Box<dyn AsyncWrite + Send>>>,
}

/// A path's kind and size, as the engine reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathStat {
    pub size: i64,
    pub is_dir: bool,
    pub is_symlink: bool,
    /// For a symlink, where it points as the engine reports it (dockerd: as written; Podman:
    /// resolved).
    pub link_target: String,
}

/// Exec and files on one engine. Implementations connect on first use and again after a
/// failed call, so a restarted engine is picked up without a restart of sandboxd.
#[async_trait::async_trait]
pub trait SandboxIo: Send + Sync + std::fmt::Debug {
    /// Creates and starts an exec, attached.
    async fn start_exec(&self, container: &str, spec: ExecSpec) -> Result<StartedExec>;

    /// Waits (up to `within`) until the engine reports the exec's process started (or
    /// ended): the attach answer can come before the process exists, and a kill must not
    /// run first.
    async fn wait_exec_started(&self, exec_id: &str, within: Duration);

    /// The exit code of a finished exec (`None` while it runs).
    async fn exec_exit_code(&self, exec_id: &str) -> Result<Option<i64>>;

    /// A path's kind and size; `None` when it does not exist.
    async fn stat(&self, container: &str, path: &str) -> Result<Option<PathStat>>;

    /// Extracts a tar archive into the directory `dir` of the container.
    async fn put_archive(&self, container: &str, dir: &str, tar: Vec<u8>) -> Result<()>;

    /// A tar archive of `path` (a file, or a directory with everything under it), streamed.
    /// The engine's answer to the call (a missing path, a refusal) is the call's error, not
    /// the stream's.
    async fn get_archive(
        &self,
        container: &str,
        path: &str,
    ) -> Result<BoxStream<'static, Result<Bytes>>>;

    /// Kills every process in the container that carries `marker` in its environment: the
    /// exec's process and everything it started, however it detached (`setsid`, double
    /// fork, ignoring SIGTERM). Returns whether none is left. Bounded by `within`.
    async fn kill_marked(&self, container: &str, marker: &str, within: Duration) -> Result<bool> {
        let spec = ExecSpec {
            cmd: vec![
                "sh".into(),
                "-c".into(),
                KILL_MARKED.into(),
                "sh".into(),
                marker.into(),
            ],
            env: Vec::new(),
            workdir: "/".into(),
            stdin: false,
            tty: false,
        };
        let run = async {
            let mut killer = self.start_exec(container, spec).await?;
            while killer.output.next().await.is_some() {}
            self.exec_exit_code(&killer.id).await
        };
        match tokio::time::timeout(within, run).await {
            Ok(Ok(code)) => Ok(code == Some(0)),
            Ok(Err(e)) => Err(e),
            Err(_) => Ok(false),
        }
    }

    /// Sends `signal` (a name such as `TERM` or a number; the caller checks it) to every
    /// process in the container that carries `marker`, and to each one's descendants: a
    /// process group's signal, which also reaches a child that left the group. Returns how
    /// many got it (`0` with signal `0`: none is alive). Bounded by `within`.
    async fn signal_marked(
        &self,
        container: &str,
        marker: &str,
        signal: &str,
        within: Duration,
    ) -> Result<u32> {
        let spec = ExecSpec {
            cmd: vec![
                "sh".into(),
                "-c".into(),
                SIGNAL_MARKED.into(),
                "sh".into(),
                marker.into(),
                signal.into(),
            ],
            env: Vec::new(),
            workdir: "/".into(),
            stdin: false,
            tty: false,
        };
        let run = async {
            let mut out = Vec::new();
            let mut signaller = self.start_exec(container, spec).await?;
            while let Some(chunk) = signaller.output.next().await {
                if let ExecChunk::Stdout(b) = chunk? {
                    out.extend_from_slice(&b);
                }
            }
            Ok(String::from_utf8_lossy(&out).trim().parse().unwrap_or(0))
        };
        tokio::time::timeout(within, run).await.map_err(|_| {
            super::error::BackendError::new(
                super::error::ErrorKind::Unavailable,
                "signalling the processes took too long",
            )
        })?
    }

    /// Changes the size of a TTY exec's terminal.
    async fn resize_exec(&self, exec_id: &str, cols: u16, rows: u16) -> Result<()>;
}

/// Finds the engine that runs a sandbox.
#[async_trait::async_trait]
pub trait Locate: Send + Sync {
    /// The engine, and the container id there, for a stored container id (a service id in
    /// swarm mode). A sandbox that runs nowhere right now is `ErrorKind::Conflict`; one on
    /// an engine sandboxd cannot reach is `ErrorKind::Unsupported`.
    async fn locate(&self, stored: &str) -> Result<(Arc<dyn SandboxIo>, String)>;
}

/// The one engine of a single-engine backend: every sandbox is there, under its own id.
pub struct OneEngine(pub Arc<dyn SandboxIo>);

#[async_trait::async_trait]
impl Locate for OneEngine {
    async fn locate(&self, stored: &str) -> Result<(Arc<dyn SandboxIo>, String)> {
        Ok((self.0.clone(), stored.to_string()))
    }
}
