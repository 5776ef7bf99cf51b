//! Hibernation against the real engine: pause and hibernate keep the container (its own
//! filesystem, its processes when paused), calls resume it transparently, idle timers fire on
//! their own, `on_expiry: hibernate` keeps a sandbox past its TTL, and SIGKILL in the middle
//! of any transition converges to the declared state with the same container.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::dataplane::exec;
use crate::restart::post;
use crate::support::*;
use crate::watch::SseReader;

async fn sh(app: &TestApp, chat: &str, command: &str) -> String {
    let (status, out) = exec(
        app,
        chat,
        json!({"command": command, "timeout_seconds": 20}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{out}");
    assert_eq!(out["exit_code"], 0, "{out}");
    out["stdout"]
        .as_str()
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Prints `mounted` when `/tmp` is a mount point (the image has no grep).
const NOT_A_MOUNT: &str =
    "while read -r _ m _; do [ \"$m\" = /tmp ] && echo mounted; done < /proc/mounts; true";

/// The counter's value; 0 before it first wrote. The loop rewrites the file in place, so a
/// read can land between truncation and write (empty): read again.
async fn count(app: &TestApp, chat: &str) -> u64 {
    for _ in 0..50 {
        let out = sh(app, chat, "cat /tmp/count 2>/dev/null || echo 0").await;
        if let Ok(n) = out.parse() {
            return n;
        }
    }
    panic!("the counter file stayed unreadable");
}

async fn view(app: &TestApp, chat: &str) -> Value {
    let (status, v) = app.get(&format!("/api/v1/sandboxes/{chat}")).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    v
}

/// `running`, `paused` or `exited`, as the engine shows the container.
async fn engine_state(app: &TestApp, id: &str) -> String {
    let state = app.inspect(id).await.state.expect("state");
    match state.status {
        Some(s) => s.to_string(),
        None => "unknown".into(),
    }
}

/// `POST …/{call}?wait=30` and its answer, checked to have settled in `phase`.
pub async fn settle(app: &TestApp, chat: &str, call: &str, phase: &str) -> Value {
    let (status, v) = app
        .post_json(
            &format!("/api/v1/sandboxes/{chat}/{call}?wait=30"),
            &json!({}),
        )
        .await;
    assert_eq!(
        (status, v["phase"].as_str()),
        (StatusCode::OK, Some(phase)),
        "{v}"
    );
    v
}

async fn events_of(app: &TestApp, chat: &str) -> Vec<Value> {
    let (_, events) = app.get(&format!("/api/v1/sandboxes/{chat}/events")).await;
    events.as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hibernated_sandbox_keeps_its_container_and_files_and_an_old_create_resumes_it() {
    let app = TestApp::spawn().await;
    let chat = new_chat();
    let vol = app.volume("h");
    let (status, first) = app.create(&chat, "a", &vol).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let id = first["container_id"].as_str().unwrap().to_string();
    // Written into the container's own filesystem, not a mount (on both engines `/tmp` of
    // this image is a plain directory of the writable layer, and `/` is not writable on
    // Podman without CAP_DAC_OVERRIDE).
    assert_eq!(
        sh(&app, &chat, NOT_A_MOUNT).await,
        "",
        "/tmp is in the writable layer"
    );
    sh(&app, &chat, "echo kept > /tmp/kept.txt").await;

    let v = settle(&app, &chat, "hibernate", "hibernated").await;
    assert_eq!(v["state"], "hibernated", "{v}");
    assert!(
        v["endpoint"].is_null(),
        "a stopped container has no address: {v}"
    );
    assert_eq!(v["container_id"], id.as_str());
    assert_eq!(engine_state(&app, &id).await, "exited");

    // The old contract, unchanged: the same session and container, running again.
    let (status, again) = app.create(&chat, "a", &vol).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["session_id"], first["session_id"]);
    assert_eq!(again["container_id"], id.as_str());
    assert_eq!(again["status"], "running");
    let ip = again["endpoint"]["ip"].as_str().unwrap();
    assert!(agent_answers(ip, 8000).await, "the agent serves at {ip}");
    assert_eq!(engine_state(&app, &id).await, "running");
    assert_eq!(sh(&app, &chat, "cat /tmp/kept.txt").await, "kept");

    let v = view(&app, &chat).await;
    assert_eq!(
        (v["state"].as_str(), v["restarts"].as_u64()),
        (Some("running"), Some(0)),
        "{v}"
    );
    let events = events_of(&app, &chat).await;
    let actions: Vec<&str> = events.iter().filter_map(|e| e["action"].as_str()).collect();
    assert!(
        actions.contains(&"hibernate") && actions.contains(&"resume"),
        "{actions:?}"
    );
    assert!(
        !actions.contains(&"exit"),
        "the stop was no crash: {actions:?}"
    );
    let resume = events.iter().find(|e| e["action"] == "resume").unwrap();
    assert!(
        resume["detail"]
            .as_str()
            .unwrap()
            .contains("\"start\":\"resume\""),
        "{resume}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_counter_keeps_counting_from_where_it_was_across_pause_and_resume() {
    let app = TestApp::spawn().await;
    let chat = new_chat();
    let (status, body) = app.create(&chat, "a", &app.volume("c")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let id = body["container_id"].as_str().unwrap().to_string();
    sh(
        &app,
        &chat,
        "sh -c 'echo $$ > /tmp/pid; i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.05; done' \
         >/dev/null 2>&1 </dev/null &",
    )
    .await;
    // The counting rate on this machine, measured.
    let c0 = wait_until(Duration::from_secs(10), "the counter counting", || async {
        Some(count(&app, &chat).await).filter(|c| *c > 0)
    })
    .await;
    let t0 = Instant::now();
    let c1 = wait_until(Duration::from_secs(20), "20 more counts", || async {
        Some(count(&app, &chat).await).filter(|c| *c >= c0 + 20)
    })
    .await;
    let rate = (c1 - c0) as f64 / t0.elapsed().as_secs_f64();
    let pid = sh(&app, &chat, "cat /tmp/pid").await;

    let before = count(&app, &chat).await;
    settle(&app, &chat, "pause", "paused").await;
    assert_eq!(engine_state(&app, &id).await, "paused");
    let frozen = Duration::from_secs(3);
    // Time passing is what this checks: nothing counts while frozen.
    tokio::time::sleep(frozen).await;
    // An exec resumes it first (transparent resume), then reads.
    let after = count(&app, &chat).await;
    assert!(
        after >= before,
        "counted on from where it was: {before} → {after}"
    );
    let would_have = rate * frozen.as_secs_f64();
    assert!(
        ((after - before) as f64) < would_have / 2.0,
        "frozen while paused: {before} → {after}, unpaused it would have counted ≈ {would_have:.0}"
    );
    assert_eq!(
        sh(&app, &chat, "cat /tmp/pid").await,
        pid,
        "the same process"
    );
    wait_until(Duration::from_secs(10), "counting again", || async {
        Some(count(&app, &chat).await).filter(|c| *c > after)
    })
    .await;
    assert_eq!(view(&app, &chat).await["phase"], "running");
    assert_eq!(engine_state(&app, &id).await, "running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_on_a_declared_hibernated_sandbox_resumes_it_and_succeeds() {
    let app = TestApp::spawn().await;
    let chat = new_chat();
    let vol = app.volume("e");
    let body = json!({"agent_id": "a", "volume_host_path": vol, "state": "hibernated"});
    let (status, applied) = app
        .put_json(
            &format!("/api/v1/sandboxes/{chat}?wait=30"),
            &json!({"agent_id": "a", "volume_host_path": vol}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{applied}");
    let id = wait_until(Duration::from_secs(30), "running", || async {
        let v = view(&app, &chat).await;
        (v["phase"] == "running").then(|| v["container_id"].as_str().unwrap().to_string())
    })
    .await;
    let (status, applied) = app
        .put_json(&format!("/api/v1/sandboxes/{chat}?wait=30"), &body)
        .await;
    assert_eq!(status, StatusCode::OK, "{applied}");
    assert_eq!(applied["outcome"], "state_changed", "{applied}");
    assert_eq!(applied["sandbox"]["phase"], "hibernated", "{applied}");
    assert_eq!(engine_state(&app, &id).await, "exited");

    assert_eq!(sh(&app, &chat, "echo hi").await, "hi");
    let v = view(&app, &chat).await;
    assert_eq!(
        (v["phase"].as_str(), v["state"].as_str()),
        (Some("running"), Some("running")),
        "{v}"
    );
    assert_eq!(v["container_id"], id.as_str());
    let declared = events_of(&app, &chat).await.into_iter().find(|e| {
        e["action"] == "state_declared"
            && e["detail"]
                .as_str()
                .unwrap_or("")
                .contains("\"by\":\"exec\"")
    });
    assert!(declared.is_some(), "the exec's resume is in the history");
    // Unknown states are named.
    let (status, bad) = app
        .put_json(
            &format!("/api/v1/sandboxes/{chat}"),
            &json!({"agent_id": "a", "volume_host_path": vol, "state": "asleep"}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}");
    assert_eq!(bad["detail"][0]["loc"], json!(["body", "state"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timers_pause_then_hibernate_with_no_call_and_the_watch_stream_shows_it_in_order() {
    let app = TestApp::spawn_with(|s| {
        s.sandbox.idle_pause_seconds = 1;
        // Four seconds between the steps: under the full suite a pass may come seconds late,
        // and a pass after both deadlines rightly goes straight to hibernated.
        s.sandbox.idle_hibernate_seconds = 5;
    })
    .await;
    let chat = new_chat();
    let mut stream =
        SseReader::open(&app, &format!("/api/v1/sandboxes/{chat}?watch=true"), None).await;
    let (status, body) = app.create(&chat, "a", &app.volume("i")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let id = body["container_id"].as_str().unwrap().to_string();
    // No call reaches the sandbox: the timers alone move it (reads of the view are no calls).
    let mut phases: Vec<String> = Vec::new();
    while phases.last().map(String::as_str) != Some("hibernated") {
        let ev = stream
            .next(Duration::from_secs(30))
            .await
            .expect("an event");
        let action = ev.data["action"].as_str().unwrap_or_default().to_string();
        if ["pause", "hibernate", "resume"].contains(&action.as_str()) {
            phases.push(ev.data["phase"].as_str().unwrap_or_default().to_string());
        }
    }
    assert_eq!(engine_state(&app, &id).await, "exited");
    let v = view(&app, &chat).await;
    assert_eq!(
        (v["state"].as_str(), v["phase"].as_str()),
        (Some("running"), Some("hibernated")),
        "{v}"
    );
    // The next call brings it back.
    assert_eq!(sh(&app, &chat, "echo back").await, "back");
    while phases.last().map(String::as_str) != Some("running") {
        let ev = stream
            .next(Duration::from_secs(30))
            .await
            .expect("an event");
        if ev.data["action"] == "resume" {
            phases.push(ev.data["phase"].as_str().unwrap_or_default().to_string());
        }
    }
    assert_eq!(phases, ["paused", "hibernated", "running"]);
    assert_eq!(view(&app, &chat).await["container_id"], id.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_expiry_hibernate_keeps_the_sandbox_and_an_old_create_gets_it_back() {
    let app = TestApp::spawn_with(|s| {
        s.sandbox.ttl_seconds = 2;
        s.sandbox.on_expiry = sandboxd::domain::hibernation::OnExpiry::Hibernate;
    })
    .await;
    let chat = new_chat();
    let vol = app.volume("x");
    let (status, first) = app.create(&chat, "a", &vol).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let id = first["container_id"].as_str().unwrap().to_string();
    let v = wait_until(Duration::from_secs(30), "hibernated at expiry", || async {
        let v = view(&app, &chat).await;
        (v["phase"] == "hibernated" && v["endpoint"].is_null()).then_some(v)
    })
    .await;
    assert_eq!(v["state"], "hibernated");
    assert_eq!(engine_state(&app, &id).await, "exited");
    let (status, again) = app.create(&chat, "a", &vol).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(
        (&again["session_id"], again["container_id"].as_str()),
        (&first["session_id"], Some(id.as_str()))
    );
    let expires = sandboxd::domain::parse_time(again["expires_at"].as_str().unwrap()).unwrap();
    assert!(expires > chrono::Utc::now(), "a fresh TTL: {expires}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_in_the_middle_of_each_transition_converges_to_the_declared_state() {
    let fx = ProcessFixture::new(|_| {});
    let docker = docker().await;
    let client = reqwest::Client::new();
    let mut server = fx.start().await;
    let chat = new_chat();
    let (status, body) = post(
        server.addr,
        "/api/v1/create",
        &json!({"chat_id": chat, "agent_id": "a", "volume_host_path": fx.vol}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let id = body["container_id"].as_str().unwrap().to_string();
    let (status, out) = post(
        server.addr,
        &format!("/api/v1/sandboxes/{chat}/exec"),
        &json!({"command": "echo kept > /tmp/kept.txt"}),
    )
    .await;
    assert_eq!(
        (status, out["exit_code"].as_i64()),
        (StatusCode::OK, Some(0)),
        "{out}"
    );

    let steps = [
        ("pause", "paused", "paused"),
        ("hibernate", "hibernated", "exited"),
        ("resume", "running", "running"),
        ("hibernate", "hibernated", "exited"),
        ("pause", "paused", "paused"),
        ("resume", "running", "running"),
    ];
    for (round, (call, phase, engine)) in steps.into_iter().enumerate() {
        let (status, v) = post(
            server.addr,
            &format!("/api/v1/sandboxes/{chat}/{call}"),
            &json!({}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{call}: {v}");
        if round % 2 == 1 {
            // Later in the transition: once the phase is written (before or after the engine
            // call, whichever the kill lands on).
            wait_until(Duration::from_secs(20), "the phase written", || {
                let client = client.clone();
                let url = format!("http://{}/api/v1/sandboxes/{chat}", server.addr);
                async move { (try_get_json(&client, &url).await?["phase"] == phase).then_some(()) }
            })
            .await;
        }
        server.kill9();
        server = fx.start().await;
        let url = format!("http://{}/api/v1/sandboxes/{chat}", server.addr);
        let v = wait_until(Duration::from_secs(30), "settled after the restart", || {
            let (client, url) = (client.clone(), url.clone());
            async move {
                let v = try_get_json(&client, &url).await?;
                let settled =
                    v["phase"] == phase && (phase != "hibernated" || v["endpoint"].is_null());
                settled.then_some(v)
            }
        })
        .await;
        assert_eq!(
            v["container_id"],
            id.as_str(),
            "round {round} ({call}): the same container"
        );
        let ours = containers_of(&docker, &fx.settings.controller.instance).await;
        assert_eq!(ours.len(), 1, "round {round}: one container");
        let state = ours[0].state.map(|s| s.to_string()).unwrap_or_default();
        assert_eq!(state, engine, "round {round} ({call})");
    }
    let (status, out) = post(
        server.addr,
        &format!("/api/v1/sandboxes/{chat}/exec"),
        &json!({"command": "cat /tmp/kept.txt"}),
    )
    .await;
    assert_eq!(
        (status, out["stdout"].as_str()),
        (StatusCode::OK, Some("kept\n")),
        "{out}"
    );
    let v = try_get_json(
        &client,
        &format!("http://{}/api/v1/sandboxes/{chat}", server.addr),
    )
    .await
    .unwrap();
    assert_eq!(v["restarts"], 0, "no transition was taken for a crash: {v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_on_a_hibernated_sandbox_share_one_resume() {
    let app = TestApp::spawn().await;
    let chat = new_chat();
    let (status, body) = app.create(&chat, "a", &app.volume("k")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let id = body["container_id"].as_str().unwrap().to_string();
    settle(&app, &chat, "hibernate", "hibernated").await;
    // Six execs (under data_plane.max_concurrent_per_sandbox), two old-contract creates and
    // two renews, all at once.
    let vol = app.volume("k");
    let execs = futures::future::join_all((0..6).map(|i| {
        let (app, chat) = (&app, chat.clone());
        async move { sh(app, &chat, &format!("echo {i}")).await }
    }));
    let creates = futures::future::join_all((0..2).map(|_| app.create(&chat, "a", &vol)));
    let renew = format!("/api/v1/sandboxes/{chat}/renew");
    let empty = json!({});
    let renews = futures::future::join_all((0..2).map(|_| app.post_json(&renew, &empty)));
    let (outs, created, renewed) = tokio::join!(execs, creates, renews);
    assert_eq!(outs, (0..6).map(|i| i.to_string()).collect::<Vec<_>>());
    for (status, body) in created {
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["container_id"], id.as_str());
    }
    for (status, body) in renewed {
        assert_eq!(
            (status, body["phase"].as_str()),
            (StatusCode::OK, Some("running")),
            "{body}"
        );
    }
    let resumes = events_of(&app, &chat)
        .await
        .into_iter()
        .filter(|e| e["action"] == "resume")
        .count();
    assert_eq!(resumes, 1, "one resume for ten calls of three kinds");
    assert_eq!(view(&app, &chat).await["container_id"], id.as_str());
    assert_eq!(app.containers().await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_the_engine_refuses_falls_back_to_a_cold_start_of_the_same_session() {
    let app = TestApp::spawn().await;
    let chat = new_chat();
    let vol = app.volume("f");
    let (status, first) = app.create(&chat, "a", &vol).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    settle(&app, &chat, "hibernate", "hibernated").await;
    // The chat directory (a bind source) goes while it sleeps: the engine refuses to start
    // the stopped container again ("bind source path does not exist").
    let chat_dir = app.settings.sandbox.chats_root.join(&chat);
    std::fs::remove_dir_all(&chat_dir).expect("remove the chat directory");
    let (status, again) = app.create(&chat, "a", &vol).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["session_id"], first["session_id"], "the same session");
    assert_ne!(again["container_id"], first["container_id"], "started cold");
    assert!(chat_dir.is_dir(), "the chat directory made again");
    assert_eq!(
        app.containers().await.len(),
        1,
        "the refused container went"
    );
    let events = events_of(&app, &chat).await;
    let resume = events
        .iter()
        .find(|e| e["action"] == "resume")
        .expect("a resume event");
    assert!(
        resume["detail"]
            .as_str()
            .unwrap_or("")
            .contains("resume_fallback"),
        "{resume}"
    );
    let text = get_text(&app.client, &app.url("/metrics")).await;
    assert!(
        text.lines()
            .any(|l| l.starts_with("sandboxd_resume_fallbacks_total 1")),
        "the fallback is counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_serving_a_long_call_is_not_idle_and_sleeps_after_it() {
    let app = TestApp::spawn_with(|s| s.sandbox.idle_pause_seconds = 1).await;
    let chat = new_chat();
    let (status, body) = app.create(&chat, "a", &app.volume("l")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Three seconds of work, longer than the idle step: never frozen under it.
    let started = Instant::now();
    assert_eq!(sh(&app, &chat, "sleep 3; echo done").await, "done");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "not frozen: {:?}",
        started.elapsed()
    );
    let paused_during = events_of(&app, &chat)
        .await
        .into_iter()
        .filter(|e| e["action"] == "pause")
        .count();
    assert_eq!(paused_during, 0, "no pause while the call ran");
    // Idle after the call: paused by the timer.
    wait_until(Duration::from_secs(30), "paused after the call", || async {
        (view(&app, &chat).await["phase"] == "paused").then_some(())
    })
    .await;
}
