//! The one read bollard cannot give: tasks with their network attachments. bollard's `Task`
//! model has no `NetworksAttachments`, and that is where a task's overlay address is, so the
//! task list is read as JSON through hyper (the client bollard itself runs on).

use chrono::{DateTime, Utc};
use serde::Deserialize;

use crate::backend::error::{BackendError, ErrorKind, Result};
use crate::backend::raw::RawApi;

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

/// Tasks matching `filters` (the API's `filters` JSON object).
pub async fn tasks(raw: &RawApi, filters: &serde_json::Value) -> Result<Vec<TaskView>> {
    let query = serde_urlencoded::to_string([("filters", filters.to_string())])
        .map_err(|e| other(format!("task filter: {e}")))?;
    let body = raw
        .get("list_tasks", &format!("/{API}/tasks?{query}"))
        .await?;
    serde_json::from_slice(&body)
        .map_err(|e| other(format!("task list is not what the API says: {e}")))
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
