//! The data plane on Podman: the docker backend's [`EngineIo`], with Podman 4.3's
//! differences made to answer as dockerd does, so the data plane's rules hold unchanged:
//! - an archive GET of a symlink follows it (as root, inside the container): the path is
//!   stat'ed first, and a symlink is answered with a tar of the link itself, whose target
//!   the data plane checks against the mounts before it reads anything;
//! - the stat of a symlink whose target Podman cannot resolve from the host (`/proc/...`, a
//!   dangling link) is a 404 that still carries the link's stat header: it is read from
//!   there, so such a link is a symlink, as on dockerd, not a missing path;
//! - an archive PUT into a missing directory creates it (root-owned): the directory is
//!   stat'ed first, and a missing one is `NoSuchPath`, as dockerd's 404;
//! - an exec's inspect shows exit code 0 before it ran: "started" is a pid, running, or
//!   removable;
//! - an exec in a stopped container is a 500: the container's state makes it `Conflict`.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;

use crate::backend::docker::io::EngineIo;
use crate::backend::error::{BackendError, ErrorKind, Result};
use crate::backend::io::{ExecSpec, PathStat, SandboxIo, StartedExec};
use crate::backend::raw::RawApi;

#[derive(Clone)]
pub struct PodmanIo {
    inner: EngineIo,
    raw: Arc<RawApi>,
}

impl std::fmt::Debug for PodmanIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodmanIo")
            .field("inner", &self.inner)
            .finish()
    }
}

impl PodmanIo {
    pub fn new(inner: EngineIo, raw: Arc<RawApi>) -> Self {
        Self { inner, raw }
    }

    /// The symlink at `path` that Podman's stat answered 404 for, read from the stat header
    /// it sends anyway; `None` when the path is really missing.
    async fn unresolvable_link(&self, container: &str, path: &str) -> Result<Option<PathStat>> {
        let query = serde_urlencoded::to_string([("path", path)])
            .map_err(|e| BackendError::new(ErrorKind::Other, format!("stat query: {e}")))?;
        let (_, headers) = self
            .raw
            .head(
                "stat_path",
                &format!("/v1.41/containers/{container}/archive?{query}"),
            )
            .await?;
        Ok(headers
            .get("X-Docker-Container-Path-Stat")
            .and_then(|h| link_of_stat_header(h.as_bytes())))
    }
}

/// The mode bit of a symlink in an engine's path stat (Go's `os.ModeSymlink`).
const MODE_SYMLINK: u32 = 1 << 27;

/// A path stat header (base64 JSON) that describes a symlink, as a [`PathStat`].
fn link_of_stat_header(header: &[u8]) -> Option<PathStat> {
    #[derive(serde::Deserialize)]
    struct Stat {
        mode: u32,
        #[serde(rename = "linkTarget", default)]
        link_target: String,
    }
    let json = base64::engine::general_purpose::STANDARD
        .decode(header)
        .ok()?;
    let stat: Stat = serde_json::from_slice(&json).ok()?;
    (stat.mode & MODE_SYMLINK != 0 && !stat.link_target.is_empty()).then_some(PathStat {
        size: 0,
        is_dir: false,
        is_symlink: true,
        link_target: stat.link_target,
    })
}

/// A tar holding one symlink entry, `name` → `target`: what dockerd answers for a symlink.
async fn symlink_tar(name: &str, target: &str) -> Result<Vec<u8>> {
    let mut header = tokio_tar::Header::new_gnu();
    header.set_entry_type(tokio_tar::EntryType::Symlink);
    header.set_size(0);
    header.set_mode(0o777);
    let mut tar = tokio_tar::Builder::new(Vec::new());
    let built = async {
        header.set_link_name(target)?;
        tar.append_data(&mut header, name, &[][..]).await?;
        tar.into_inner().await
    }
    .await;
    built.map_err(|e| BackendError::new(ErrorKind::Other, format!("building a symlink tar: {e}")))
}

#[async_trait::async_trait]
impl SandboxIo for PodmanIo {
    async fn start_exec(&self, container: &str, spec: ExecSpec) -> Result<StartedExec> {
        match self.inner.start_exec(container, spec).await {
            Err(e) if e.kind() == ErrorKind::Other => match self.inner.running(container).await {
                Ok(false) => Err(e.with_kind(ErrorKind::Conflict)),
                _ => Err(e),
            },
            other => other,
        }
    }

    async fn wait_exec_started(&self, exec_id: &str, within: Duration) {
        let Ok(docker) = self.inner.client().await else {
            return;
        };
        let deadline = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < deadline {
            match docker.inspect_exec(exec_id).await {
                Ok(i)
                    if i.pid.is_some_and(|p| p > 0)
                        || i.running == Some(true)
                        || i.can_remove == Some(true) =>
                {
                    return
                }
                Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                Err(_) => return,
            }
        }
    }

    async fn exec_exit_code(&self, exec_id: &str) -> Result<Option<i64>> {
        self.inner.exec_exit_code(exec_id).await
    }

    async fn resize_exec(&self, exec_id: &str, cols: u16, rows: u16) -> Result<()> {
        self.inner.resize_exec(exec_id, cols, rows).await
    }

    async fn stat(&self, container: &str, path: &str) -> Result<Option<PathStat>> {
        match self.inner.stat(container, path).await? {
            Some(s) => Ok(Some(s)),
            None => self.unresolvable_link(container, path).await,
        }
    }

    async fn put_archive(&self, container: &str, dir: &str, tar: Vec<u8>) -> Result<()> {
        match self.inner.stat(container, dir).await? {
            Some(_) => self.inner.put_archive(container, dir, tar).await,
            None => Err(BackendError::new(
                ErrorKind::NoSuchPath,
                format!("no such directory: {dir}"),
            )),
        }
    }

    async fn get_archive(
        &self,
        container: &str,
        path: &str,
    ) -> Result<BoxStream<'static, Result<Bytes>>> {
        if let Some(s) = self.stat(container, path).await? {
            if s.is_symlink {
                let name = path.rsplit('/').next().unwrap_or(path);
                let tar = symlink_tar(name, &s.link_target).await?;
                return Ok(futures::stream::iter([Ok(Bytes::from(tar))]).boxed());
            }
        }
        self.inner.get_archive(container, path).await
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    #[test]
    fn a_stat_header_of_a_link_is_read_as_the_link() {
        // Podman 4.3's 404 header for `env -> /proc/self/environ`.
        let header = b"eyJuYW1lIjoiZW52aXJvbiIsInNpemUiOjE4LCJtb2RlIjoxMzQyMTgyMzksIm10aW1lIjoiMjAyNi0xMi0wNlQyMzoyMjo1Ni4wNjc4MTYyNjlaIiwiaXNEaXIiOmZhbHNlLCJsaW5rVGFyZ2V0IjoiL3Byb2Mvc2VsZi9lbnZpcm9uIn0=";
        let stat = super::link_of_stat_header(header).expect("a link");
        assert!(stat.is_symlink);
        assert_eq!(stat.link_target, "/proc/self/environ");
        // A plain file's stat (mode 0644) is no link; nor is garbage.
        let plain = base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            br#"{"name":"f","size":1,"mode":420,"linkTarget":""}"#,
        );
        assert!(super::link_of_stat_header(plain.as_bytes()).is_none());
        assert!(super::link_of_stat_header(b"%%%").is_none());
    }

    #[tokio::test]
    async fn a_symlink_is_answered_as_the_link_itself() {
        let tar = super::symlink_tar("leak", "/tmp/secret")
            .await
            .expect("tar");
        let mut archive = tokio_tar::Archive::new(&tar[..]);
        let mut entries = archive.entries().expect("entries");
        let first = entries.next().await.expect("one entry").expect("readable");
        assert!(first.header().entry_type().is_symlink());
        assert_eq!(
            first.link_name().expect("link").expect("target").to_str(),
            Some("/tmp/secret")
        );
        assert_eq!(first.path().expect("path").to_str(), Some("leak"));
        assert!(entries.next().await.is_none());
    }
}
