//! The data plane's engine calls: exec (with a kill of everything an exec started), and the
//! archive API for files. Kept apart from the controller's connection: the data plane
//! connects on first use, and after a failed call connects again on the next one, so a
//! restarted engine is picked up without a restart of sandboxd.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bollard::container::LogOutput;
use bollard::errors::Error as BollardError;
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bollard::query_parameters::{
    ContainerArchiveInfoOptionsBuilder, DownloadFromContainerOptionsBuilder,
    UploadToContainerOptionsBuilder,
};
use bollard::Docker;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::io::AsyncWrite;
use tokio::sync::Mutex;

use super::{status_of, DockerError, EngineAddress};
use crate::config::DockerSettings;

/// The variable every exec's processes inherit; a timeout kills every process carrying it.
pub const EXEC_MARKER_VAR: &str = "SANDBOXD_EXEC_ID";

/// Kills every process whose environment carries the marker (`$1`), and every descendant of
/// one (a process that rewrites its title can overwrite its environment), again until none is
/// left: they are stopped first, so none can fork while the others die. Needs only `sh`,
/// `grep`, `kill` and `read` (busybox has them). Not `grep -F`: busybox's stops at the first
/// NUL of `environ`; the marker has no regex metacharacters. PID 1 (the sandbox's own
/// process) is never a descendant of an exec, and the kernel ignores SIGKILL to it anyway.
const KILL_MARKED: &str = r#"m="$1"; i=0
while [ $i -lt 50 ]; do
  marked=" "
  for d in /proc/[0-9]*; do
    p=${d#/proc/}
    [ "$p" = "$$" ] && continue
    grep -q "$m" "$d/environ" 2>/dev/null && marked="$marked$p "
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
  [ "$marked" = " " ] && exit 0
  for p in $marked; do kill -STOP "$p" 2>/dev/null; done
  for p in $marked; do kill -9 "$p" 2>/dev/null; done
  i=$((i+1))
done
exit 1"#;

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
}

/// A started exec: its output, and its stdin when asked for.
pub struct StartedExec {
    pub id: String,
    pub output: Pin<Box<dyn Stream<Item = Result<ExecChunk, DockerError>> + Send>>,
    pub input: Option<Pin<Box<dyn AsyncWrite + Send>>>,
}

/// A path's kind and size, as the engine reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathStat {
    pub size: i64,
    pub is_dir: bool,
    pub is_symlink: bool,
}

/// Go's `os.FileMode` bits, as the engine sends them.
const MODE_DIR: u32 = 1 << 31;
const MODE_SYMLINK: u32 = 1 << 27;

/// The data plane's link to one engine; cheap to clone.
#[derive(Clone)]
pub struct SandboxIo {
    engine: EngineAddress,
    docker: Arc<Mutex<Option<Docker>>>,
}

impl std::fmt::Debug for SandboxIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxIo")
            .field("engine", &self.engine.base_url)
            .finish()
    }
}

impl SandboxIo {
    /// The engine at `docker.base_url`.
    pub fn new(settings: &DockerSettings) -> Self {
        Self::at(EngineAddress {
            base_url: settings.base_url.clone(),
            tls: None,
            timeout: Duration::from_secs(settings.timeout_seconds),
        })
    }

    /// Another engine (a swarm node's).
    pub fn at(engine: EngineAddress) -> Self {
        Self {
            engine,
            docker: Arc::default(),
        }
    }

    /// The connection, made (and the API version negotiated) on first use.
    async fn client(&self) -> Result<Docker, DockerError> {
        let mut slot = self.docker.lock().await;
        if let Some(d) = slot.as_ref() {
            return Ok(d.clone());
        }
        let docker = self.engine.connect().await?;
        *slot = Some(docker.clone());
        Ok(docker)
    }

    /// Maps a failed call, and drops the connection when the engine did not answer.
    async fn failed(&self, op: &'static str, e: BollardError) -> DockerError {
        let e = DockerError::api(op)(e);
        if e.unavailable() {
            *self.docker.lock().await = None;
        }
        e
    }

    /// Creates and starts an exec, attached.
    pub async fn start_exec(
        &self,
        container: &str,
        spec: ExecSpec,
    ) -> Result<StartedExec, DockerError> {
        let docker = self.client().await?;
        let options = CreateExecOptions {
            attach_stdin: Some(spec.stdin),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            tty: Some(false),
            env: Some(spec.env),
            cmd: Some(spec.cmd),
            working_dir: Some(spec.workdir),
            ..Default::default()
        };
        let created = match docker.create_exec(container, options).await {
            Ok(c) => c,
            Err(e) => return Err(self.failed("create_exec", e).await),
        };
        let started = match docker
            .start_exec(
                &created.id,
                Some(StartExecOptions {
                    detach: false,
                    tty: false,
                    output_capacity: Some(64 * 1024),
                }),
            )
            .await
        {
            Ok(s) => s,
            Err(e) => return Err(self.failed("start_exec", e).await),
        };
        match started {
            StartExecResults::Attached { output, input } => Ok(StartedExec {
                id: created.id,
                output: Box::pin(output.filter_map(|item| async move {
                    match item {
                        Ok(LogOutput::StdOut { message }) | Ok(LogOutput::Console { message }) => {
                            Some(Ok(ExecChunk::Stdout(message)))
                        }
                        Ok(LogOutput::StdErr { message }) => Some(Ok(ExecChunk::Stderr(message))),
                        Ok(LogOutput::StdIn { .. }) => None,
                        Err(e) => Some(Err(DockerError::api("exec_output")(e))),
                    }
                })),
                input: spec.stdin.then_some(input),
            }),
            StartExecResults::Detached => Err(DockerError::Unexpected {
                op: "start_exec",
                message: "the engine detached an attached exec".into(),
            }),
        }
    }

    /// Waits (up to `within`) until the engine reports the exec's process started (or ended):
    /// the attach answer can come before the process exists, and a kill must not run first.
    pub async fn wait_exec_started(&self, exec_id: &str, within: Duration) {
        let Ok(docker) = self.client().await else {
            return;
        };
        let deadline = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < deadline {
            match docker.inspect_exec(exec_id).await {
                Ok(i) if i.pid.is_some_and(|p| p > 0) || i.exit_code.is_some() => return,
                Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                Err(_) => return,
            }
        }
    }

    /// The exit code of a finished exec (`None` while it runs).
    pub async fn exec_exit_code(&self, exec_id: &str) -> Result<Option<i64>, DockerError> {
        let docker = self.client().await?;
        match docker.inspect_exec(exec_id).await {
            Ok(i) if i.running == Some(true) => Ok(None),
            Ok(i) => Ok(i.exit_code),
            Err(e) => Err(self.failed("inspect_exec", e).await),
        }
    }

    /// Kills every process in the container that carries `marker` in its environment: the
    /// exec's process and everything it started, however it detached (`setsid`, double
    /// fork, ignoring SIGTERM). Returns whether none is left. Bounded by `within`.
    pub async fn kill_marked(
        &self,
        container: &str,
        marker: &str,
        within: Duration,
    ) -> Result<bool, DockerError> {
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

    /// A path's kind and size; `None` when it does not exist.
    pub async fn stat(&self, container: &str, path: &str) -> Result<Option<PathStat>, DockerError> {
        let docker = self.client().await?;
        let options = ContainerArchiveInfoOptionsBuilder::new().path(path).build();
        match docker
            .get_container_archive_info(container, Some(options))
            .await
        {
            Ok(s) => Ok(Some(PathStat {
                size: s.size,
                is_dir: s.file_mode & MODE_DIR != 0,
                is_symlink: s.file_mode & MODE_SYMLINK != 0,
            })),
            Err(e) if status_of(&e) == Some(404) => Ok(None),
            Err(e) => Err(self.failed("stat_path", e).await),
        }
    }

    /// Extracts a tar archive into the directory `dir` of the container.
    pub async fn put_archive(
        &self,
        container: &str,
        dir: &str,
        tar: Vec<u8>,
    ) -> Result<(), DockerError> {
        let docker = self.client().await?;
        let options = UploadToContainerOptionsBuilder::new()
            .path(dir)
            .no_overwrite_dir_non_dir("true")
            .build();
        match docker
            .upload_to_container(container, Some(options), bollard::body_full(tar.into()))
            .await
        {
            Ok(()) => Ok(()),
            Err(e) => Err(self.failed("put_archive", e).await),
        }
    }

    /// A tar archive of `path` (a file, or a directory with everything under it), streamed.
    pub async fn get_archive(
        &self,
        container: &str,
        path: &str,
    ) -> Result<impl Stream<Item = Result<Bytes, DockerError>> + Send + 'static, DockerError> {
        let docker = self.client().await?;
        let options = DownloadFromContainerOptionsBuilder::new()
            .path(path)
            .build();
        let mut stream = Box::pin(docker.download_from_container(container, Some(options)));
        // The first item carries the engine's answer (404, 403, …): report it as an error of
        // the call, not of the stream.
        let first = match stream.next().await {
            Some(Ok(b)) => Some(b),
            Some(Err(e)) => return Err(self.failed("get_archive", e).await),
            None => None,
        };
        let rest = stream.map(|r| r.map_err(DockerError::api("get_archive")));
        Ok(futures::stream::iter(first.map(Ok)).chain(rest))
    }
}
