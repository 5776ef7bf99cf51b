//! Docker faults, injected for real through the proxy in front of the engine.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;

use crate::proxy::DockerProxy;
use crate::support::*;

async fn app_behind(
    proxy: &DockerProxy,
    tweak: impl FnOnce(&mut sandboxd::config::Settings),
) -> TestApp {
    let url = proxy.base_url();
    TestApp::spawn_with(move |s| {
        s.docker.base_url = url;
        tweak(s);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_down_keeps_the_api_up_backs_off_and_converges_when_it_returns() {
    let pdir = tempfile::tempdir().unwrap();
    let proxy = DockerProxy::start(pdir.path()).await;
    let app = app_behind(&proxy, |s| {
        s.controller.backoff_initial_ms = 200;
        s.controller.backoff_max_seconds = 2;
        s.controller.create_wait_seconds = 10;
    })
    .await;
    let running = new_chat();
    let (status, before) = app.create(&running, "agent", &app.volume("up")).await;
    assert_eq!(status, StatusCode::OK, "{before}");

    proxy.set_down(true);
    let down_since = Instant::now();
    // Desired-state writes keep working.
    let later = new_chat();
    let r = app
        .client
        .put(app.url(&format!("/api/v1/sandboxes/{later}")))
        .json(&json!({"agent_id": "agent", "volume_host_path": app.volume("later")}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // The old contract answers 503 promptly instead of hanging.
    let (status, body) = app.create(&new_chat(), "agent", &app.volume("x")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("docker engine unavailable"),
        "{body}"
    );
    let (status, ready) = app.get("/api/v1/ready").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        ready["detail"].as_str().unwrap().contains("docker"),
        "{ready}"
    );
    let (status, _) = app.get(&format!("/api/v1/sandboxes/{running}")).await;
    assert_eq!(status, StatusCode::OK, "reads keep working");

    // No hot loop: count reconnection attempts over a few seconds.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let attempts = proxy.refused();
    let per_second = attempts as f64 / down_since.elapsed().as_secs_f64();
    assert!(attempts >= 2, "it keeps trying ({attempts})");
    assert!(
        per_second <= 3.0,
        "{attempts} attempts in {:?}",
        down_since.elapsed()
    );

    proxy.set_down(false);
    wait_until(
        Duration::from_secs(30),
        "the later sandbox running",
        || async {
            let (_, v) = app.get(&format!("/api/v1/sandboxes/{later}")).await;
            (v["phase"] == "running").then_some(())
        },
    )
    .await;
    wait_until(Duration::from_secs(10), "ready again", || async {
        (app.get("/api/v1/ready").await.0 == StatusCode::OK).then_some(())
    })
    .await;
    let (_, after) = app.create(&running, "agent", &app.volume("up")).await;
    assert_eq!(
        after["container_id"], before["container_id"],
        "the running sandbox was not touched"
    );
    // Every live chat has exactly one container (the 503'd one retried in the background too).
    wait_until(
        Duration::from_secs(20),
        "one container per chat",
        || async {
            let rows = app.db_scalar("SELECT count(*) FROM sandboxes").await;
            let cs = app.containers().await;
            (cs.len() as i64 == rows).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_events_a_killed_or_stopped_container_is_corrected_within_a_resync() {
    let pdir = tempfile::tempdir().unwrap();
    let proxy = DockerProxy::start(pdir.path()).await;
    proxy.hide_events(true);
    let app = app_behind(&proxy, |s| s.sandbox.cleanup_interval_seconds = 2).await;
    let chat = new_chat();
    let (_, first) = app.create(&chat, "agent", &app.volume("k")).await;
    let old = first["container_id"].as_str().unwrap().to_string();
    app.docker
        .kill_container(
            &old,
            None::<bollard::query_parameters::KillContainerOptions>,
        )
        .await
        .unwrap();
    let killed_at = Instant::now();
    let replacement = wait_until(
        Duration::from_secs(15),
        "replacement after kill",
        || async {
            let (_, v) = app.get(&format!("/api/v1/sandboxes/{chat}")).await;
            let id = v["container_id"].as_str()?.to_string();
            (v["phase"] == "running" && id != old).then_some(id)
        },
    )
    .await;
    // By the 2 s resync (there are no events here): a few periods' slack for a loaded engine.
    assert!(
        killed_at.elapsed() < Duration::from_secs(12),
        "{:?}",
        killed_at.elapsed()
    );

    app.docker
        .stop_container(
            &replacement,
            None::<bollard::query_parameters::StopContainerOptions>,
        )
        .await
        .unwrap();
    wait_until(
        Duration::from_secs(15),
        "replacement after stop",
        || async {
            let (_, v) = app.get(&format!("/api/v1/sandboxes/{chat}")).await;
            (v["phase"] == "running" && v["container_id"].as_str()? != replacement).then_some(())
        },
    )
    .await;
    wait_until(Duration::from_secs(10), "one container", || async {
        (app.containers().await.len() == 1).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_or_failing_chat_does_not_block_the_others() {
    let pdir = tempfile::tempdir().unwrap();
    let proxy = DockerProxy::start(pdir.path()).await;
    let app = app_behind(&proxy, |_| {}).await;
    let slow = new_chat();
    let failing = new_chat();
    // The container name carries the chat id, so its create request can be picked out.
    // Long enough that the other chats, even on an engine busy with parallel tests, finish
    // well before it: if they had to wait for it, they could not.
    const SLOW: Duration = Duration::from_secs(25);
    proxy.slow_down(&slow, SLOW);
    proxy.fail(Some(&failing));

    let slow_call = {
        let body = json!({"agent_id": "a", "volume_host_path": app.volume("slow")});
        app.client
            .put(app.url(&format!("/api/v1/sandboxes/{slow}")))
            .json(&body)
            .send()
    };
    assert_eq!(slow_call.await.unwrap().status(), StatusCode::OK);
    let (status, body) = app.create(&failing, "a", &app.volume("fail")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("injected failure"),
        "{body}"
    );

    let started = Instant::now();
    for i in 0..3 {
        let (status, body) = app
            .create(&new_chat(), "a", &app.volume(&format!("ok{i}")))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let others = started.elapsed();
    let (_, v) = app.get(&format!("/api/v1/sandboxes/{slow}")).await;
    assert_eq!(
        v["phase"], "pending",
        "the slow chat is still being started: {v}"
    );
    assert!(
        others < SLOW,
        "other chats took {others:?}: they waited for the slow one"
    );

    proxy.fail(None);
    wait_until(
        Duration::from_secs(45),
        "slow and failing chats running in the end",
        || async {
            let (_, a) = app.get(&format!("/api/v1/sandboxes/{slow}")).await;
            let (_, b) = app.get(&format!("/api/v1/sandboxes/{failing}")).await;
            (a["phase"] == "running" && b["phase"] == "running").then_some(())
        },
    )
    .await;
    assert_eq!(app.containers().await.len(), 5);
}
