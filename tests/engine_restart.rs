//! The Docker engine itself is restarted under a running sandboxd. This is the only test in its
//! binary, and cargo runs test binaries one after another, so no other test sees the engine go.
//!
//! It stops the host's dockerd, so a plain `cargo test` never runs it: it is `#[ignore]`d and
//! refuses to run without `SANDBOXD_TEST_STOPS_ENGINE=1`. `scripts/test.sh` (and so CI) sets
//! the variable and runs it with `--ignored`.

#[path = "integration/support.rs"]
mod support;

use std::process::Command;
use std::time::Duration;

use reqwest::StatusCode;
use support::*;

/// Starts the engine again however the test ends.
struct EngineBack;

impl Drop for EngineBack {
    fn drop(&mut self) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/provision.sh");
        let ok = Command::new("bash")
            .arg(script)
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok || std::thread::panicking(),
            "could not start the engine again"
        );
    }
}

fn stop_engine() {
    let pid = std::fs::read_to_string("/var/run/docker.pid").expect("dockerd pid file");
    let pid = pid.trim().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    for _ in 0..600 {
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("dockerd {pid} did not stop within 60 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "stops the host's dockerd: run by scripts/test.sh with SANDBOXD_TEST_STOPS_ENGINE=1"]
async fn an_engine_restart_converges_again_without_duplicates() {
    assert_eq!(
        std::env::var("SANDBOXD_TEST_STOPS_ENGINE").as_deref(),
        Ok("1"),
        "this test stops the host's dockerd; set SANDBOXD_TEST_STOPS_ENGINE=1 to allow it"
    );
    let app = TestApp::spawn_with(|s| {
        s.controller.backoff_initial_ms = 200;
        s.controller.backoff_max_seconds = 2;
    })
    .await;
    let chats: Vec<String> = (0..3).map(|_| new_chat()).collect();
    let mut sessions = Vec::new();
    for (i, chat) in chats.iter().enumerate() {
        let (status, body) = app.create(chat, "a", &app.volume(&format!("v{i}"))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        sessions.push(body["session_id"].clone());
    }
    // A fourth one hibernated before the engine goes: it must stay hibernated.
    let sleeper = new_chat();
    let (status, body) = app.create(&sleeper, "a", &app.volume("sleeper")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let sleeper_id = body["container_id"].as_str().unwrap().to_string();
    let (status, v) = app
        .post_json(
            &format!("/api/v1/sandboxes/{sleeper}/hibernate?wait=30"),
            &serde_json::json!({}),
        )
        .await;
    assert_eq!(
        (status, v["phase"].as_str()),
        (StatusCode::OK, Some("hibernated")),
        "{v}"
    );

    {
        let _back = EngineBack;
        tokio::task::spawn_blocking(stop_engine).await.unwrap();
        // While the engine is gone the API still answers.
        let (status, _) = app.get("/api/v1/sandboxes").await;
        assert_eq!(status, StatusCode::OK);
        let (status, _) = app.get("/api/v1/ready").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    } // engine started again here

    wait_until(
        Duration::from_secs(60),
        "the three running ones running on the restarted engine",
        || async {
            let cs = app.containers().await;
            let running = cs
                .iter()
                .filter(|c| c.state == Some(bollard::models::ContainerSummaryStateEnum::RUNNING))
                .count();
            let (_, list) = app.get("/api/v1/sandboxes?phase=running").await;
            (cs.len() == 4 && running == 3 && list["items"].as_array()?.len() == 3).then_some(())
        },
    )
    .await;
    for (chat, session) in chats.iter().zip(&sessions) {
        let (_, v) = app.get(&format!("/api/v1/sandboxes/{chat}")).await;
        assert_eq!(
            &v["session_id"], session,
            "same session after the engine restart"
        );
        let id = v["container_id"].as_str().unwrap();
        let c = app.inspect(id).await;
        assert_eq!(c.state.unwrap().running, Some(true));
        let ip = v["endpoint"]["ip"].as_str().unwrap();
        assert!(agent_answers(ip, 8000).await, "{chat} reachable at {ip}");
    }
    // The hibernated one was not started by the engine restart nor by adoption, and several
    // passes later it is still the same stopped container.
    app.wait_for_passes(3).await;
    let (_, v) = app.get(&format!("/api/v1/sandboxes/{sleeper}")).await;
    assert_eq!(
        (v["phase"].as_str(), v["container_id"].as_str()),
        (Some("hibernated"), Some(sleeper_id.as_str())),
        "{v}"
    );
    let c = app.inspect(&sleeper_id).await;
    assert_eq!(c.state.unwrap().running, Some(false), "still stopped");
    // And a call brings it back, in place.
    let (status, again) = app.create(&sleeper, "a", &app.volume("sleeper")).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["container_id"], sleeper_id.as_str());
}
