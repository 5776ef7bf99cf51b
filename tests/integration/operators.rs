//! What operators see: metrics, the CLI over the database, the event log, retention.

use std::process::Command;
use std::time::Duration;

use reqwest::StatusCode;

use crate::support::*;

async fn metrics_text(app: &TestApp) -> String {
    let r = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    r.text().await.unwrap()
}

fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_cover_a_create_delete_cycle() {
    let app = TestApp::spawn().await;
    let chat = new_chat();
    let (status, _) = app.create(&chat, "a", &app.volume("m")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = app.create(&chat, "a", &app.volume("m")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = app.delete(&chat).await;
    assert_eq!(status, StatusCode::OK);
    let text = wait_until(
        Duration::from_secs(10),
        "the delete's finalize counted",
        || async {
            // The API marks the row deleting at once (running drops to 0 then);
            // the finalize action is counted only after its removal, so wait for it.
            let t = metrics_text(&app).await;
            let finalized = metric_value(
                &t,
                "sandboxd_actions_total{kind=\"finalize\",outcome=\"ok\"}",
            );
            (metric_value(&t, "sandboxd_desired_sandboxes{phase=\"running\"}") == Some(0.0)
                && finalized.is_some_and(|v| v >= 1.0))
            .then_some(t)
        },
    )
    .await;
    for (series, at_least) in [
        ("sandbox_create_total{result=\"created\"}", 1.0),
        ("sandbox_create_total{result=\"reused\"}", 1.0),
        ("sandbox_delete_total{result=\"deleted\"}", 1.0),
        ("sandboxd_actions_total{kind=\"start\",outcome=\"ok\"}", 1.0),
        (
            "sandboxd_actions_total{kind=\"finalize\",outcome=\"ok\"}",
            1.0,
        ),
        (
            "sandboxd_time_to_running_seconds_count{start=\"cold\"}",
            1.0,
        ),
        ("sandboxd_reconcile_pass_duration_seconds_count", 1.0),
        (
            "sandbox_runtime_duration_seconds_count{operation=\"create\",result=\"ok\"}",
            1.0,
        ),
        (
            "sandbox_runtime_duration_seconds_count{operation=\"remove\",result=\"ok\"}",
            1.0,
        ),
        ("sandboxd_docker_connected", 1.0),
        ("sandboxd_docker_events_connected", 1.0),
        ("sandboxd_last_pass_timestamp_seconds", 1.0),
    ] {
        let v =
            metric_value(&text, series).unwrap_or_else(|| panic!("{series} missing in\n{text}"));
        assert!(v >= at_least, "{series} = {v}\n{text}");
    }
    for name in [
        "sandbox_active_count",
        "sandbox_cleanup_total",
        "sandbox_cleanup_errors_total",
        "sandboxd_queue_depth",
        "sandboxd_retries_total",
        "sandboxd_observed_containers{state=\"running\"}",
    ] {
        assert!(text.contains(name), "{name} missing");
    }
}

fn cli(config: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sandboxd"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("run sandboxd");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_start_shows_in_ls_show_events_the_table_and_metrics() {
    let app = TestApp::spawn_with(|s| s.sandbox.image = "sandboxd/no-such-image:0".into()).await;
    let config = write_config(app.dir.path(), &app.settings);
    let chat = new_chat();
    let (status, _) = app.create(&chat, "agent-x", &app.volume("f")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);

    // The CLI reads the database while the server runs. The failed start names the missing
    // image (on a loaded Podman the first attempt can fail earlier, on a network inspect the
    // engine answers with 500: the retry then names the image).
    let line = wait_until(
        Duration::from_secs(30),
        "ls naming the missing image",
        || {
            let (config, chat) = (&config, &chat);
            async move {
                let (ok, ls) = cli(config, &["ls"]);
                assert!(ok, "{ls}");
                let line = ls.lines().find(|l| l.contains(chat.as_str()))?.to_string();
                line.contains("not present locally").then_some(line)
            }
        },
    )
    .await;
    assert!(
        line.contains("failed") && line.contains("agent-x"),
        "{line}"
    );
    let (ok, ls) = cli(&config, &["ls", "--phase", "running"]);
    assert!(ok && !ls.contains(&chat), "{ls}");

    let (ok, show) = cli(&config, &["show", &chat.to_uppercase()]);
    assert!(ok, "{show}");
    assert!(show.contains("phase             failed"), "{show}");
    assert!(show.contains("sandboxd/no-such-image:0"), "{show}");
    assert!(show.contains("session_created"), "{show}");

    let (ok, events) = cli(&config, &["events", "--chat", &chat]);
    assert!(ok, "{events}");
    assert!(
        events.lines().any(|l| l.contains("start")
            && l.contains("error")
            && l.contains("not present locally")),
        "{events}"
    );

    let errors = app
        .db_scalar("SELECT count(*) FROM sandbox_events WHERE action = 'start' AND outcome = 'error' AND error LIKE '%no-such-image%'")
        .await;
    assert!(errors >= 1);

    let text = metrics_text(&app).await;
    assert!(
        metric_value(&text, "sandbox_create_total{result=\"error\"}") >= Some(1.0),
        "{text}"
    );
    assert!(
        metric_value(
            &text,
            "sandboxd_actions_total{kind=\"start\",outcome=\"error\"}"
        ) >= Some(1.0),
        "{text}"
    );
    assert!(
        metric_value(&text, "sandbox_runtime_errors_total{operation=\"create\"}") >= Some(1.0),
        "{text}"
    );

    // Still works with the server gone.
    let (_dir, _settings, _guard) = app.stop().await;
    let (ok, ls) = cli(&config, &["ls"]);
    assert!(ok && ls.contains(&chat), "{ls}");
    let (ok, out) = cli(&config, &["show", "not-a-uuid"]);
    assert!(!ok && out.contains("chat_id"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_masks_secrets_and_names_bad_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    std::fs::write(
        &path,
        "security: {api_token: very-secret}\nsandbox: {ttl_seconds: 9}\n",
    )
    .unwrap();
    let (ok, out) = cli(&path, &["check-config"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("ttl_seconds: 9") && out.contains("***") && !out.contains("very-secret"),
        "{out}"
    );
    std::fs::write(&path, "sandbox: {ttl_secondz: 9}\n").unwrap();
    let (ok, out) = cli(&path, &["check-config"]);
    assert!(
        !ok && out.contains("sandbox") && out.contains("ttl_secondz"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_old_events_and_old_expired_rows_only() {
    use sandboxd::store::{NewSession, Store};
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("r.db"), Duration::from_secs(5), 2)
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let now = chrono::Utc::now();
    let old = now - chrono::Duration::days(40);
    let session = |chat: sandboxd::domain::ChatId| NewSession {
        state: sandboxd::domain::hibernation::SandboxState::Running,
        chat_id: chat,
        agent_id: "a".into(),
        volume_host_path: "/data".into(),
        spec_json: "{}".into(),
        spec_hash: "h".into(),
        ttl: chrono::Duration::seconds(1),
        profile: None,
    };
    let old_chat: sandboxd::domain::ChatId = new_chat().parse().unwrap();
    let new_chat_id: sandboxd::domain::ChatId = new_chat().parse().unwrap();
    let live_chat: sandboxd::domain::ChatId = new_chat().parse().unwrap();
    // A session created at `at` that expired two seconds later.
    let expired_at = |chat, at: chrono::DateTime<chrono::Utc>| {
        let (store, new) = (&store, session(chat));
        async move {
            let r = match store
                .create_or_reuse(&new, at, chrono::Duration::zero())
                .await
                .unwrap()
            {
                sandboxd::store::CreateOutcome::Created(r) => r,
                other => panic!("{other:?}"),
            };
            store
                .record_expired(chat, r.session_id, &[], at + chrono::Duration::seconds(2))
                .await
                .unwrap();
        }
    };
    expired_at(old_chat, old).await;
    expired_at(new_chat_id, now).await;
    let mut live = session(live_chat);
    live.ttl = chrono::Duration::days(100);
    store
        .create_or_reuse(&live, old, chrono::Duration::zero())
        .await
        .unwrap();

    let (events, rows) = store
        .prune(
            now - chrono::Duration::days(30),
            now - chrono::Duration::days(7),
        )
        .await
        .unwrap();
    assert_eq!(rows, 1, "only the old expired row");
    assert_eq!(
        events, 3,
        "the old chat's two events and the live chat's old one"
    );
    assert!(store.get(old_chat).await.unwrap().is_none());
    assert!(store.get(new_chat_id).await.unwrap().is_some());
    assert!(
        store.get(live_chat).await.unwrap().is_some(),
        "live rows are never pruned"
    );
    assert_eq!(store.events(Some(new_chat_id), 10).await.unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_served_openapi_document_matches_the_checked_in_copy() {
    let app = TestApp::spawn().await;
    let (status, served) = app.get("/api/v1/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    let checked_in: serde_json::Value =
        serde_json::from_str(include_str!("../../docs/openapi.json")).unwrap();
    assert!(
        served == checked_in,
        "docs/openapi.json is stale: run `cargo run -- openapi > docs/openapi.json`"
    );
    // Every route the router serves is documented.
    let paths = served["paths"].as_object().unwrap();
    for (path, method) in [
        ("/api/v1/create", "post"),
        ("/api/v1/sandboxes/{chat_id}", "delete"),
        ("/api/v1/sandboxes/{chat_id}", "put"),
        ("/api/v1/sandboxes/{chat_id}", "get"),
        ("/api/v1/sandboxes", "get"),
        ("/api/v1/sandboxes/{chat_id}/renew", "post"),
        ("/api/v1/health", "get"),
        ("/api/v1/ready", "get"),
    ] {
        assert!(
            paths[path][method].is_object(),
            "{method} {path} undocumented"
        );
    }
    let create = &served["components"]["schemas"]["SessionResponse"]["required"];
    for field in SESSION_KEYS {
        assert!(
            create.as_array().unwrap().iter().any(|f| f == field),
            "{field}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_over_otlp_when_enabled() {
    use std::sync::{Arc, Mutex};
    // A stand-in collector on loopback that keeps what it is sent.
    type Received = Arc<Mutex<Vec<(String, Vec<u8>)>>>;
    let received: Received = Arc::default();
    let sink = received.clone();
    let collector = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let sink = sink.clone();
                async move {
                    let ct = headers
                        .get("content-type")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string();
                    sink.lock().unwrap().push((ct, body.to_vec()));
                    ""
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector_addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, collector).await });

    let fx = ProcessFixture::new(|s| {
        s.otel.enabled = true;
        s.otel.service_name = Some("sandboxd-otlp-test".into());
        s.otel.traces_endpoint = Some(format!("http://{collector_addr}/v1/traces"));
    });
    let mut server = fx.start().await;
    let r = reqwest::Client::new()
        .get(format!("http://{}/api/v1/sandboxes", server.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // SIGTERM: the exporter flushes on the way out.
    let pid = server.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    wait_until(Duration::from_secs(30), "sandboxd to exit", || {
        let done = server.child.try_wait().ok().flatten();
        async move { done }
    })
    .await;
    let got = received.lock().unwrap().clone();
    assert!(!got.is_empty(), "no OTLP export arrived");
    let (content_type, body) = &got[0];
    assert_eq!(content_type, "application/x-protobuf");
    let all: Vec<u8> = got.iter().flat_map(|(_, b)| b.clone()).collect();
    let text = String::from_utf8_lossy(&all);
    assert!(text.contains("sandboxd-otlp-test"), "service name missing");
    assert!(
        text.contains("/api/v1/sandboxes") || text.contains("http"),
        "no HTTP span in {} bytes",
        body.len()
    );
}
