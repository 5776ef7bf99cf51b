//! The swarm backend on a real 3-node Docker Swarm: `scripts/swarm-lab.sh` (three dockerd in
//! network namespaces on this machine), which `scripts/test.sh` brings up before these tests
//! and down after them, in a trap, and names in `SANDBOXD_SWARM_LAB`.
//!
//! The tests drain nodes and kill them, so they run one at a time (`--test-threads=1`) and
//! are `#[ignore]`d for a plain `cargo test`, which has no lab: scripts/test.sh runs them
//! with `--ignored`. Without the lab they fail, naming it; they never skip.

#[path = "integration/support.rs"]
mod support;

use std::collections::{BTreeMap, HashMap};
use std::process::Command;
use std::time::{Duration, Instant};

use bollard::models::{
    NetworkAttachmentConfig, ServiceSpec, ServiceSpecMode, ServiceSpecModeReplicated, TaskSpec,
    TaskSpecContainerSpec, TaskSpecPlacement, TaskSpecRestartPolicy,
    TaskSpecRestartPolicyConditionEnum,
};
use bollard::query_parameters::ListTasksOptionsBuilder;
use bollard::Docker;
use reqwest::StatusCode;
use sandboxd::config::{NodeEngine, ProfileSettings, RuntimeKind, Settings};
use serde_json::{json, Value};
use support::*;

/// The overlay every swarm test shares (sandboxd creates it; `down` removes the lab with it).
const SWARM_NETWORK: &str = "sandboxd-swarm";
const NODES: [&str; 3] = ["n1", "n2", "n3"];

fn lab_dir() -> String {
    std::env::var("SANDBOXD_SWARM_LAB").expect(
        "SANDBOXD_SWARM_LAB must name a running swarm lab: run these tests through \
         scripts/test.sh, which brings scripts/swarm-lab.sh up and down around them",
    )
}

fn socket(node: &str) -> String {
    format!("unix://{}/{node}.sock", lab_dir())
}

async fn manager() -> Docker {
    Docker::connect_with_host(&socket("n1"))
        .expect("manager socket")
        .negotiate_version()
        .await
        .expect("the lab's manager must answer")
}

/// Settings for sandboxd on the lab: runtime swarm through n1, every node's engine for the
/// data plane (or those in `nodes`), and a standard profile without host rules.
fn swarm_settings(dir: &std::path::Path, nodes: &[&str]) -> Settings {
    let mut s = test_settings(dir, &unique_instance());
    s.runtime = RuntimeKind::Swarm;
    s.docker.base_url = socket("n1");
    s.sandbox.network_name = SWARM_NETWORK.into();
    s.sandbox.cleanup_interval_seconds = 2;
    s.sandbox.profiles = BTreeMap::from([(
        "standard".into(),
        ProfileSettings {
            deny_cidrs: Vec::new(),
            ..Default::default()
        },
    )]);
    s.swarm.nodes = nodes
        .iter()
        .map(|n| {
            (
                n.to_string(),
                NodeEngine {
                    base_url: socket(n),
                    tls: None,
                },
            )
        })
        .collect();
    s
}

/// Removes an instance's services (and the test's probes), also when a test panicked.
struct ServiceGuard(String);

impl Drop for ServiceGuard {
    fn drop(&mut self) {
        for filter in [
            format!("label=sandboxd.instance={}", self.0),
            format!("label=sandboxd-test.probe={}", self.0),
        ] {
            let ids = Command::new("docker")
                .args([
                    "-H",
                    &socket("n1"),
                    "service",
                    "ls",
                    "-q",
                    "--filter",
                    &filter,
                ])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
                .unwrap_or_default();
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let _ = Command::new("docker")
                    .args(["-H", &socket("n1"), "service", "rm"])
                    .args(&ids)
                    .output();
            }
        }
    }
}

async fn spawn(nodes: &[&str], tweak: impl FnOnce(&mut Settings)) -> (TestApp, ServiceGuard) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut settings = swarm_settings(dir.path(), nodes);
    tweak(&mut settings);
    let guard = ServiceGuard(settings.controller.instance.clone());
    (TestApp::start(dir, settings).await, guard)
}

fn docker_cli(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(["-H", &socket("n1")])
        .args(args)
        .output()
        .expect("docker CLI");
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Sets a node active again however the test ends.
struct Reactivate(&'static str);

impl Drop for Reactivate {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args([
                "-H",
                &socket("n1"),
                "node",
                "update",
                "--availability",
                "active",
                self.0,
            ])
            .output();
    }
}

/// Starts a killed node again however the test ends, and waits until the manager has it back.
struct Revive(&'static str);

impl Drop for Revive {
    fn drop(&mut self) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/swarm-lab.sh");
        let ok = Command::new("bash")
            .args([script, "start-node", self.0])
            .env("SWARMLAB_DIR", lab_dir())
            .status()
            .is_ok_and(|s| s.success());
        let deadline = Instant::now() + Duration::from_secs(60);
        while ok && Instant::now() < deadline {
            let status = Command::new("docker")
                .args([
                    "-H",
                    &socket("n1"),
                    "node",
                    "inspect",
                    "-f",
                    "{{.Status.State}}",
                    self.0,
                ])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_default();
            if status == "ready" {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        assert!(
            std::thread::panicking(),
            "node {} did not come back",
            self.0
        );
    }
}

/// The running task of a service: (task id, node hostname).
async fn running_task(docker: &Docker, service: &str) -> Option<(String, String)> {
    let filters = HashMap::from([
        ("service", vec![service.to_string()]),
        ("desired-state", vec!["running".to_string()]),
    ]);
    let options = ListTasksOptionsBuilder::new().filters(&filters).build();
    let tasks = docker.list_tasks(Some(options)).await.ok()?;
    let t = tasks.into_iter().find(|t| {
        t.service_id.as_deref() == Some(service)
            && t.status
                .as_ref()
                .and_then(|s| s.state)
                .is_some_and(|s| s == bollard::models::TaskState::RUNNING)
    })?;
    let node = docker.inspect_node(t.node_id.as_deref()?).await.ok()?;
    Some((t.id?, node.description?.hostname?))
}

/// Every task a service ever had.
async fn task_count(docker: &Docker, service: &str) -> usize {
    let filters = HashMap::from([("service", vec![service.to_string()])]);
    let options = ListTasksOptionsBuilder::new().filters(&filters).build();
    docker
        .list_tasks(Some(options))
        .await
        .expect("tasks")
        .iter()
        .filter(|t| t.service_id.as_deref() == Some(service))
        .count()
}

/// Creates `n` sandboxes through the old contract; their (chat, body) once all run.
async fn create_many(app: &TestApp, n: usize) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for _ in 0..n {
        let chat = new_chat();
        let (status, body) = app.create(&chat, "agent-1", &app.volume(&chat)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["status"], "running");
        out.push((chat, body));
    }
    out
}

/// Runs a one-shot probe service on a node other than `avoid`, on the sandbox overlay, that
/// fetches the agent's page at `ip:port`; whether it got it.
async fn probe_from_another_node(docker: &Docker, instance: &str, avoid: &str, ip: &str) -> bool {
    let script = format!(
        "printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | nc {ip} 8000 | grep -q 'sandboxd test agent'"
    );
    let spec = ServiceSpec {
        name: Some(format!(
            "probe-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        )),
        labels: Some(HashMap::from([(
            "sandboxd-test.probe".to_string(),
            instance.to_string(),
        )])),
        task_template: Some(TaskSpec {
            container_spec: Some(TaskSpecContainerSpec {
                image: Some(TEST_IMAGE.into()),
                command: Some(vec!["/bin/sh".into(), "-c".into(), script]),
                ..Default::default()
            }),
            restart_policy: Some(TaskSpecRestartPolicy {
                condition: Some(TaskSpecRestartPolicyConditionEnum::NONE),
                ..Default::default()
            }),
            placement: Some(TaskSpecPlacement {
                constraints: Some(vec![format!("node.hostname!={avoid}")]),
                ..Default::default()
            }),
            networks: Some(vec![NetworkAttachmentConfig {
                target: Some(SWARM_NETWORK.into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        mode: Some(ServiceSpecMode {
            replicated: Some(ServiceSpecModeReplicated { replicas: Some(1) }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let id = docker
        .create_service(spec, None)
        .await
        .expect("probe service")
        .id
        .expect("id");
    let state = wait_until(Duration::from_secs(60), "the probe to finish", || async {
        let filters = HashMap::from([("service", vec![id.clone()])]);
        let options = ListTasksOptionsBuilder::new().filters(&filters).build();
        let tasks = docker.list_tasks(Some(options)).await.ok()?;
        let t = tasks.first()?;
        let node = docker.inspect_node(t.node_id.as_deref()?).await.ok()?;
        assert_ne!(
            node.description?.hostname?.as_str(),
            avoid,
            "the probe ran on the sandbox's node"
        );
        let state = t.status.as_ref()?.state?;
        use bollard::models::TaskState::*;
        matches!(state, COMPLETE | FAILED | REJECTED).then_some(state)
    })
    .await;
    let _ = docker.delete_service(&id).await;
    state == bollard::models::TaskState::COMPLETE
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the swarm lab: scripts/test.sh runs it"]
async fn sandboxes_spread_over_the_nodes_and_answer_from_another_node() {
    let (app, _services) = spawn(&NODES, |_| {}).await;
    let manager = manager().await;
    let made = create_many(&app, 6).await;
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    let mut placed = Vec::new();
    for (_, body) in &made {
        let service = body["container_id"].as_str().expect("service id");
        let (_, node) = running_task(&manager, service)
            .await
            .expect("a running task");
        *per_node.entry(node.clone()).or_default() += 1;
        placed.push((
            node,
            body["endpoint"]["ip"].as_str().expect("ip").to_string(),
        ));
    }
    assert_eq!(per_node.len(), 3, "every node runs some: {per_node:?}");
    assert!(
        per_node.values().all(|&n| n <= 3),
        "no node runs more than half: {per_node:?}"
    );
    // The endpoint is the task's overlay address: a task on another node reaches it.
    let (node, ip) = &placed[0];
    assert!(
        probe_from_another_node(&manager, app.instance(), node, ip).await,
        "a task on another node than {node} could not fetch http://{ip}:8000/"
    );
    // And a wrong address is not reached (the probe can fail).
    assert!(!probe_from_another_node(&manager, app.instance(), node, "10.0.250.250").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the swarm lab: scripts/test.sh runs it"]
async fn a_restarted_sandboxd_adopts_every_service_and_restarts_none() {
    let (app, _services) = spawn(&NODES, |_| {}).await;
    let manager = manager().await;
    let made = create_many(&app, 3).await;
    let mut before = Vec::new();
    for (chat, body) in &made {
        let service = body["container_id"].as_str().expect("id").to_string();
        let task = running_task(&manager, &service).await.expect("running");
        before.push((chat.clone(), service, task));
    }
    let (dir, settings, _guard) = app.stop().await;
    let app = TestApp::start(dir, settings).await;
    for (chat, service, task) in &before {
        let view = wait_until(
            Duration::from_secs(30),
            "the sandbox running again",
            || async {
                let (status, view) = app.get(&format!("/api/v1/sandboxes/{chat}")).await;
                (status == StatusCode::OK && view["phase"] == "running").then_some(view)
            },
        )
        .await;
        assert_eq!(view["container_id"], service.as_str(), "the same service");
        assert_eq!(
            running_task(&manager, service).await.as_ref(),
            Some(task),
            "the same task: nothing restarted"
        );
        assert_eq!(task_count(&manager, service).await, 1, "no second task");
    }
    // A few passes later, still nothing restarted.
    app.wait_for_passes(3).await;
    for (_, service, task) in &before {
        assert_eq!(running_task(&manager, service).await.as_ref(), Some(task));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the swarm lab: scripts/test.sh runs it"]
async fn an_orphan_service_is_removed_and_a_removed_one_replaced() {
    let (app, _services) = spawn(&NODES, |_| {}).await;
    let manager = manager().await;
    // A service labelled for this instance that no row wants.
    let orphan_chat = new_chat();
    let labels = HashMap::from([
        ("sandboxd.managed".to_string(), "true".to_string()),
        ("sandboxd.instance".to_string(), app.instance().to_string()),
        ("sandboxd.chat_id".to_string(), orphan_chat),
    ]);
    let orphan = manager
        .create_service(
            ServiceSpec {
                name: Some(format!("orphan-{}", &app.instance()[2..])),
                labels: Some(labels),
                task_template: Some(TaskSpec {
                    container_spec: Some(TaskSpecContainerSpec {
                        image: Some(TEST_IMAGE.into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            },
            None,
        )
        .await
        .expect("orphan service")
        .id
        .expect("id");
    wait_until(
        Duration::from_secs(30),
        "the orphan service removed",
        || async {
            manager
                .inspect_service(&orphan, None)
                .await
                .is_err()
                .then_some(())
        },
    )
    .await;
    // A sandbox's service removed by hand is made again, and the row follows it.
    let made = create_many(&app, 1).await;
    let (chat, body) = &made[0];
    let first = body["container_id"].as_str().expect("id").to_string();
    manager.delete_service(&first).await.expect("rm");
    let view = running_on_another_service(&app, chat, &first).await;
    let second = view["container_id"].as_str().expect("id");
    assert!(running_task(&manager, second).await.is_some());
}

/// Waits until `chat` runs again on another service than `old`; its view.
async fn running_on_another_service(app: &TestApp, chat: &str, old: &str) -> Value {
    wait_until(
        Duration::from_secs(30),
        "the chat on a new service",
        || async {
            let (_, view) = app.get(&format!("/api/v1/sandboxes/{chat}")).await;
            (view["phase"] == "running" && view["container_id"] != old).then_some(view)
        },
    )
    .await
}

/// Waits until `chat` runs on another node than `from`; the new (service, node, ip) and when.
async fn moved_off(
    app: &TestApp,
    manager: &Docker,
    chat: &str,
    from: &str,
    within: Duration,
) -> (String, String, String) {
    wait_until(within, "the sandbox running on another node", || async {
        let (_, view) = app.get(&format!("/api/v1/sandboxes/{chat}")).await;
        if view["phase"] != "running" {
            return None;
        }
        let service = view["container_id"].as_str()?.to_string();
        let (_, node) = running_task(manager, &service).await?;
        let ip = view["endpoint"]["ip"].as_str()?.to_string();
        (node != from).then_some((service, node, ip))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the swarm lab: scripts/test.sh runs it"]
async fn a_drained_nodes_sandbox_runs_again_elsewhere_at_a_new_endpoint() {
    let (app, _services) = spawn(&NODES, |_| {}).await;
    let manager = manager().await;
    let made = create_many(&app, 3).await;
    // A sandbox on a worker (draining the manager works too, but keep it schedulable).
    let mut target = None;
    for (chat, body) in &made {
        let service = body["container_id"].as_str().expect("id");
        let (_, node) = running_task(&manager, service).await.expect("running");
        if node != "n1" {
            target = Some((chat.clone(), node, body["endpoint"]["ip"].clone()));
            break;
        }
    }
    let (chat, node, old_ip) = target.expect("a sandbox on a worker");
    let node: &'static str = if node == "n2" { "n2" } else { "n3" };
    let mut watch = app
        .client
        .get(app.url("/api/v1/sandboxes?watch=true"))
        .send()
        .await
        .expect("watch");
    let _back = Reactivate(node);
    let drained = Instant::now();
    docker_cli(&["node", "update", "--availability", "drain", node]);
    let (_, new_node, new_ip) =
        moved_off(&app, &manager, &chat, node, Duration::from_secs(60)).await;
    let took = drained.elapsed();
    println!("drain of {node} -> running on {new_node} at {new_ip} after {took:?}");
    assert_ne!(new_ip, old_ip.as_str().unwrap_or_default());
    // The old contract's create answers the new endpoint.
    let (status, body) = app.create(&chat, "agent-1", &app.volume(&chat)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["endpoint"]["ip"], new_ip.as_str());
    // The watch stream carried it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut seen = String::new();
    while !seen.contains(&new_ip) {
        let chunk = tokio::time::timeout_at(deadline, watch.chunk())
            .await
            .expect("the new address on the watch stream in time")
            .expect("stream read")
            .expect("stream open");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    // Exactly one task runs for the chat.
    assert_eq!(services_of_chat(&chat), 1, "one service for the chat");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the swarm lab: scripts/test.sh runs it"]
async fn a_lost_nodes_sandbox_runs_again_elsewhere() {
    let (app, _services) = spawn(&NODES, |_| {}).await;
    let manager = manager().await;
    let made = create_many(&app, 3).await;
    let mut target = None;
    for (chat, body) in &made {
        let (_, node) = running_task(&manager, body["container_id"].as_str().expect("id"))
            .await
            .expect("running");
        if node != "n1" {
            target = Some((chat.clone(), node));
            break;
        }
    }
    let (chat, node) = target.expect("a sandbox on a worker");
    let node: &'static str = if node == "n2" { "n2" } else { "n3" };
    let _back = Revive(node);
    let killed = Instant::now();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/swarm-lab.sh");
    let ok = Command::new("bash")
        .args([script, "kill-node", node])
        .env("SWARMLAB_DIR", lab_dir())
        .status()
        .expect("kill-node")
        .success();
    assert!(ok, "kill-node {node}");
    // Until the manager notices (its heartbeat, ≈ 12 s), the task still runs on the dead node
    // as far as anyone knows: the data plane answers that the node's engine is away (503), or
    // what the dying engine said (502), without hanging. A manager that noticed at once (its
    // link to the node reset) says no task runs: 409, as promptly.
    let (status, body) = app
        .post_json(
            &format!("/api/v1/sandboxes/{chat}/exec"),
            &json!({"command": ["sh", "-c", "echo hi"]}),
        )
        .await;
    assert!(
        [
            StatusCode::SERVICE_UNAVAILABLE,
            StatusCode::BAD_GATEWAY,
            StatusCode::CONFLICT
        ]
        .contains(&status),
        "{status}: {body}"
    );
    assert!(!detail_text(&body).is_empty(), "{body}");
    let (_, new_node, ip) = moved_off(&app, &manager, &chat, node, Duration::from_secs(90)).await;
    println!(
        "loss of {node} -> running on {new_node} at {ip} after {:?}",
        killed.elapsed()
    );
    assert_eq!(services_of_chat(&chat), 1, "one service for the chat");
}

/// Declares a new chat (under `profile`) and waits until its row records an error; the chat
/// and its view.
async fn declare_and_wait_for_an_error(app: &TestApp, profile: Option<&str>) -> (String, Value) {
    let chat = new_chat();
    let mut body = json!({"agent_id": "a", "volume_host_path": app.volume(&chat)});
    if let Some(p) = profile {
        body["profile"] = p.into();
    }
    let (status, _) = app
        .put_json(&format!("/api/v1/sandboxes/{chat}"), &body)
        .await;
    assert!(status.is_success(), "{status}");
    let view = wait_until(Duration::from_secs(20), "the refusal recorded", || async {
        let (_, view) = app.get(&format!("/api/v1/sandboxes/{chat}")).await;
        view["last_error"].as_str().is_some().then_some(view)
    })
    .await;
    (chat, view)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the swarm lab: scripts/test.sh runs it"]
async fn profiles_asking_more_than_the_nodes_give_are_refused_by_name() {
    let (app, _services) = spawn(&NODES, |s| {
        s.sandbox.profiles.insert(
            "gvisor".into(),
            ProfileSettings {
                runtime: "runsc".into(),
                deny_cidrs: Vec::new(),
                ..Default::default()
            },
        );
        s.sandbox.profiles.insert(
            "ruled".into(),
            ProfileSettings {
                network: Some("sandboxd-swarm-ruled".into()),
                ..Default::default()
            },
        );
    })
    .await;
    let manager = manager().await;
    for (profile, named) in [
        ("gvisor", "runtime runsc"),
        ("ruled", "host firewall rules"),
    ] {
        let (chat, view) = declare_and_wait_for_an_error(&app, Some(profile)).await;
        let error = view["last_error"].as_str().unwrap_or_default();
        assert!(error.contains(named), "{profile}: {error}");
        assert_ne!(view["phase"], "running");
        // Nothing was placed, weaker or otherwise.
        assert_eq!(services_of_chat(&chat), 0, "{profile}: a service was made");
    }
    // Readiness names both.
    let (_, ready) = app.get("/api/v1/ready").await;
    let text = ready.to_string();
    assert!(
        text.contains("profile gvisor") && text.contains("profile ruled"),
        "{text}"
    );
    // The standard profile runs beside them.
    create_many(&app, 1).await;
    drop(manager);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the swarm lab: scripts/test.sh runs it"]
async fn exec_runs_on_the_sandboxs_node_and_an_unconfigured_node_answers_501() {
    // Only n1's engine is configured for the data plane.
    let (app, _services) = spawn(&["n1"], |_| {}).await;
    let manager = manager().await;
    let made = create_many(&app, 4).await;
    let (mut ran, mut refused) = (0, 0);
    for (chat, body) in &made {
        let (_, node) = running_task(&manager, body["container_id"].as_str().expect("id"))
            .await
            .expect("running");
        let (status, out) = app
            .post_json(
                &format!("/api/v1/sandboxes/{chat}/exec"),
                &json!({"command": ["sh", "-c", "echo $AGENT_ID; grep NoNewPrivs /proc/self/status"]}),
            )
            .await;
        if node == "n1" {
            assert_eq!(status, StatusCode::OK, "{out}");
            assert_eq!(out["stdout"], "agent-1\nNoNewPrivs:\t1\n");
            ran += 1;
        } else {
            assert_eq!(status, StatusCode::NOT_IMPLEMENTED, "{out}");
            assert!(
                detail_text(&out).contains(&format!("swarm.nodes.{node}")),
                "{out}"
            );
            refused += 1;
        }
    }
    assert!(
        ran > 0 && refused > 0,
        "sandboxes on n1 and elsewhere: {ran} ran, {refused} refused"
    );
}

/// The container of a service's running task, and the node it runs on.
async fn task_container(docker: &Docker, service: &str) -> Option<(String, String)> {
    let filters = HashMap::from([
        ("service", vec![service.to_string()]),
        ("desired-state", vec!["running".to_string()]),
    ]);
    let options = ListTasksOptionsBuilder::new().filters(&filters).build();
    let t = docker
        .list_tasks(Some(options))
        .await
        .ok()?
        .into_iter()
        .find(|t| t.service_id.as_deref() == Some(service))?;
    let container = t.status?.container_status?.container_id?;
    let node = docker.inspect_node(t.node_id.as_deref()?).await.ok()?;
    Some((container, node.description?.hostname?))
}

fn services_of_chat(chat: &str) -> usize {
    docker_cli(&[
        "service",
        "ls",
        "-q",
        "--filter",
        &format!("label=sandboxd.chat_id={chat}"),
    ])
    .lines()
    .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the swarm lab: scripts/test.sh runs it"]
async fn a_crash_is_restarted_with_its_count_and_delete_and_expiry_remove_the_service() {
    let (app, _services) = spawn(&NODES, |s| s.sandbox.ttl_seconds = 15).await;
    let manager = manager().await;
    let made = create_many(&app, 2).await;
    let (crashing, expiring) = (&made[0].0, &made[1].0);
    let first = made[0].1["container_id"].as_str().expect("id").to_string();
    // The agent dies (its container killed on its node): sandboxd, not Swarm, restarts it,
    // and counts it into the chat's crash loop.
    let (container, node) = task_container(&manager, &first)
        .await
        .expect("task container");
    let out = Command::new("docker")
        .args(["-H", &socket(&node), "kill", &container])
        .output()
        .expect("docker kill");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let view = running_on_another_service(&app, crashing, &first).await;
    assert_eq!(view["restarts"], 1, "{view}");
    assert_eq!(
        task_count(&manager, view["container_id"].as_str().expect("id")).await,
        1
    );
    assert_eq!(services_of_chat(crashing), 1);
    // Delete: the service goes, then the row.
    let (status, body) = app.delete(crashing).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        services_of_chat(crashing),
        0,
        "deleted means its service is gone"
    );
    // Expiry: the service goes, the row stays `expired`.
    wait_until(Duration::from_secs(40), "the session expired", || async {
        let (_, view) = app.get(&format!("/api/v1/sandboxes/{expiring}")).await;
        (view["phase"] == "expired").then_some(())
    })
    .await;
    assert_eq!(
        services_of_chat(expiring),
        0,
        "an expired session keeps no service"
    );
}

/// Puts a label back on every node however the test ends.
struct Relabel(&'static str);

impl Drop for Relabel {
    fn drop(&mut self) {
        for n in NODES {
            let _ = Command::new("docker")
                .args([
                    "-H",
                    &socket("n1"),
                    "node",
                    "update",
                    "--label-add",
                    self.0,
                    n,
                ])
                .output();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the swarm lab: scripts/test.sh runs it"]
async fn no_new_privileges_is_refused_by_name_when_no_node_says_it_enforces_it() {
    let _back = Relabel("sandboxd.no-new-privileges=true");
    for n in NODES {
        docker_cli(&[
            "node",
            "update",
            "--label-rm",
            "sandboxd.no-new-privileges",
            n,
        ]);
    }
    let (app, _services) = spawn(&NODES, |_| {}).await;
    let (chat, view) = declare_and_wait_for_an_error(&app, None).await;
    let error = view["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("no-new-privileges"), "{error}");
    assert_eq!(services_of_chat(&chat), 0, "nothing placed weaker");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the swarm lab: scripts/test.sh runs it"]
async fn egress_deny_runs_on_an_internal_overlay_that_reaches_nothing_outside() {
    // A target this test starts: a listener on the lab's host link (10.77.0.254).
    let listener = tokio::net::TcpListener::bind("10.77.0.254:0")
        .await
        .expect("the lab's host link (SWARMLAB_HOST_LINK=1)");
    let port = listener.local_addr().expect("addr").port();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    let server = tokio::spawn(async move {
        while let Ok((_stream, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let (app, _services) = spawn(&NODES, |s| {
        s.sandbox.profiles.insert(
            "offline".into(),
            ProfileSettings {
                egress: sandboxd::egress::EgressMode::Deny,
                deny_cidrs: Vec::new(),
                allow_cidrs: Vec::new(),
                network: Some("sandboxd-swarm-offline".into()),
                ..Default::default()
            },
        );
    })
    .await;
    let manager = manager().await;
    let reach = format!("echo hi | nc -w 3 10.77.0.254 {port} && echo reached || echo blocked");
    let mut results = Vec::new();
    for profile in ["standard", "offline"] {
        let chat = new_chat();
        let body = json!({"chat_id": chat, "agent_id": "a", "volume_host_path": app.volume(&chat), "profile": profile});
        let (status, view) = app.post_json("/api/v1/create", &body).await;
        assert_eq!(status, StatusCode::OK, "{profile}: {view}");
        let before = accepted.load(std::sync::atomic::Ordering::SeqCst);
        let (status, out) = app
            .post_json(
                &format!("/api/v1/sandboxes/{chat}/exec"),
                &json!({"command": ["sh", "-c", reach.as_str()]}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{out}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let got = accepted.load(std::sync::atomic::Ordering::SeqCst) - before;
        results.push((
            profile,
            out["stdout"]
                .as_str()
                .unwrap_or_default()
                .trim()
                .to_string(),
            got,
        ));
    }
    // Control: the routed overlay reaches the target; the internal one does not.
    assert_eq!(results[0].1, "reached", "{results:?}");
    assert!(results[0].2 >= 1, "{results:?}");
    assert_eq!(results[1].1, "blocked", "{results:?}");
    assert_eq!(results[1].2, 0, "{results:?}");
    let net = manager
        .inspect_network(
            "sandboxd-swarm-offline",
            None::<bollard::query_parameters::InspectNetworkOptions>,
        )
        .await
        .expect("the profile's network");
    assert_eq!(net.internal, Some(true));
    assert_eq!(net.driver.as_deref(), Some("overlay"));
    server.abort();
}
