//! The data plane's calls on one engine through its exec and archive API (a Docker engine,
//! Podman's compatible API, or a swarm node's engine). Kept apart from the controller's
//! connection: it connects on first use, and after a failed call connects again on the next
//! one, so a restarted engine is picked up without a restart of sandboxd.

use std::sync::Arc;
use std::time::Duration;

use bollard::container::LogOutput;
use bollard::errors::Error as BollardError;
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bollard::query_parameters::{
    ContainerArchiveInfoOptionsBuilder, DownloadFromContainerOptionsBuilder,
    InspectContainerOptions, ResizeExecOptionsBuilder, UploadToContainerOptionsBuilder,
};
use bollard::Docker;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use tokio::sync::Mutex;

use crate::backend::engine::EngineAddress;
use crate::backend::error::{status_of, BackendError, ErrorKind, Result};
use crate::backend::io::{ExecChunk, ExecSpec, PathStat, SandboxIo, StartedExec};

/// Go's `os.FileMode` bits, as the engine sends them.
const MODE_DIR: u32 = 1 << 31;
const MODE_SYMLINK: u32 = 1 << 27;

/// The data plane's link to one engine; cheap to clone.
#[derive(Clone)]
pub struct EngineIo {
    engine: EngineAddress,
    docker: Arc<Mutex<Option<Docker>>>,
}

impl std::fmt::Debug for EngineIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineIo")
            .field("engine", &self.engine.base_url)
            .finish()
    }
}

impl EngineIo {
    pub fn at(engine: EngineAddress) -> Self {
        Self {
            engine,
            docker: Arc::default(),
        }
    }

    /// Whether the container runs.
    pub async fn running(&self, container: &str) -> Result<bool> {
        let docker = self.client().await?;
        match docker
            .inspect_container(container, None::<InspectContainerOptions>)
            .await
        {
            Ok(i) => Ok(i.state.and_then(|s| s.running).unwrap_or(false)),
            Err(e) => Err(self.failed("inspect_container", e).await),
        }
    }

    /// The connection, made (and the API version negotiated) on first use.
    pub(crate) async fn client(&self) -> Result<Docker> {
        let mut slot = self.docker.lock().await;
        if let Some(d) = slot.as_ref() {
            return Ok(d.clone());
        }
        let docker = self.engine.connect().await?;
        *slot = Some(docker.clone());
        Ok(docker)
    }

    /// Maps a failed call, and drops the connection when the engine did not answer.
    async fn failed(&self, op: &'static str, e: BollardError) -> BackendError {
        let e = BackendError::engine(op, e);
        if e.unavailable() {
            *self.docker.lock().await = None;
        }
        e
    }

    /// A 404 from an archive call names the container or the path: the container's own
    /// inspect tells which (a path is missing only in a container that exists).
    async fn missing(&self, op: &'static str, container: &str, e: BollardError) -> BackendError {
        let e = self.failed(op, e).await;
        if e.kind() != ErrorKind::NotFound {
            return e;
        }
        let Ok(docker) = self.client().await else {
            return e;
        };
        match docker
            .inspect_container(container, None::<InspectContainerOptions>)
            .await
        {
            Ok(_) => e.with_kind(ErrorKind::NoSuchPath),
            Err(_) => e,
        }
    }
}

#[async_trait::async_trait]
impl SandboxIo for EngineIo {
    async fn start_exec(&self, container: &str, spec: ExecSpec) -> Result<StartedExec> {
        let docker = self.client().await?;
        let options = CreateExecOptions {
            attach_stdin: Some(spec.stdin),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            tty: Some(spec.tty),
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
                    tty: spec.tty,
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
                        Err(e) => Some(Err(BackendError::engine("exec_output", e))),
                    }
                })),
                input: spec.stdin.then_some(input),
            }),
            StartExecResults::Detached => Err(BackendError::new(
                ErrorKind::Other,
                "docker start_exec: the engine detached an attached exec",
            )),
        }
    }

    async fn wait_exec_started(&self, exec_id: &str, within: Duration) {
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

    async fn exec_exit_code(&self, exec_id: &str) -> Result<Option<i64>> {
        let docker = self.client().await?;
        match docker.inspect_exec(exec_id).await {
            Ok(i) if i.running == Some(true) => Ok(None),
            Ok(i) => Ok(i.exit_code),
            Err(e) => Err(self.failed("inspect_exec", e).await),
        }
    }

    async fn resize_exec(&self, exec_id: &str, cols: u16, rows: u16) -> Result<()> {
        let docker = self.client().await?;
        let options = ResizeExecOptionsBuilder::new()
            .w(i32::from(cols))
            .h(i32::from(rows))
            .build();
        match docker.resize_exec(exec_id, options).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.failed("resize_exec", e).await),
        }
    }

    async fn stat(&self, container: &str, path: &str) -> Result<Option<PathStat>> {
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
                link_target: s.link_target,
            })),
            Err(e) if status_of(&e) == Some(404) => {
                match self.missing("stat_path", container, e).await {
                    e if e.kind() == ErrorKind::NoSuchPath => Ok(None),
                    e => Err(e),
                }
            }
            Err(e) => Err(self.failed("stat_path", e).await),
        }
    }

    async fn put_archive(&self, container: &str, dir: &str, tar: Vec<u8>) -> Result<()> {
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
            Err(e) => Err(self.missing("put_archive", container, e).await),
        }
    }

    async fn get_archive(
        &self,
        container: &str,
        path: &str,
    ) -> Result<BoxStream<'static, Result<Bytes>>> {
        let docker = self.client().await?;
        let options = DownloadFromContainerOptionsBuilder::new()
            .path(path)
            .build();
        let mut stream = Box::pin(docker.download_from_container(container, Some(options)));
        // The first item carries the engine's answer (404, 403, …): report it as an error of
        // the call, not of the stream.
        let first = match stream.next().await {
            Some(Ok(b)) => Some(b),
            Some(Err(e)) => return Err(self.missing("get_archive", container, e).await),
            None => None,
        };
        let rest = stream.map(|r| r.map_err(BackendError::from_engine("get_archive")));
        Ok(futures::stream::iter(first.map(Ok)).chain(rest).boxed())
    }
}
