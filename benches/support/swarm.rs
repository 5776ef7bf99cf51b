//! Swarm figures (`scripts/bench.sh swarm`, which brings the lab up and down): create →
//! running through sandboxd against a raw `service create` of the very same service plus a
//! wait for its task to run, interleaved; and a burst of 30 over the three nodes.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use bollard::query_parameters::ListTasksOptionsBuilder;
use bollard::Docker;
use sandboxd::backend::swarm::service::{service_spec, ServiceDefaults};
use sandboxd::backend::StartRequest;
use sandboxd::config::{NodeEngine, ProfileSettings, RuntimeKind};
use sandboxd::domain::{ChatId, SessionId};
use serde_json::json;

use super::{in_process, ms, percentile, verdict, volume, Report};
use crate::support::{new_chat, TestApp};

const NETWORK: &str = "sandboxd-swarm";

fn lab() -> String {
    std::env::var("SANDBOXD_SWARM_LAB")
        .expect("SANDBOXD_SWARM_LAB: run `scripts/bench.sh swarm`, which brings the lab up")
}

/// The node a service's running task is on, once it runs.
async fn running_on(docker: &Docker, service: &str) -> Option<String> {
    let filters = HashMap::from([("service", vec![service.to_string()])]);
    let options = ListTasksOptionsBuilder::new().filters(&filters).build();
    let tasks = docker.list_tasks(Some(options)).await.ok()?;
    let t = tasks.into_iter().find(|t| {
        t.status.as_ref().and_then(|s| s.state) == Some(bollard::models::TaskState::RUNNING)
    })?;
    t.node_id
}

/// `service create` of the service sandboxd would make, then a poll (the same pacing as
/// sandboxd's: 20 ms doubling to 200 ms) until its task runs.
async fn raw_create(
    docker: &Docker,
    app: &TestApp,
    spec: &sandboxd::domain::spec::ContainerSpec,
) -> Duration {
    let chat = ChatId(uuid::Uuid::new_v4());
    let session = SessionId::new_random();
    let req = StartRequest {
        chat_id: chat,
        session_id: session,
        agent_id: "bench",
        spec,
        spec_hash: "raw",
        volume_host_path: "/",
        expires_at: chrono::Utc::now(),
    };
    let raw_instance = format!("{}-raw", app.instance());
    let defaults = ServiceDefaults {
        instance: &raw_instance,
        stop_grace_seconds: 1,
    };
    let service = service_spec(
        &req,
        &defaults,
        vec!["node.labels.sandboxd.no-new-privileges==true".into()],
    );
    let started = Instant::now();
    let id = docker
        .create_service(service, None)
        .await
        .expect("service create")
        .id
        .expect("id");
    let mut pause = Duration::from_millis(20);
    while running_on(docker, &id).await.is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "raw task never ran"
        );
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(200));
    }
    started.elapsed()
}

async fn sandboxd_create(client: &reqwest::Client, app: &TestApp) -> (String, Duration) {
    let vol = volume(app);
    let started = Instant::now();
    let r = client
        .post(format!("http://{}/api/v1/create", app.addr))
        .json(&json!({"chat_id": new_chat(), "agent_id": "bench", "volume_host_path": vol}))
        .send()
        .await
        .expect("create");
    assert_eq!(r.status().as_u16(), 200);
    let body: serde_json::Value = r.json().await.expect("json");
    (
        body["container_id"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        started.elapsed(),
    )
}

async fn remove_services(docker: &Docker, label: &str) {
    let filters = HashMap::from([("label", vec![label.to_string()])]);
    let options = bollard::query_parameters::ListServicesOptionsBuilder::new()
        .filters(&filters)
        .build();
    for s in docker
        .list_services(Some(options))
        .await
        .unwrap_or_default()
    {
        if let Some(id) = s.id {
            let _ = docker.delete_service(&id).await;
        }
    }
}

pub async fn scenario_swarm(out: &mut Report) {
    const ROUNDS: usize = 10;
    const BURST: usize = 30;
    let lab = lab();
    let sock = |n: &str| format!("unix://{lab}/{n}.sock");
    let manager = Docker::connect_with_host(&sock("n1"))
        .expect("manager")
        .negotiate_version()
        .await
        .expect("the lab's manager");
    let app = in_process("swarm", |s| {
        s.runtime = RuntimeKind::Swarm;
        s.docker.base_url = sock("n1");
        s.sandbox.network_name = NETWORK.into();
        s.sandbox.profiles = BTreeMap::from([(
            "standard".into(),
            ProfileSettings {
                deny_cidrs: Vec::new(),
                ..Default::default()
            },
        )]);
        s.swarm.nodes = ["n1", "n2", "n3"]
            .iter()
            .map(|n| {
                (
                    n.to_string(),
                    NodeEngine {
                        base_url: sock(n),
                        tls: None,
                    },
                )
            })
            .collect();
    })
    .await;
    let client = reqwest::Client::new();
    // The spec sandboxd freezes for a session, for the raw baseline's identical service.
    let sandbox = &app.settings.sandbox;
    let raw_chat = ChatId(uuid::Uuid::new_v4());
    std::fs::create_dir_all(sandboxd::domain::spec::chat_dir(
        &sandbox.chats_root,
        raw_chat,
    ))
    .expect("raw chat dir");
    let spec = sandboxd::config::spec::resolve(sandbox, raw_chat, "bench", &volume(&app), None);
    // Warm-up: the overlay on every node, one of each.
    for _ in 0..3 {
        sandboxd_create(&client, &app).await;
        raw_create(&manager, &app, &spec).await;
    }
    let (mut ours, mut raw) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        ours.push(sandboxd_create(&client, &app).await.1);
        raw.push(raw_create(&manager, &app, &spec).await);
    }
    ours.sort();
    raw.sort();
    let (o, r) = (percentile(&ours, 0.5), percentile(&raw, 0.5));
    let ratio = o.as_secs_f64() / r.as_secs_f64();
    out.line(format!(
        "8 swarm create→running p50: sandboxd {:.0} ms vs raw service create + wait {:.0} ms = {ratio:.3}×  target ≤1.10× [{}] (max {:.0} / {:.0} ms, {ROUNDS} interleaved)",
        ms(o),
        ms(r),
        verdict(ratio <= 1.10),
        ms(*ours.last().unwrap_or(&o)),
        ms(*raw.last().unwrap_or(&r)),
    ));
    remove_services(
        &manager,
        &format!("sandboxd.instance={}-raw", app.instance()),
    )
    .await;
    remove_services(&manager, &format!("sandboxd.instance={}", app.instance())).await;
    tokio::time::sleep(Duration::from_secs(6)).await;

    // A burst of 30 at once.
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..BURST {
        let client = client.clone();
        let (addr, vol) = (app.addr, volume(&app));
        set.spawn(async move {
            let r = client
                .post(format!("http://{addr}/api/v1/create"))
                .json(&json!({"chat_id": new_chat(), "agent_id": "bench", "volume_host_path": vol}))
                .send()
                .await
                .expect("create");
            let body: serde_json::Value = r.json().await.expect("json");
            body["container_id"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        });
    }
    let mut services = Vec::new();
    while let Some(s) = set.join_next().await {
        services.push(s.expect("task"));
    }
    let took = started.elapsed();
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for s in &services {
        let node = running_on(&manager, s)
            .await
            .unwrap_or_else(|| "none".into());
        let host = manager
            .inspect_node(&node)
            .await
            .ok()
            .and_then(|n| n.description?.hostname)
            .unwrap_or(node);
        *per_node.entry(host).or_default() += 1;
    }
    let most = per_node.values().copied().max().unwrap_or(0);
    out.line(format!(
        "9 swarm burst of {BURST}: all running in {:.1} s ({:.1} starts/s), per node {per_node:?}; no node more than half [{}]",
        took.as_secs_f64(),
        BURST as f64 / took.as_secs_f64(),
        verdict(most * 2 <= BURST && per_node.len() == 3),
    ));
    remove_services(&manager, &format!("sandboxd.instance={}", app.instance())).await;
}
