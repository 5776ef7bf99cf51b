//! The one read bollard cannot give: tasks with their network attachments. bollard's `Task`
//! model has no `NetworksAttachments`, and that is where a task's overlay address is, so the
//! task list is read as JSON through hyper (the client bollard itself runs on).

use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;

use crate::backend::error::{BackendError, ErrorKind, Result};

/// The API version this reads (Docker 20.10 and later speak it).
const API: &str = "v1.41";

/// A task as the manager reports it (the fields sandboxd reads).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct TaskView {
    #[serde(rename = "ID")]
    pub id: String,
    #[serde(rename = "ServiceID", default)]
    pub service_id: String,
    #[serde(rename = "NodeID", default)]
    pub node_id: Option<String>,
    #[serde(rename = "Status", default)]
    pub status: TaskStatusView,
    #[serde(rename = "DesiredState", default)]
    pub desired_state: String,
    #[serde(rename = "NetworksAttachments", default)]
    pub attachments: Vec<AttachmentView>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct TaskStatusView {
    #[serde(rename = "Timestamp", default)]
    pub timestamp: Option<DateTime<Utc>>,
    #[serde(rename = "State", default)]
    pub state: String,
    #[serde(rename = "Err", default)]
    pub err: Option<String>,
    #[serde(rename = "ContainerStatus", default)]
    pub container: Option<ContainerStatusView>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct ContainerStatusView {
    #[serde(rename = "ContainerID", default)]
    pub container_id: Option<String>,
    #[serde(rename = "ExitCode", default)]
    pub exit_code: Option<i64>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct AttachmentView {
    #[serde(rename = "Network", default)]
    pub network: NetworkView,
    /// CIDR notation: `10.0.1.5/24`.
    #[serde(rename = "Addresses", default)]
    pub addresses: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct NetworkView {
    #[serde(rename = "ID", default)]
    pub id: String,
    #[serde(rename = "Spec", default)]
    pub spec: NetworkSpecView,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct NetworkSpecView {
    #[serde(rename = "Name", default)]
    pub name: String,
}

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

/// A read-only JSON link to the manager's engine.
pub struct RawApi {
    transport: Transport,
    timeout: Duration,
}

impl RawApi {
    /// `unix:///path`, `tcp://host:port` or `http://host:port` (config validation refuses
    /// the rest in swarm mode).
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
                format!(
                    "swarm: the manager's engine must be a unix://, tcp:// or http:// address, \
                     not {base_url}"
                ),
            ));
        };
        Ok(Self { transport, timeout })
    }

    /// Tasks matching `filters` (the API's `filters` JSON object).
    pub async fn tasks(&self, filters: &serde_json::Value) -> Result<Vec<TaskView>> {
        let query = serde_urlencoded::to_string([("filters", filters.to_string())])
            .map_err(|e| other(format!("task filter: {e}")))?;
        let body = self.get(&format!("/{API}/tasks?{query}")).await?;
        serde_json::from_slice(&body)
            .map_err(|e| other(format!("task list is not what the API says: {e}")))
    }

    async fn get(&self, path_and_query: &str) -> Result<Bytes> {
        let unavailable = |message: String| {
            BackendError::new(
                ErrorKind::Unavailable,
                format!("swarm manager unavailable: GET tasks: {message}"),
            )
        };
        let request = async {
            let response = match &self.transport {
                Transport::Unix { socket, client } => {
                    let uri: hyper::Uri = hyperlocal::Uri::new(socket, path_and_query).into();
                    client.get(uri).await
                }
                Transport::Tcp { base, client } => {
                    let uri: hyper::Uri = format!("{base}{path_and_query}")
                        .parse()
                        .map_err(|e| unavailable(format!("{e}")))?;
                    client.get(uri).await
                }
            }
            .map_err(|e| unavailable(e.to_string()))?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| unavailable(e.to_string()))?
                .to_bytes();
            if !status.is_success() {
                return Err(other(format!(
                    "GET tasks answered {status}: {}",
                    String::from_utf8_lossy(&body)
                )));
            }
            Ok(body)
        };
        tokio::time::timeout(self.timeout, request)
            .await
            .map_err(|_| unavailable(format!("no answer within {:?}", self.timeout)))?
    }
}

/// An answer that is not what the API says.
fn other(message: String) -> BackendError {
    BackendError::new(ErrorKind::Other, format!("swarm: {message}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_reads_with_its_overlay_address() {
        let json = r#"[{"ID":"t1","ServiceID":"s1","NodeID":"n1","DesiredState":"running",
            "Status":{"Timestamp":"2026-11-25T07:00:00.123456789Z","State":"running",
              "ContainerStatus":{"ContainerID":"c1","PID":42,"ExitCode":0}},
            "NetworksAttachments":[{"Network":{"ID":"net1","Spec":{"Name":"sandbox"}},
              "Addresses":["10.0.1.5/24"]}]}]"#;
        let tasks: Vec<TaskView> = serde_json::from_str(json).expect("parses");
        assert_eq!(tasks[0].attachments[0].addresses, vec!["10.0.1.5/24"]);
        assert_eq!(tasks[0].attachments[0].network.spec.name, "sandbox");
        assert_eq!(
            tasks[0]
                .status
                .container
                .as_ref()
                .and_then(|c| c.container_id.as_deref()),
            Some("c1")
        );
        assert!(tasks[0].status.timestamp.is_some());
    }

    #[test]
    fn a_pending_task_has_no_node_or_container() {
        let json = r#"[{"ID":"t1","ServiceID":"s1","DesiredState":"running",
            "Status":{"State":"pending","Err":"no suitable node"}}]"#;
        let tasks: Vec<TaskView> = serde_json::from_str(json).expect("parses");
        assert_eq!(tasks[0].node_id, None);
        assert_eq!(tasks[0].status.err.as_deref(), Some("no suitable node"));
    }
}
