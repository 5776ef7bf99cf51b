//! Old deployments switching over: containers the Python service started are taken over, and a
//! renamed sandbox network does not break the sandboxes already on the old one.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use bollard::models::{ContainerCreateBody, HostConfig, Mount, MountType};
use bollard::query_parameters::InspectContainerOptions;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::support::*;

/// Removes the old-style containers of a test's chats, however the test ends (they carry no
/// sandboxd instance label).
struct ChatGuard(Vec<String>);

impl Drop for ChatGuard {
    fn drop(&mut self) {
        for chat in &self.0 {
            remove_containers_matching(&format!("label=chat_id={chat}"));
        }
    }
}

/// Starts a container exactly as the old service's `DockerSandboxRuntime.create` did: image,
/// `AGENT_ID` plus the configured env, its six labels (`expires_at` from Python's
/// `isoformat()`), four bind mounts and the sandbox network; Docker picks the name.
async fn start_like_the_old_service(
    docker: &bollard::Docker,
    settings: &sandboxd::config::Settings,
    chat: &str,
    agent: &str,
    volume: &Path,
    expires_in: chrono::Duration,
) -> (String, String) {
    let session = uuid::Uuid::new_v4().to_string();
    let expires_at = (chrono::Utc::now() + expires_in)
        .format("%Y-%m-%dT%H:%M:%S%.6f+00:00")
        .to_string();
    let s = &settings.sandbox;
    let chat_path = s.chats_root.join(chat);
    std::fs::create_dir_all(&chat_path).unwrap();
    for d in [&s.dependencies_host_path, &s.lambda_tools_host_path] {
        std::fs::create_dir_all(d).unwrap();
    }
    let bind = |source: &Path, target: &str, read_only: bool| Mount {
        target: Some(target.into()),
        source: Some(source.canonicalize().unwrap().display().to_string()),
        typ: Some(MountType::BIND),
        read_only: Some(read_only),
        ..Default::default()
    };
    let labels = HashMap::from([
        ("session_id".to_string(), session.clone()),
        ("chat_id".to_string(), chat.to_string()),
        ("expires_at".to_string(), expires_at),
        ("agent_id".to_string(), agent.to_string()),
        ("volume_host_path".to_string(), volume.display().to_string()),
        (
            "endpoint_port".to_string(),
            s.agent_service_port.to_string(),
        ),
    ]);
    let body = ContainerCreateBody {
        image: Some(TEST_IMAGE.into()),
        env: Some(vec![format!("AGENT_ID={agent}")]),
        labels: Some(labels),
        host_config: Some(HostConfig {
            mounts: Some(vec![
                bind(&chat_path, &s.chat_mount_path, false),
                bind(&s.dependencies_host_path, &s.dependencies_mount_path, true),
                bind(&s.lambda_tools_host_path, &s.lambda_tools_mount_path, true),
                bind(volume, &s.volume_mount_path, false),
            ]),
            network_mode: Some(s.network_name.clone()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let id = docker
        .create_container(
            None::<bollard::query_parameters::CreateContainerOptions>,
            body,
        )
        .await
        .expect("create like the old service")
        .id;
    docker.start_container(&id, None).await.expect("start");
    (id, session)
}

async fn started_at(docker: &bollard::Docker, id: &str) -> Option<String> {
    docker
        .inspect_container(id, None::<InspectContainerOptions>)
        .await
        .ok()?
        .state?
        .started_at
}

async fn gone(docker: &bollard::Docker, id: &str) -> bool {
    docker
        .inspect_container(id, None::<InspectContainerOptions>)
        .await
        .is_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_old_services_containers_are_taken_over_not_restarted() {
    let fx = ProcessFixture::new(|s| {
        s.sandbox.cleanup_interval_seconds = 1;
        s.controller.take_over_old_service = true;
    });
    let docker = docker().await;
    let (a, b, c, d) = (new_chat(), new_chat(), new_chat(), new_chat());
    let _chats = ChatGuard(vec![a.clone(), b.clone(), c.clone(), d.clone()]);
    let vol = fx.vol.canonicalize().unwrap();
    let hour = chrono::Duration::hours(1);
    let (old_a, session_a) =
        start_like_the_old_service(&docker, &fx.settings, &a, "agent-old", &vol, hour).await;
    let (old_b, _) = start_like_the_old_service(
        &docker,
        &fx.settings,
        &b,
        "agent-old",
        &vol,
        chrono::Duration::seconds(4),
    )
    .await;
    let (old_d, _) =
        start_like_the_old_service(&docker, &fx.settings, &d, "agent-old", &vol, hour).await;
    // The old cleanup only stopped expired containers; they were left behind.
    let (old_c, _) =
        start_like_the_old_service(&docker, &fx.settings, &c, "agent-old", &vol, hour).await;
    docker.stop_container(&old_c, None).await.unwrap();
    let a_started = started_at(&docker, &old_a).await;
    let a_ip = docker
        .inspect_container(&old_a, None::<InspectContainerOptions>)
        .await
        .unwrap()
        .network_settings
        .unwrap()
        .networks
        .unwrap()[TEST_NETWORK]
        .ip_address
        .clone()
        .unwrap();

    let mut server = fx.start().await;
    let client = reqwest::Client::new();
    let base = format!("http://{}", server.addr);
    let view = |chat: String| {
        let (client, base) = (client.clone(), base.clone());
        async move { try_get_json(&client, &format!("{base}/api/v1/sandboxes/{chat}")).await }
    };
    // The very first request after start-up, a matching create, is given the old sandbox:
    // writes wait for the takeover instead of racing it. Another agent conflicts with it.
    let create = |agent: &str| {
        client
            .post(format!("{base}/api/v1/create"))
            .json(&json!({"chat_id": a, "agent_id": agent, "volume_host_path": vol}))
            .send()
    };
    let r = create("agent-old").await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        (body["container_id"].as_str(), body["session_id"].as_str()),
        (Some(old_a.as_str()), Some(session_a.as_str())),
        "{body}"
    );
    assert_eq!(
        create("agent-new").await.unwrap().status(),
        StatusCode::CONFLICT
    );
    let adopted = view(a.clone()).await.unwrap();
    assert_eq!(adopted["phase"], "running", "{adopted}");
    assert_eq!(
        adopted["endpoint"],
        json!({"ip": a_ip, "port": 8000}),
        "{adopted}"
    );
    wait_until(
        Duration::from_secs(20),
        "stopped old container removed",
        || {
            let docker = docker.clone();
            let id = old_c.clone();
            async move { gone(&docker, &id).await.then_some(()) }
        },
    )
    .await;

    // A PUT with another agent replaces an adopted session: the old container goes too.
    let r = client
        .put(format!("{base}/api/v1/sandboxes/{d}?wait=30"))
        .json(&json!({"agent_id": "agent-new", "volume_host_path": vol}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    wait_until(
        Duration::from_secs(20),
        "old container of a replaced session removed",
        || {
            let (docker, id, view) = (docker.clone(), old_d.clone(), view(d.clone()));
            async move {
                let v = view.await?;
                let replaced = v["phase"] == "running" && v["container_id"] != id.as_str();
                (replaced && gone(&docker, &id).await).then_some(())
            }
        },
    )
    .await;

    // The one whose label says it expires soon is removed at expiry.
    wait_until(Duration::from_secs(20), "old container expired", || {
        let (docker, id, view) = (docker.clone(), old_b.clone(), view(b.clone()));
        async move {
            let v = view.await?;
            (v["phase"] == "expired" && gone(&docker, &id).await).then_some(())
        }
    })
    .await;

    // Several passes later, and across a restart, it is the same container, never restarted:
    // not replaced for drift although sandboxd would create it differently.
    let resync = Duration::from_secs(fx.settings.sandbox.cleanup_interval_seconds);
    wait_for_passes(&client, &base, 3, resync).await;
    server.kill9();
    let server = fx.start().await;
    let base = format!("http://{}", server.addr);
    // A create waits for the takeover, so the adoptions below are counted after it ran.
    let r = client
        .post(format!("{base}/api/v1/create"))
        .json(&json!({"chat_id": a, "agent_id": "agent-old", "volume_host_path": vol}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let v = get_json(&client, &format!("{base}/api/v1/sandboxes/{a}")).await;
    assert_eq!(
        (v["phase"].as_str(), v["container_id"].as_str()),
        (Some("running"), Some(old_a.as_str())),
        "{v}"
    );
    assert_eq!(
        started_at(&docker, &old_a).await,
        a_started,
        "never restarted"
    );
    let events = get_json(&client, &format!("{base}/api/v1/sandboxes/{a}/events")).await;
    let adoptions = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "adopt_legacy")
        .count();
    assert_eq!(
        adoptions, 1,
        "adopted once, however often sandboxd starts: {events}"
    );
    assert!(agent_answers(&a_ip, 8000).await);

    // Delete removes it like any sandbox.
    let r: Value = client
        .delete(format!("{base}/api/v1/sandboxes/{a}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (r["result"].as_str(), r["container_id"].as_str()),
        (Some("deleted"), Some(old_a.as_str())),
        "{r}"
    );
    assert!(gone(&docker, &old_a).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renaming_the_network_keeps_live_sandboxes_on_theirs() {
    let app = TestApp::spawn_with(|s| s.sandbox.cleanup_interval_seconds = 1).await;
    let before = new_chat();
    let vol = app.volume("n");
    let (status, first) = app.create(&before, "a", &vol).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let (dir, mut settings, _guard) = app.stop().await;
    settings.sandbox.network_name = TEST_NETWORK_ALT.into();
    let app = TestApp::start(dir, settings).await;

    // Passes run every second: a sandbox looked up on the new network would be restarted or
    // fail in a loop. After three more passes it keeps its container and the endpoint on its
    // own network.
    let restarted = chrono::Utc::now().timestamp() as f64;
    wait_until(
        Duration::from_secs(20),
        "three passes after the restart",
        || async {
            let text = get_text(&app.client, &app.url("/metrics")).await;
            let last = text
                .lines()
                .find_map(|l| l.strip_prefix("sandboxd_last_pass_timestamp_seconds "))
                .and_then(|v| v.trim().parse::<f64>().ok())?;
            (last >= restarted + 3.0).then_some(())
        },
    )
    .await;
    let (status, v) = app.get(&format!("/api/v1/sandboxes/{before}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (
            v["phase"].as_str(),
            v["container_id"].as_str(),
            v["attempts"].as_u64()
        ),
        (Some("running"), first["container_id"].as_str(), Some(0)),
        "{v}"
    );
    assert_eq!(v["endpoint"], first["endpoint"], "{v}");
    assert!(agent_answers(first["endpoint"]["ip"].as_str().unwrap(), 8000).await);
    let (_, events) = app.get(&format!("/api/v1/sandboxes/{before}/events")).await;
    assert!(
        events
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["outcome"] != "error"),
        "no failed attempts: {events}"
    );

    // A new sandbox joins the new network.
    let after = new_chat();
    let (status, second) = app.create(&after, "a", &vol).await;
    assert_eq!(status, StatusCode::OK, "{second}");
    let networks = app
        .inspect(second["container_id"].as_str().unwrap())
        .await
        .network_settings
        .unwrap()
        .networks
        .unwrap();
    assert_eq!(networks.keys().collect::<Vec<_>>(), [TEST_NETWORK_ALT]);
    assert_eq!(
        networks[TEST_NETWORK_ALT].ip_address.as_deref(),
        second["endpoint"]["ip"].as_str()
    );
}
