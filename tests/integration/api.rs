//! The old contract and the declarative API, end to end.

use std::collections::HashMap;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_runs_a_reachable_sandbox_with_exact_labels_mounts_env_and_network() {
    let app = TestApp::spawn().await;
    let chat = new_chat();
    let vol = app.volume("v1");
    // Non-canonical spellings on input: upper-case UUID, trailing slash and `..` in the path.
    let messy_vol = format!(
        "{}/../{}/",
        vol.display(),
        vol.file_name().unwrap().to_string_lossy()
    );
    let (status, body) = app
        .create(
            &chat.to_uppercase(),
            "agent-7",
            std::path::Path::new(&messy_vol),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    assert_eq!(body["chat_id"], chat);
    assert_eq!(body["agent_id"], "agent-7");
    assert_eq!(body["volume_host_path"], vol.display().to_string());
    assert_eq!(body["status"], "running");
    assert_eq!(body["endpoint"]["port"], 8000);
    let keys: Vec<&str> = body
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut keys_sorted = keys.clone();
    keys_sorted.sort();
    assert_eq!(
        keys_sorted,
        [
            "agent_id",
            "chat_id",
            "container_id",
            "endpoint",
            "expires_at",
            "session_id",
            "status",
            "volume_host_path"
        ]
    );
    let expires =
        chrono::DateTime::parse_from_rfc3339(body["expires_at"].as_str().unwrap()).unwrap();
    let ttl = (expires.with_timezone(&chrono::Utc) - chrono::Utc::now()).num_seconds();
    assert!((290..=300).contains(&ttl), "ttl {ttl}");

    // The endpoint answers HTTP on ip:port.
    let ip = body["endpoint"]["ip"].as_str().unwrap().to_string();
    assert!(
        agent_answers(&ip, 8000).await,
        "agent at {ip}:8000 does not answer"
    );

    // docker inspect: labels, mounts and modes, env, network.
    let id = body["container_id"].as_str().unwrap();
    let c = app.inspect(id).await;
    let labels = c.config.as_ref().unwrap().labels.clone().unwrap();
    let expected: HashMap<String, String> = [
        ("sandboxd.managed", "true"),
        ("sandboxd.instance", app.instance()),
        ("sandboxd.chat_id", chat.as_str()),
        ("sandboxd.session_id", body["session_id"].as_str().unwrap()),
        ("sandboxd.agent_id", "agent-7"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for (k, v) in &expected {
        assert_eq!(labels.get(k), Some(v), "label {k}");
    }
    assert_eq!(labels.get("sandboxd.spec_hash").map(String::len), Some(64));

    let s = &app.settings.sandbox;
    let chats_root = std::fs::canonicalize(&s.chats_root).unwrap();
    let mut mounts: Vec<(String, String, bool)> = c
        .mounts
        .clone()
        .unwrap()
        .into_iter()
        .map(|m| (m.source.unwrap(), m.destination.unwrap(), m.rw.unwrap()))
        .collect();
    mounts.sort();
    let mut want = vec![
        (
            chats_root.join(&chat).display().to_string(),
            s.chat_mount_path.clone(),
            true,
        ),
        (vol.display().to_string(), s.volume_mount_path.clone(), true),
        (
            std::fs::canonicalize(&s.dependencies_host_path)
                .unwrap()
                .display()
                .to_string(),
            s.dependencies_mount_path.clone(),
            false,
        ),
        (
            std::fs::canonicalize(&s.lambda_tools_host_path)
                .unwrap()
                .display()
                .to_string(),
            s.lambda_tools_mount_path.clone(),
            false,
        ),
    ];
    want.sort();
    assert_eq!(mounts, want);
    assert!(chats_root.join(&chat).is_dir(), "chat dir created");

    let env = c.config.as_ref().unwrap().env.clone().unwrap();
    for e in ["AGENT_ID=agent-7", "EXTRA_ONE=1", "EXTRA_TWO=two words"] {
        assert!(env.iter().any(|x| x == e), "env {e} missing in {env:?}");
    }
    let networks = c.network_settings.unwrap().networks.unwrap();
    assert_eq!(networks.keys().collect::<Vec<_>>(), vec![TEST_NETWORK]);
    assert_eq!(
        networks[TEST_NETWORK].ip_address.as_deref(),
        Some(ip.as_str())
    );
    assert_eq!(c.state.unwrap().running, Some(true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_params_reuse_and_different_params_conflict_without_a_new_container() {
    let app = TestApp::spawn().await;
    let chat = new_chat();
    let vol = app.volume("a");
    let (s1, first) = app.create(&chat, "agent", &vol).await;
    assert_eq!(s1, StatusCode::OK, "{first}");
    let (s2, again) = app.create(&chat.replace('-', ""), "agent", &vol).await;
    assert_eq!(s2, StatusCode::OK);
    assert_eq!(first, again, "same session, container and expiry");

    let (s3, body) = app.create(&chat, "other-agent", &vol).await;
    assert_eq!(
        (s3, body),
        (StatusCode::CONFLICT, json!({"detail": "sandbox_conflict"}))
    );
    let (s4, body) = app.create(&chat, "agent", &app.volume("b")).await;
    assert_eq!(
        (s4, body),
        (StatusCode::CONFLICT, json!({"detail": "sandbox_conflict"}))
    );
    assert_eq!(app.containers().await.len(), 1);
    assert_eq!(app.db_scalar("SELECT generation FROM sandboxes").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_removes_the_container_then_reports_not_found() {
    let app = TestApp::spawn().await;
    let chat = new_chat();
    let (_, created) = app.create(&chat, "agent", &app.volume("d")).await;
    let (status, body) = app.delete(&chat).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({"chat_id": chat, "result": "deleted", "session_id": created["session_id"], "container_id": created["container_id"]})
    );
    assert!(
        app.containers().await.is_empty(),
        "container gone when delete answers"
    );
    assert_eq!(app.db_scalar("SELECT count(*) FROM sandboxes").await, 0);
    let (status, body) = app.delete(&chat).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({"chat_id": chat, "result": "not_found", "session_id": null, "container_id": null})
    );
    // History is kept in the event log.
    assert!(
        app.db_scalar("SELECT count(*) FROM sandbox_events WHERE action = 'purge'")
            .await
            >= 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_4xx_with_detail_and_write_nothing() {
    let app = TestApp::spawn().await;
    let vol = app.volume("ok").display().to_string();
    let file = app.dir.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let chat = new_chat();
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"chat_id": "not-a-uuid", "agent_id": "a", "volume_host_path": vol}),
            "chat_id",
        ),
        (
            json!({"chat_id": chat, "agent_id": "   ", "volume_host_path": vol}),
            "agent_id",
        ),
        (
            json!({"chat_id": chat, "agent_id": "a", "volume_host_path": "relative/dir"}),
            "volume_host_path",
        ),
        (
            json!({"chat_id": chat, "agent_id": "a", "volume_host_path": "/no/such/dir"}),
            "volume_host_path",
        ),
        (
            json!({"chat_id": chat, "agent_id": "a", "volume_host_path": file}),
            "volume_host_path",
        ),
        (
            json!({"chat_id": chat, "agent_id": "a"}),
            "volume_host_path",
        ),
        (
            json!({"chat_id": chat, "agent_id": 5, "volume_host_path": vol}),
            "agent_id",
        ),
        (
            json!({"chat_id": chat, "agent_id": "a", "volume_host_path": vol, "extra": 1}),
            "extra",
        ),
    ];
    for (body, needle) in cases {
        let (status, answer) = app.post_json("/api/v1/create", &body).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{body} -> {answer}"
        );
        let detail = detail_text(&answer);
        assert!(
            detail.contains(needle),
            "{body}: detail `{detail}` should name `{needle}`"
        );
    }
    let r = app
        .client
        .post(app.url("/api/v1/create"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_client_error());
    let v: Value = r.json().await.unwrap();
    assert!(detail_text(&v).contains("JSON"), "{v}");
    let (status, _) = app.delete("nope").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);

    assert_eq!(app.db_scalar("SELECT count(*) FROM sandboxes").await, 0);
    assert_eq!(
        app.db_scalar("SELECT count(*) FROM sandbox_events").await,
        0
    );
    assert!(app.containers().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_image_fails_fast_with_503_and_keeps_retrying() {
    let app = TestApp::spawn_with(|s| s.sandbox.image = "sandboxd/does-not-exist:1".into()).await;
    let chat = new_chat();
    let started = std::time::Instant::now();
    let (status, body) = app.create(&chat, "agent", &app.volume("m")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.starts_with("sandbox_start_failed: "), "{detail}");
    assert!(
        detail.contains("sandboxd/does-not-exist:1") && detail.contains("never"),
        "{detail}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    // Retries continue in the background: attempts keep growing, the error is recorded.
    wait_until(Duration::from_secs(20), "a second attempt", || async {
        let (_, v) = app.get(&format!("/api/v1/sandboxes/{chat}")).await;
        (v["attempts"].as_u64() >= Some(2) && v["phase"] == "failed").then_some(())
    })
    .await;
    assert!(
        app.containers().await.is_empty(),
        "failed starts leave nothing behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declarative_apply_get_list_renew() {
    let app = TestApp::spawn().await;
    let chat = new_chat();
    let vol = app.volume("p");
    let put = |body: Value, wait: u64| {
        let app = &app;
        let chat = chat.clone();
        async move {
            let r = app
                .client
                .put(app.url(&format!("/api/v1/sandboxes/{chat}?wait={wait}")))
                .json(&body)
                .send()
                .await
                .unwrap();
            (r.status(), r.json::<Value>().await.unwrap())
        }
    };
    let (status, body) = put(json!({"agent_id": "a", "volume_host_path": vol}), 0).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["outcome"], "created");
    assert_eq!(body["sandbox"]["phase"], "pending", "returns at once");

    let (_, settled) = app.get(&format!("/api/v1/sandboxes/{chat}?wait=30")).await;
    assert_eq!(settled["phase"], "running", "{settled}");
    let first_container = settled["container_id"].clone();

    let (_, same) = put(json!({"agent_id": "a", "volume_host_path": vol}), 0).await;
    assert_eq!(same["outcome"], "unchanged");

    // A changed spec replaces the session, as apply would.
    let (_, replaced) = put(json!({"agent_id": "b", "volume_host_path": vol}), 30).await;
    assert_eq!(replaced["outcome"], "replaced");
    assert_eq!(replaced["sandbox"]["phase"], "running", "{replaced}");
    assert_ne!(replaced["sandbox"]["container_id"], first_container);
    assert_eq!(replaced["sandbox"]["generation"], 2);
    wait_until(Duration::from_secs(20), "old container removed", || async {
        (app.containers().await.len() == 1).then_some(())
    })
    .await;

    let before = replaced["sandbox"]["expires_at"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, renewed) = app
        .post_json(
            &format!("/api/v1/sandboxes/{chat}/renew"),
            &json!({"ttl_seconds": 3600}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{renewed}");
    assert!(renewed["expires_at"].as_str().unwrap() > before.as_str());
    assert_eq!(
        renewed["container_id"], replaced["sandbox"]["container_id"],
        "renew keeps the container"
    );

    let (_, list) = app.get("/api/v1/sandboxes?phase=running&agent_id=b").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    let (_, list) = app.get("/api/v1/sandboxes?phase=failed").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 0);
    let (status, _) = app.get("/api/v1/sandboxes?phase=bogus").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, v) = app.get(&format!("/api/v1/sandboxes/{}", new_chat())).await;
    assert_eq!(
        (status, v),
        (
            StatusCode::NOT_FOUND,
            json!({"detail": "sandbox_not_found"})
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_paginates_with_a_cursor() {
    let app = TestApp::spawn_with(|s| s.sandbox.image = "sandboxd/does-not-exist:1".into()).await;
    let vol = app.volume("l");
    for _ in 0..5 {
        let r = app
            .client
            .put(app.url(&format!("/api/v1/sandboxes/{}", new_chat())))
            .json(&json!({"agent_id": "a", "volume_host_path": vol}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10 {
        let q = cursor
            .as_ref()
            .map(|c| format!("&cursor={c}"))
            .unwrap_or_default();
        let (_, page) = app.get(&format!("/api/v1/sandboxes?limit=2{q}")).await;
        for item in page["items"].as_array().unwrap() {
            seen.push(item["chat_id"].as_str().unwrap().to_string());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(seen.len(), 5);
    assert_eq!(seen, sorted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_is_required_everywhere_but_health() {
    let app = TestApp::spawn_with(|s| s.security.api_token = Some("s3cret-token".into())).await;
    let (status, _) = app.get("/api/v1/health").await;
    assert_eq!(status, StatusCode::OK);
    for token in [None, Some("wrong"), Some(""), Some("s3cret-token-longer")] {
        let mut req = app.client.get(app.url("/api/v1/sandboxes"));
        if let Some(t) = token {
            req = req.header("X-API-Token", t);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "token {token:?}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v, json!({"detail": "unauthorized"}));
    }
    let r = app
        .client
        .get(app.url("/api/v1/sandboxes"))
        .header("X-API-Token", "s3cret-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_reports_ok_once_the_loop_has_run() {
    let app = TestApp::spawn().await;
    wait_until(Duration::from_secs(20), "ready", || async {
        let (s, _) = app.get("/api/v1/ready").await;
        (s == StatusCode::OK).then_some(())
    })
    .await;
}
