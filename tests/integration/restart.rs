//! Process-level: the built binary is killed with SIGKILL while sandboxes run, then started
//! again over the same database. Nothing is restarted, lost or duplicated.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::support::*;

pub async fn post(addr: std::net::SocketAddr, path: &str, body: &Value) -> (StatusCode, Value) {
    let r = reqwest::Client::new()
        .post(format!("http://{addr}{path}"))
        .json(body)
        .send()
        .await
        .expect("request");
    (r.status(), r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_and_restart_adopts_the_running_containers_untouched() {
    let fx = ProcessFixture::new(|_| {});
    let (settings, vol) = (&fx.settings, &fx.vol);
    let docker = docker().await;

    let mut server = fx.start().await;
    let chats: Vec<String> = (0..3).map(|_| new_chat()).collect();
    let mut before = Vec::new();
    for chat in &chats {
        let (status, body) = post(
            server.addr,
            "/api/v1/create",
            &json!({"chat_id": chat, "agent_id": "a", "volume_host_path": vol}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let id = body["container_id"].as_str().unwrap().to_string();
        let started_at = docker
            .inspect_container(&id, None)
            .await
            .unwrap()
            .state
            .unwrap()
            .started_at;
        before.push((body, id, started_at));
    }

    server.kill9();
    // While sandboxd is down a container disappears by hand: recreated after the restart.
    let removed_id = before[2].1.clone();
    docker
        .remove_container(
            &removed_id,
            Some(
                bollard::query_parameters::RemoveContainerOptionsBuilder::new()
                    .force(true)
                    .build(),
            ),
        )
        .await
        .unwrap();

    let server = fx.start().await;
    let client = reqwest::Client::new();
    // The row still names the removed container until the first pass after the restart sees
    // it is gone and starts a replacement.
    wait_until(
        Duration::from_secs(20),
        "the removed sandbox recreated",
        || {
            let client = client.clone();
            let addr = server.addr;
            let chat = chats[2].clone();
            let removed_id = removed_id.clone();
            async move {
                let v = try_get_json(&client, &format!("http://{addr}/api/v1/sandboxes/{chat}"))
                    .await?;
                (v["phase"] == "running" && v["container_id"].as_str()? != removed_id).then_some(())
            }
        },
    )
    .await;

    for (body, id, started_at) in &before[..2] {
        let c = docker
            .inspect_container(id, None)
            .await
            .expect("adopted container still exists");
        let state = c.state.unwrap();
        assert_eq!(state.running, Some(true));
        assert_eq!(
            &state.started_at, started_at,
            "container {id} was restarted"
        );
        // Same answer as before the crash.
        let (status, again) = post(
            server.addr,
            "/api/v1/create",
            &json!({"chat_id": body["chat_id"], "agent_id": "a", "volume_host_path": vol}),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(&again, body);
    }
    let (_, recreated) = post(
        server.addr,
        "/api/v1/create",
        &json!({"chat_id": chats[2], "agent_id": "a", "volume_host_path": vol}),
    )
    .await;
    assert_eq!(
        recreated["session_id"], before[2].0["session_id"],
        "same session"
    );
    assert_ne!(
        recreated["container_id"].as_str(),
        Some(removed_id.as_str())
    );

    let cs = containers_of(&docker, &settings.controller.instance).await;
    assert_eq!(cs.len(), 3, "exactly one container per chat");
    assert_eq!(
        db_scalar(&settings.database.path, "SELECT count(*) FROM sandboxes").await,
        3
    );
    // Three starts before the crash, one for the container removed by hand; none for the rest.
    let starts = db_scalar(
        &settings.database.path,
        "SELECT count(*) FROM sandbox_events WHERE action = 'start' AND outcome = 'ok'",
    )
    .await;
    assert_eq!(starts, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_leaves_sandboxes_running_and_a_restart_is_a_no_op() {
    let app = TestApp::spawn().await;
    let chat = new_chat();
    let (status, first) = app.create(&chat, "agent", &app.volume("g")).await;
    assert_eq!(status, StatusCode::OK);
    let (dir, settings, guard) = app.stop().await;
    let app = TestApp::start(dir, settings).await;
    let _guard = guard;
    let id = first["container_id"].as_str().unwrap();
    let state = app.inspect(id).await.state.unwrap();
    assert_eq!(
        state.running,
        Some(true),
        "graceful stop must not stop sandboxes"
    );
    let (_, again) = app.create(&chat, "agent", &app.volume("g")).await;
    assert_eq!(again, first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_promptly_and_leaves_sandboxes_running() {
    let fx = ProcessFixture::new(|_| {});
    let vol = &fx.vol;
    let mut server = fx.start().await;
    let chat = new_chat();
    let (status, body) = post(
        server.addr,
        "/api/v1/create",
        &json!({"chat_id": chat, "agent_id": "a", "volume_host_path": vol}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let probe = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_sandboxd"))
            .arg("--config")
            .arg(&fx.config)
            .arg("probe")
            .status()
            .unwrap()
            .success()
    };
    assert!(probe(), "probe fails against a healthy server");

    let pid = server.child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let exited = wait_until(
        Duration::from_secs(30),
        "sandboxd to exit after SIGTERM",
        || {
            let status = server.child.try_wait().ok().flatten();
            async move { status }
        },
    )
    .await;
    assert!(exited.success(), "exit status {exited}");
    assert!(!probe(), "probe succeeds with the server gone");
    let c = docker()
        .await
        .inspect_container(body["container_id"].as_str().unwrap(), None)
        .await
        .unwrap();
    assert_eq!(
        c.state.unwrap().running,
        Some(true),
        "SIGTERM must not stop sandboxes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_the_same_database_is_refused_until_the_first_stops() {
    let app = TestApp::spawn().await;
    let mut second = app.settings.clone();
    second.http.port = 0;
    let refused = match sandboxd::app::Application::build(second.clone(), None).await {
        Ok(_) => panic!("a second server started on the same database"),
        Err(e) => format!("{e:#}"),
    };
    assert!(refused.contains("another sandboxd is serving"), "{refused}");
    let (_dir, _, _guard) = app.stop().await;
    // Stopped: the database is free again.
    let again = sandboxd::app::Application::build(second, None).await;
    assert!(again.is_ok(), "{:?}", again.err());
}
