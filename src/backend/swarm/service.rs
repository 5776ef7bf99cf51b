//! The service sandboxd creates for a session: the docker backend's container, as a
//! one-replica Swarm service. Pure, so what reaches the manager is tested here.

use bollard::models::{
    EndpointSpec, EndpointSpecModeEnum, NetworkAttachmentConfig, ServiceSpec, ServiceSpecMode,
    ServiceSpecModeReplicated, TaskSpec, TaskSpecContainerSpec, TaskSpecPlacement,
    TaskSpecResources, TaskSpecRestartPolicy, TaskSpecRestartPolicyConditionEnum,
};

use crate::backend::engine::bind_mounts;
use crate::backend::hardening::Translated;
use crate::backend::labels;
use crate::backend::StartRequest;
use crate::domain::{ChatId, SessionId};

/// The session's service name: deterministic (a start retried after a crash collides with
/// the service the first attempt made), and a DNS label (at most 63 characters).
pub fn service_name(chat_id: ChatId, session_id: SessionId) -> String {
    let session = session_id.0.simple().to_string();
    format!("sbx-{}-{}", chat_id.0.simple(), &session[..8])
}

/// Fixed parts of every service.
#[derive(Debug, Clone)]
pub struct ServiceDefaults<'a> {
    pub instance: &'a str,
    pub stop_grace_seconds: u64,
}

/// The service for a session, placed by `constraints`.
pub fn service_spec(
    req: &StartRequest<'_>,
    defaults: &ServiceDefaults<'_>,
    constraints: Vec<String>,
) -> ServiceSpec {
    let spec = req.spec;
    let hardening = Translated::of(&spec.hardening);
    let session_labels = labels::for_request(defaults.instance, req);
    let container = hardening.task_container(TaskSpecContainerSpec {
        image: Some(spec.image.clone()),
        labels: Some(session_labels.clone()),
        env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
        mounts: Some(bind_mounts(spec)),
        // An init as PID 1 passes SIGTERM on, so a drain or removal waits the short grace
        // below, not the engine's 10 s (busybox httpd ignores SIGTERM as PID 1).
        init: Some(true),
        stop_grace_period: i64::try_from(defaults.stop_grace_seconds)
            .ok()
            .map(|s| s.saturating_mul(1_000_000_000)),
        ..Default::default()
    });
    ServiceSpec {
        name: Some(service_name(req.chat_id, req.session_id)),
        labels: Some(session_labels),
        task_template: Some(TaskSpec {
            container_spec: Some(container),
            resources: Some(TaskSpecResources {
                limits: Some(hardening.task_limits()),
                ..Default::default()
            }),
            restart_policy: Some(TaskSpecRestartPolicy {
                condition: Some(RESTART_CONDITION),
                ..Default::default()
            }),
            placement: Some(TaskSpecPlacement {
                constraints: (!constraints.is_empty()).then_some(constraints),
                ..Default::default()
            }),
            networks: Some(vec![NetworkAttachmentConfig {
                target: Some(spec.network.clone()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        mode: Some(ServiceSpecMode {
            replicated: Some(ServiceSpecModeReplicated { replicas: Some(1) }),
            ..Default::default()
        }),
        // The task's own overlay address is the endpoint: VIP needs IPVS (absent here, and
        // not needed for one replica).
        endpoint_spec: Some(EndpointSpec {
            mode: Some(EndpointSpecModeEnum::DNSRR),
            ports: None,
        }),
        ..Default::default()
    }
}

/// Who restarts a task (docs/architecture.md, "Swarm mode: who restarts").
pub const RESTART_CONDITION: TaskSpecRestartPolicyConditionEnum =
    TaskSpecRestartPolicyConditionEnum::NONE;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::spec::tests_support::spec_with_profile;
    use crate::egress::EgressMode;

    fn ids() -> (ChatId, SessionId) {
        (
            "11111111-2222-3333-4444-555555555555"
                .parse()
                .expect("uuid"),
            "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
                .parse()
                .expect("uuid"),
        )
    }

    #[test]
    fn names_are_deterministic_dns_labels() {
        let (chat, session) = ids();
        let name = service_name(chat, session);
        assert_eq!(name, "sbx-11111111222233334444555555555555-aaaaaaaa");
        assert!(name.len() <= 63);
    }

    #[test]
    fn the_service_carries_the_containers_mounts_env_labels_and_limits() {
        let (chat, session) = ids();
        let spec = spec_with_profile("runc", EgressMode::Allow, &[]);
        let req = StartRequest {
            chat_id: chat,
            session_id: session,
            agent_id: "agent-1",
            spec: &spec,
            spec_hash: "hash",
            volume_host_path: "/data/vol",
            expires_at: chrono::Utc::now(),
        };
        let defaults = ServiceDefaults {
            instance: "inst",
            stop_grace_seconds: 1,
        };
        let s = service_spec(&req, &defaults, vec!["node.labels.x==y".into()]);
        let task = s.task_template.expect("task");
        let c = task.container_spec.expect("container");
        assert_eq!(c.mounts.as_ref().map(Vec::len), Some(4));
        assert!(c
            .env
            .as_ref()
            .expect("env")
            .contains(&"AGENT_ID=agent-1".to_string()));
        assert_eq!(c.capability_drop, Some(vec!["ALL".to_string()]));
        assert_eq!(c.init, Some(true));
        assert_eq!(c.stop_grace_period, Some(1_000_000_000));
        let labels = s.labels.expect("labels");
        assert!(labels::is_ours(&labels, "inst"));
        assert!(!labels::is_ours(&labels, "other"));
        assert_eq!(c.labels.as_ref(), Some(&labels));
        let limits = task.resources.and_then(|r| r.limits).expect("limits");
        assert_eq!(limits.pids, Some(spec.hardening.pids_limit));
        assert_eq!(limits.nano_cpus, Some(1_000_000_000));
        assert_eq!(
            task.placement.and_then(|p| p.constraints),
            Some(vec!["node.labels.x==y".to_string()])
        );
        assert_eq!(
            s.mode.and_then(|m| m.replicated).and_then(|r| r.replicas),
            Some(1)
        );
        assert_eq!(
            s.endpoint_spec.and_then(|e| e.mode),
            Some(EndpointSpecModeEnum::DNSRR)
        );
        assert_eq!(
            task.networks.expect("networks")[0].target.as_deref(),
            Some(spec.network.as_str())
        );
    }
}
