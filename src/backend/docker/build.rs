//! `docker.pull_policy: build`: a missing sandbox image is built from `docker.build_context`
//! (a directory with a Dockerfile), once: concurrent starts wait for the one build, then find
//! the image. A build that fails is reported to every start that waited for it (they retry
//! with their backoff; the next attempt builds again). The build's output is kept for the
//! event log (`take_build_reports`).

use std::sync::Arc;
use std::time::Instant;

use bollard::query_parameters::BuildImageOptionsBuilder;
use futures::StreamExt;

use super::DockerRuntime;
use crate::backend::error::{status_of, BackendError, ErrorKind, Result};

/// Output kept per build for the event log (its tail).
const LOG_TAIL_BYTES: usize = 8 * 1024;

/// One build, for the event log.
#[derive(Debug, Clone)]
pub struct BuildReport {
    pub image: String,
    pub context: String,
    /// `None` when it succeeded.
    pub error: Option<String>,
    /// The last [`LOG_TAIL_BYTES`] of the build output.
    pub log: String,
    pub duration_ms: u64,
}

/// Serialises builds and remembers the last failure.
#[derive(Debug, Default)]
pub struct BuildGate {
    lock: tokio::sync::Mutex<Option<(Instant, String)>>,
    pub(super) reports: std::sync::Mutex<Vec<BuildReport>>,
}

impl DockerRuntime {
    /// Builds `image` from the configured context unless it exists by the time this caller
    /// holds the build lock.
    pub(super) async fn build_once(&self, image: &str) -> Result<()> {
        let context = self
            .build_context
            .clone()
            .ok_or_else(|| build_failed(image, "-", "docker.build_context is not set"))?;
        let waited_from = Instant::now();
        let gate: Arc<BuildGate> = self.builds.clone();
        let mut last_failure = gate.lock.lock().await;
        // Another caller built it (or failed to) while this one waited.
        match self.engine.docker.inspect_image(image).await {
            Ok(_) => return Ok(()),
            Err(e) if status_of(&e) == Some(404) => {}
            Err(e) => return Err(BackendError::engine("inspect_image", e)),
        }
        if let Some((at, message)) = last_failure.as_ref() {
            if *at > waited_from {
                return Err(build_failed(image, context.display(), message));
            }
        }
        let started = Instant::now();
        tracing::info!(image, context = %context.display(), "building the sandbox image (pull policy build)");
        let result = self.build(image, &context).await;
        let (error, log) = match &result {
            Ok(log) => (None, log.clone()),
            Err((message, log)) => (Some(message.clone()), log.clone()),
        };
        let report = BuildReport {
            image: image.to_string(),
            context: context.display().to_string(),
            error: error.clone(),
            log: tail(&log),
            duration_ms: started.elapsed().as_millis() as u64,
        };
        if let Ok(mut reports) = gate.reports.lock() {
            reports.push(report);
        }
        match error {
            None => {
                *last_failure = None;
                Ok(())
            }
            Some(message) => {
                *last_failure = Some((Instant::now(), message.clone()));
                Err(build_failed(image, context.display(), message))
            }
        }
    }

    /// Tars the context and runs the build; the output either way.
    async fn build(
        &self,
        image: &str,
        context: &std::path::Path,
    ) -> Result<String, (String, String)> {
        let mut tar = tokio_tar::Builder::new(Vec::new());
        tar.follow_symlinks(false);
        let archive = async {
            tar.append_dir_all(".", context).await?;
            tar.into_inner().await
        }
        .await
        .map_err(|e| (format!("cannot read the build context: {e}"), String::new()))?;
        // `pull` stays unset: a `FROM` image is taken from the engine, never from a registry.
        let options = BuildImageOptionsBuilder::new()
            .dockerfile("Dockerfile")
            .t(image)
            .rm(true)
            .forcerm(true)
            .build();
        let mut stream = Box::pin(self.engine.docker.build_image(
            options,
            None,
            Some(bollard::body_full(archive.into())),
        ));
        let mut log = String::new();
        while let Some(item) = stream.next().await {
            match item {
                Ok(info) => {
                    if let Some(line) = info.stream {
                        log.push_str(&line);
                    }
                    if let Some(detail) = info.error_detail {
                        let message = detail.message.unwrap_or_else(|| "build failed".into());
                        return Err((message, log));
                    }
                }
                Err(e) => return Err((e.to_string(), log)),
            }
        }
        Ok(log)
    }
}

/// A failed build, as the start that waited for it reports it.
fn build_failed(
    image: &str,
    context: impl std::fmt::Display,
    message: impl std::fmt::Display,
) -> BackendError {
    BackendError::new(
        ErrorKind::Other,
        format!("building image `{image}` from {context} failed: {message}"),
    )
}

fn tail(log: &str) -> String {
    if log.len() <= LOG_TAIL_BYTES {
        return log.to_string();
    }
    let mut cut = log.len() - LOG_TAIL_BYTES;
    while !log.is_char_boundary(cut) {
        cut += 1;
    }
    format!("…{}", &log[cut..])
}
