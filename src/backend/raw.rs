//! A plain JSON GET on an engine's API, for the reads bollard's models cannot give: a swarm
//! task's network attachments, a Podman network's bridge (libpod). Through hyper, the client
//! bollard itself runs on.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::error::{BackendError, ErrorKind, Result};
use crate::metrics::Metrics;

enum Transport {
    Unix {
        socket: String,
        client: Client<hyperlocal::UnixConnector, Empty<Bytes>>,
    },
    Tcp {
        base: String,
        client: Client<HttpConnector, Empty<Bytes>>,
    },
}

/// A read-only link to an engine.
pub struct RawApi {
    transport: Transport,
    timeout: Duration,
    /// Where calls are counted and timed (`sandboxd_docker_call_seconds`), when given.
    metrics: Option<Arc<Metrics>>,
}

impl RawApi {
    /// `unix:///path`, `tcp://host:port` or `http://host:port` (config validation refuses
    /// the rest where this is used).
    pub fn new(base_url: &str, timeout: Duration) -> Result<Self> {
        let transport = if let Some(socket) = base_url.strip_prefix("unix://") {
            Transport::Unix {
                socket: socket.to_string(),
                client: Client::builder(TokioExecutor::new()).build(hyperlocal::UnixConnector),
            }
        } else if let Some(rest) = base_url
            .strip_prefix("tcp://")
            .or_else(|| base_url.strip_prefix("http://"))
        {
            Transport::Tcp {
                base: format!("http://{}", rest.trim_end_matches('/')),
                client: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
            }
        } else {
            return Err(BackendError::new(
                ErrorKind::Refused,
                format!("the engine must be a unix://, tcp:// or http:// address, not {base_url}"),
            ));
        };
        Ok(Self {
            transport,
            timeout,
            metrics: None,
        })
    }

    /// Counts and times every call in `metrics`, as bollard's calls are (a 404 is an
    /// answer, not an engine error).
    pub fn metered(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The body of a successful GET; a 404 is `NotFound`, no answer `Unavailable`.
    /// `operation` names the call in the metrics.
    pub async fn get(&self, operation: &'static str, path_and_query: &str) -> Result<Bytes> {
        let (status, _, body) = self
            .send(operation, hyper::Method::GET, path_and_query)
            .await?;
        if !status.is_success() {
            let kind = match status.as_u16() {
                404 => ErrorKind::NotFound,
                _ => ErrorKind::Other,
            };
            return Err(BackendError::new(
                kind,
                format!(
                    "GET {path_and_query} answered {status}: {}",
                    String::from_utf8_lossy(&body)
                ),
            ));
        }
        Ok(body)
    }

    /// A HEAD's status and headers, whatever the status: some answers carry what they say in
    /// a header even on a 404 (Podman's archive stat of a symlink it cannot follow).
    pub async fn head(
        &self,
        operation: &'static str,
        path_and_query: &str,
    ) -> Result<(hyper::StatusCode, hyper::HeaderMap)> {
        let (status, headers, _) = self
            .send(operation, hyper::Method::HEAD, path_and_query)
            .await?;
        Ok((status, headers))
    }

    async fn send(
        &self,
        operation: &'static str,
        method: hyper::Method,
        path_and_query: &str,
    ) -> Result<(hyper::StatusCode, hyper::HeaderMap, Bytes)> {
        let started = std::time::Instant::now();
        let answer = self.exchange(method, path_and_query).await;
        if let Some(metrics) = &self.metrics {
            let ok = answer
                .as_ref()
                .is_ok_and(|(status, ..)| status.is_success() || status.as_u16() == 404);
            metrics.docker_call(operation, ok, started.elapsed());
        }
        answer
    }

    async fn exchange(
        &self,
        method: hyper::Method,
        path_and_query: &str,
    ) -> Result<(hyper::StatusCode, hyper::HeaderMap, Bytes)> {
        let unavailable = |message: String| {
            BackendError::new(
                ErrorKind::Unavailable,
                format!("docker engine unavailable: {method} {path_and_query}: {message}"),
            )
        };
        let request = async {
            let build = |uri: hyper::Uri| {
                hyper::Request::builder()
                    .method(method.clone())
                    .uri(uri)
                    .body(Empty::<Bytes>::new())
                    .map_err(|e| unavailable(e.to_string()))
            };
            let response = match &self.transport {
                Transport::Unix { socket, client } => {
                    let uri: hyper::Uri = hyperlocal::Uri::new(socket, path_and_query).into();
                    client.request(build(uri)?).await
                }
                Transport::Tcp { base, client } => {
                    let uri: hyper::Uri = format!("{base}{path_and_query}")
                        .parse()
                        .map_err(|e| unavailable(format!("{e}")))?;
                    client.request(build(uri)?).await
                }
            }
            .map_err(|e| unavailable(e.to_string()))?;
            let (parts, body) = response.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| unavailable(e.to_string()))?
                .to_bytes();
            Ok((parts.status, parts.headers, body))
        };
        tokio::time::timeout(self.timeout, request)
            .await
            .map_err(|_| unavailable(format!("no answer within {:?}", self.timeout)))?
    }
}
