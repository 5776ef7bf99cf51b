//! `docker.pull_policy: build` (one build for racing starts, output in the event log, a failed
//! build is a start error with backoff) and published agent ports.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

use crate::support::*;

/// Removes a test-built image when the test ends, however it ends.
struct ImageGuard(String);

impl Drop for ImageGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new(engine().cli())
            .args(["rmi", "-f", &self.0])
            .output();
    }
}

/// A sandboxd with pull policy `build`, a context whose Dockerfile runs `run` on the local
/// test image, and a fresh image name (removed at the end, as is the context).
async fn building_app(tag: &str, run: &str) -> (TestApp, ImageGuard, tempfile::TempDir) {
    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(
        ctx.path().join("Dockerfile"),
        format!("FROM {TEST_IMAGE}\nRUN {run}\n"),
    )
    .unwrap();
    let image = format!("sandboxd-test/{tag}-{}:latest", unique_instance());
    let guard = ImageGuard(image.clone());
    let app = TestApp::spawn_with(|s| {
        s.docker.pull_policy = sandboxd::config::PullPolicy::Build;
        s.docker.build_context = Some(ctx.path().to_path_buf());
        s.sandbox.image = image.clone();
    })
    .await;
    (app, guard, ctx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_image_is_built_once_for_fifty_racing_creates() {
    let (app, _image, _ctx) = building_app("built", "echo built-by-sandboxd > /built.txt").await;
    let chats: Vec<String> = (0..50).map(|_| new_chat()).collect();
    let vol = app.volume("v");
    let puts = chats.iter().map(|chat| {
        app.client
            .put(app.url(&format!("/api/v1/sandboxes/{chat}")))
            .json(&json!({"agent_id": "a", "volume_host_path": vol}))
            .send()
    });
    for r in futures::future::join_all(puts).await {
        assert!(r.unwrap().status().is_success());
    }
    wait_until(Duration::from_secs(120), "all 50 running", || async {
        let (_, page) = app.get("/api/v1/sandboxes?phase=running&limit=100").await;
        (page["items"].as_array().map_or(0, Vec::len) == 50).then_some(())
    })
    .await;
    let builds = app
        .db_scalar("SELECT count(*) FROM sandbox_events WHERE action = 'image_build'")
        .await;
    assert_eq!(builds, 1, "built once");
    let with_log = app
        .db_scalar("SELECT count(*) FROM sandbox_events WHERE action = 'image_build' AND outcome = 'ok' AND json_extract(detail, '$.log') LIKE '%built-by-sandboxd%'")
        .await;
    assert_eq!(with_log, 1, "the build output is in the event log");
    let (status, out) = app
        .post_json(
            &format!("/api/v1/sandboxes/{}/exec", chats[0]),
            &json!({"command": "cat /built.txt"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(out["stdout"], "built-by-sandboxd\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_build_is_a_clear_start_error_with_backoff() {
    let (app, _image, _ctx) = building_app("broken", "echo about-to-fail && exit 3").await;
    let chat = new_chat();
    let (status, body) = app.create(&chat, "a", &app.volume("v")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(detail_text(&body).contains("building image"), "{body}");
    let (_, view) = app.get(&format!("/api/v1/sandboxes/{chat}")).await;
    assert_eq!(view["phase"], "failed");
    assert!(view["attempts"].as_u64().unwrap() >= 1);
    assert!(
        view["next_attempt_at"].is_string(),
        "retried with backoff: {view}"
    );
    let failed = app
        .db_scalar("SELECT count(*) FROM sandbox_events WHERE action = 'image_build' AND outcome = 'error' AND json_extract(detail, '$.log') LIKE '%about-to-fail%'")
        .await;
    assert!(failed >= 1, "the failed build's output is in the event log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_agent_port_shows_in_the_view_and_the_old_response_is_unchanged() {
    let app = TestApp::spawn_with(|s| s.sandbox.publish_agent_port = true).await;
    let chat = new_chat();
    let (status, body) = app.create(&chat, "a", &app.volume("v")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let keys: Vec<&str> = body
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut expected = SESSION_KEYS.to_vec();
    expected.sort_unstable();
    let mut keys_sorted = keys.clone();
    keys_sorted.sort_unstable();
    assert_eq!(
        keys_sorted, expected,
        "the old create response keeps its shape"
    );
    let (_, view) = app.get(&format!("/api/v1/sandboxes/{chat}")).await;
    let port = view["host_port"].as_u64().expect("host_port in the view");
    assert!(
        agent_answers("127.0.0.1", port).await,
        "the agent answers on 127.0.0.1:{port}"
    );
    let inspect = app.inspect(body["container_id"].as_str().unwrap()).await;
    let bindings = inspect.host_config.unwrap().port_bindings.unwrap();
    let binding = &bindings["8000/tcp"].as_ref().unwrap()[0];
    assert_eq!(binding.host_ip.as_deref(), Some("127.0.0.1"));

    // Off (the default): no host port, nothing published.
    let plain = TestApp::spawn().await;
    let chat = new_chat();
    let (_, body) = plain.create(&chat, "a", &plain.volume("v")).await;
    let (_, view) = plain.get(&format!("/api/v1/sandboxes/{chat}")).await;
    assert!(view.get("host_port").is_none(), "{view}");
    let inspect = plain.inspect(body["container_id"].as_str().unwrap()).await;
    assert!(inspect
        .host_config
        .unwrap()
        .port_bindings
        .is_none_or(|b| b.is_empty()));
}
