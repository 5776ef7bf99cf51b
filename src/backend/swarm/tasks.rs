//! What a service's tasks say about it: pure, so the readings are tested here.

use chrono::{DateTime, Utc};

use super::api::TaskView;

/// The task that serves a service now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Serving {
    pub task_id: String,
    pub node_id: Option<String>,
    pub container_id: Option<String>,
    /// Its address on the service's network, without the prefix length.
    pub ip: Option<String>,
}

/// The task that runs (and is meant to), newest first if a move briefly shows two.
pub fn serving(tasks: &[TaskView], network: &str) -> Option<Serving> {
    tasks
        .iter()
        .filter(|t| t.status.state == "running" && t.desired_state == "running")
        .max_by_key(|t| t.status.timestamp)
        .map(|t| Serving {
            task_id: t.id.clone(),
            node_id: t.node_id.clone(),
            container_id: t
                .status
                .container
                .as_ref()
                .and_then(|c| c.container_id.clone()),
            ip: address_on(t, network),
        })
}

/// The task's address on `network` (by name), else on the one network it joined.
fn address_on(t: &TaskView, network: &str) -> Option<String> {
    let attached: Vec<_> = t
        .attachments
        .iter()
        .filter(|a| a.network.spec.name != "ingress")
        .collect();
    let chosen = attached
        .iter()
        .find(|a| a.network.spec.name == network)
        .or_else(|| (attached.len() == 1).then(|| &attached[0]))?;
    let cidr = chosen.addresses.first()?;
    Some(cidr.split('/').next().unwrap_or(cidr).to_string())
}

/// A task on its way to running (Swarm placed it, or will): the service is not lost.
pub fn starting(tasks: &[TaskView]) -> bool {
    const ON_THE_WAY: [&str; 8] = [
        "new",
        "allocated",
        "pending",
        "assigned",
        "accepted",
        "preparing",
        "ready",
        "starting",
    ];
    tasks
        .iter()
        .any(|t| t.desired_state == "running" && ON_THE_WAY.contains(&t.status.state.as_str()))
}

/// How the service's process ended when it stopped on its own (its newest task `failed` or
/// `complete`, with an exit code), while nothing else runs or is on its way. `None` for a
/// task Swarm shut down, orphaned or rejected: that is no crash of the agent.
pub fn exited(tasks: &[TaskView]) -> Option<(i64, DateTime<Utc>)> {
    if serving(tasks, "").is_some() || starting(tasks) {
        return None;
    }
    let newest = tasks.iter().max_by_key(|t| t.status.timestamp)?;
    if !matches!(newest.status.state.as_str(), "failed" | "complete") {
        return None;
    }
    let code = newest.status.container.as_ref()?.exit_code?;
    Some((code, newest.status.timestamp?))
}

/// Why the service's newest task is not running, for a start that gave up on it.
pub fn why_not_running(tasks: &[TaskView]) -> Option<String> {
    let t = tasks.iter().max_by_key(|t| t.status.timestamp)?;
    let err = t.status.err.as_deref().unwrap_or("");
    Some(if err.is_empty() {
        format!("task {} is {}", t.id, t.status.state)
    } else {
        format!("task {} is {}: {err}", t.id, t.status.state)
    })
}

/// The service's task will not run: there was one, and none runs or is on its way now. It
/// was rejected or failed (a missing image, a bind source missing on its node), or Swarm gave
/// up on it (its node went down while the task was assigned there: the scheduler places on
/// a dead node until the manager's heartbeat notices). Waiting longer would not help.
pub fn ended(tasks: &[TaskView]) -> bool {
    !tasks.is_empty() && serving(tasks, "").is_none() && !starting(tasks)
}

#[cfg(test)]
mod tests {
    use super::super::api::{
        AttachmentView, ContainerStatusView, NetworkSpecView, NetworkView, TaskStatusView,
    };
    use super::*;

    fn task(id: &str, state: &str, desired: &str, at: i64, exit: Option<i64>) -> TaskView {
        TaskView {
            id: id.into(),
            service_id: "s".into(),
            node_id: Some("n1".into()),
            status: TaskStatusView {
                timestamp: DateTime::from_timestamp(at, 0),
                state: state.into(),
                err: None,
                container: Some(ContainerStatusView {
                    container_id: Some(format!("c-{id}")),
                    exit_code: exit,
                }),
            },
            desired_state: desired.into(),
            attachments: vec![AttachmentView {
                network: NetworkView {
                    id: "net".into(),
                    spec: NetworkSpecView {
                        name: "sandbox".into(),
                    },
                },
                addresses: vec![format!("10.0.1.{at}/24")],
            }],
        }
    }

    #[test]
    fn the_running_task_serves_at_its_overlay_address() {
        let tasks = [
            task("old", "shutdown", "shutdown", 1, Some(137)),
            task("new", "running", "running", 2, None),
        ];
        let s = serving(&tasks, "sandbox").expect("serving");
        assert_eq!(s.task_id, "new");
        assert_eq!(s.ip.as_deref(), Some("10.0.1.2"));
        assert_eq!(s.container_id.as_deref(), Some("c-new"));
        assert_eq!(exited(&tasks), None);
    }

    #[test]
    fn a_task_told_to_stop_does_not_serve() {
        let tasks = [task("t", "running", "shutdown", 1, None)];
        assert_eq!(serving(&tasks, "sandbox"), None);
    }

    #[test]
    fn a_crash_is_an_exit_with_its_code() {
        let tasks = [task("t", "failed", "shutdown", 5, Some(3))];
        assert_eq!(
            exited(&tasks),
            Some((3, DateTime::from_timestamp(5, 0).unwrap()))
        );
        assert!(ended(&tasks));
    }

    #[test]
    fn a_move_in_progress_is_not_an_exit() {
        let tasks = [
            task("old", "failed", "shutdown", 1, Some(137)),
            task("new", "pending", "running", 2, None),
        ];
        assert!(starting(&tasks));
        assert_eq!(exited(&tasks), None);
        assert!(!ended(&tasks));
    }

    #[test]
    fn a_task_given_up_on_a_lost_node_has_ended_but_none_yet_has_not() {
        // Assigned to a node that then went down: Swarm shuts it down, nothing replaces it.
        let tasks = [task("t", "assigned", "shutdown", 3, None)];
        assert!(ended(&tasks));
        assert_eq!(exited(&tasks), None, "no crash of the agent");
        assert!(!ended(&[]), "no task yet: the orchestrator has not made it");
        assert!(!ended(&[task("t", "running", "running", 1, None)]));
    }

    #[test]
    fn a_task_shut_down_by_swarm_is_no_crash() {
        let tasks = [task("t", "shutdown", "shutdown", 1, Some(0))];
        assert_eq!(exited(&tasks), None);
        let orphaned = [task("t", "orphaned", "running", 1, None)];
        assert_eq!(exited(&orphaned), None);
    }

    #[test]
    fn the_reason_names_the_task_and_its_error() {
        let mut t = task("t", "rejected", "shutdown", 1, None);
        t.status.err = Some("No such image: x".into());
        assert_eq!(
            why_not_running(&[t]).as_deref(),
            Some("task t is rejected: No such image: x")
        );
    }
}
