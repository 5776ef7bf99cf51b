//! Drop-in replacement: what an unchanged client of the old Python service sends, answered by
//! the built binary against the real engine, with the old service's status and body.

use std::io::{Read, Write};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::support::*;

/// Checks an answer's body; says what is wrong.
type Check = Box<dyn Fn(&Value) -> Result<(), String>>;

/// One request of an old client and what the old service answered.
struct Case {
    name: &'static str,
    method: &'static str,
    path: String,
    /// `None`: no `Content-Type` header at all.
    content_type: Option<&'static str>,
    body: Option<String>,
    status: StatusCode,
    /// Checks the body; says what is wrong.
    check: Check,
}

fn problem(kind: &'static str, loc: Value) -> Check {
    Box::new(move |v: &Value| {
        let first = &v["detail"][0];
        let ok = first["type"] == kind
            && first["loc"] == loc
            && first["msg"].is_string()
            && first.get("input").is_some();
        ok.then_some(())
            .ok_or_else(|| format!("want detail[0] {{type: {kind}, loc: {loc}}} got {v}"))
    })
}

fn exactly(want: Value) -> Check {
    Box::new(move |v: &Value| {
        (*v == want)
            .then_some(())
            .ok_or_else(|| format!("want {want} got {v}"))
    })
}

fn session_shape(chat: String) -> Check {
    Box::new(move |v: &Value| {
        let keys: Vec<&str> = v
            .as_object()
            .map(|o| o.keys().map(String::as_str).collect())
            .unwrap_or_default();
        let shape = keys.len() == SESSION_KEYS.len()
            && SESSION_KEYS.iter().all(|k| keys.contains(k))
            && v["status"] == "running"
            && v["chat_id"] == chat.as_str()
            && v["endpoint"]["ip"].is_string()
            && v["endpoint"]["port"] == 8000;
        shape
            .then_some(())
            .ok_or_else(|| format!("not the old session body: {v}"))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_client_gets_the_old_answers_from_the_binary() {
    let fx = ProcessFixture::new(|_| {});
    let server = fx.start().await;
    let vol = fx.vol.canonicalize().unwrap().display().to_string();
    let chat = new_chat();
    let create = |agent: &str| {
        json!({"chat_id": chat, "agent_id": agent, "volume_host_path": vol}).to_string()
    };
    let post = |name, body: String, content_type, status, check| Case {
        name,
        method: "POST",
        path: "/api/v1/create".into(),
        content_type,
        body: Some(body),
        status,
        check,
    };
    let json_ct = Some("application/json");
    let cases = vec![
        post(
            "create",
            create("agent-1"),
            json_ct,
            StatusCode::OK,
            session_shape(chat.clone()),
        ),
        post(
            "reuse, no Content-Type (requests' data=)",
            create("agent-1"),
            None,
            StatusCode::OK,
            session_shape(chat.clone()),
        ),
        post(
            "another agent while live",
            create("agent-2"),
            json_ct,
            StatusCode::CONFLICT,
            exactly(json!({"detail": "sandbox_conflict"})),
        ),
        post(
            "missing field",
            json!({"chat_id": chat, "volume_host_path": vol}).to_string(),
            json_ct,
            StatusCode::UNPROCESSABLE_ENTITY,
            problem("missing", json!(["body", "agent_id"])),
        ),
        post(
            "wrong type",
            json!({"chat_id": chat, "agent_id": 5, "volume_host_path": vol}).to_string(),
            json_ct,
            StatusCode::UNPROCESSABLE_ENTITY,
            problem("string_type", json!(["body", "agent_id"])),
        ),
        post(
            "bad UUID",
            json!({"chat_id": "x/../y", "agent_id": "a", "volume_host_path": vol}).to_string(),
            json_ct,
            StatusCode::UNPROCESSABLE_ENTITY,
            problem("uuid_parsing", json!(["body", "chat_id"])),
        ),
        post(
            "blank agent_id",
            json!({"chat_id": chat, "agent_id": "  ", "volume_host_path": vol}).to_string(),
            json_ct,
            StatusCode::UNPROCESSABLE_ENTITY,
            problem("value_error", json!(["body", "agent_id"])),
        ),
        post(
            "relative path",
            json!({"chat_id": chat, "agent_id": "a", "volume_host_path": "relative"}).to_string(),
            json_ct,
            StatusCode::UNPROCESSABLE_ENTITY,
            problem("value_error", json!(["body", "volume_host_path"])),
        ),
        post(
            "extra field",
            json!({"chat_id": chat, "agent_id": "a", "volume_host_path": vol, "x": 1}).to_string(),
            json_ct,
            StatusCode::UNPROCESSABLE_ENTITY,
            problem("extra_forbidden", json!(["body", "x"])),
        ),
        post(
            "malformed JSON",
            "{\"chat_id\": ".into(),
            json_ct,
            StatusCode::UNPROCESSABLE_ENTITY,
            problem("json_invalid", json!(["body", 12])),
        ),
        post(
            "malformed JSON, no Content-Type",
            "{oops".into(),
            None,
            StatusCode::UNPROCESSABLE_ENTITY,
            problem("json_invalid", json!(["body", 1])),
        ),
        post(
            "a JSON array",
            "[1, 2]".into(),
            json_ct,
            StatusCode::UNPROCESSABLE_ENTITY,
            problem("model_attributes_type", json!(["body"])),
        ),
        post(
            "another content type",
            create("agent-1"),
            Some("text/plain"),
            StatusCode::UNPROCESSABLE_ENTITY,
            problem("content_type", json!(["body"])),
        ),
        Case {
            name: "unknown route",
            method: "GET",
            path: "/api/v1/nope".into(),
            content_type: None,
            body: None,
            status: StatusCode::NOT_FOUND,
            check: exactly(json!({"detail": "Not Found"})),
        },
        Case {
            name: "wrong method",
            method: "GET",
            path: "/api/v1/create".into(),
            content_type: None,
            body: None,
            status: StatusCode::METHOD_NOT_ALLOWED,
            check: exactly(json!({"detail": "Method Not Allowed"})),
        },
        Case {
            name: "delete, bad UUID",
            method: "DELETE",
            path: "/api/v1/sandboxes/not-a-uuid".into(),
            content_type: None,
            body: None,
            status: StatusCode::UNPROCESSABLE_ENTITY,
            check: problem("uuid_parsing", json!(["path", "chat_id"])),
        },
        Case {
            name: "delete",
            method: "DELETE",
            path: format!("/api/v1/sandboxes/{chat}"),
            content_type: None,
            body: None,
            status: StatusCode::OK,
            check: Box::new(|v: &Value| {
                (v["result"] == "deleted"
                    && v["container_id"].is_string()
                    && v["session_id"].is_string())
                .then_some(())
                .ok_or_else(|| format!("{v}"))
            }),
        },
        Case {
            name: "delete again",
            method: "DELETE",
            path: format!("/api/v1/sandboxes/{chat}"),
            content_type: None,
            body: None,
            status: StatusCode::OK,
            check: exactly(
                json!({"chat_id": chat, "result": "not_found", "session_id": null, "container_id": null}),
            ),
        },
    ];

    let client = reqwest::Client::new();
    let mut failures = Vec::new();
    for case in &cases {
        let url = format!("http://{}{}", server.addr, case.path);
        let mut req = client.request(case.method.parse().unwrap(), url);
        if let Some(ct) = case.content_type {
            req = req.header("content-type", ct);
        }
        if let Some(body) = &case.body {
            req = req.body(body.clone());
        }
        let r = req.send().await.expect("request");
        let status = r.status();
        let allow = r
            .headers()
            .get("allow")
            .map(|v| v.to_str().unwrap_or("").to_string());
        let text = r.text().await.unwrap_or_default();
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if status != case.status {
            failures.push(format!(
                "{}: status {status}, want {} ({body})",
                case.name, case.status
            ));
        } else if let Err(e) = (case.check)(&body) {
            failures.push(format!("{}: {e}", case.name));
        }
        if case.status == StatusCode::METHOD_NOT_ALLOWED && allow.as_deref() != Some("POST") {
            failures.push(format!("{}: Allow header {allow:?}, want POST", case.name));
        }
    }
    assert!(
        failures.is_empty(),
        "old-client cases failed:\n{}",
        failures.join("\n")
    );
}

/// A blocking client (as Python's `urllib`/`requests`) writes the whole body before reading.
fn write_all_then_read(addr: std::net::SocketAddr, body_len: usize) -> std::io::Result<String> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_write_timeout(Some(Duration::from_secs(30)))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let head = format!(
        "POST /api/v1/create HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {body_len}\r\n\r\n"
    );
    s.write_all(head.as_bytes())?;
    let chunk = vec![b' '; 64 * 1024];
    let mut left = body_len;
    while left > 0 {
        let n = left.min(chunk.len());
        s.write_all(&chunk[..n])?;
        left -= n;
    }
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                answer.extend_from_slice(&buf[..n]);
                if answer.windows(4).any(|w| w == b"\r\n\r\n") && answer.ends_with(b"}") {
                    break;
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_writes_a_3mb_body_first_reads_the_413() {
    let fx = ProcessFixture::new(|_| {});
    let server = fx.start().await;
    let addr = server.addr;
    let answer = tokio::task::spawn_blocking(move || write_all_then_read(addr, 3 * 1024 * 1024))
        .await
        .unwrap()
        .expect("the client must read an answer, not get a broken pipe");
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("body_limit_bytes"), "{answer}");
    // The server is fine afterwards.
    let r = reqwest::get(format!("http://{addr}/api/v1/health"))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

fn create_total(metrics: &str, result: &str) -> u64 {
    let prefix = format!("sandbox_create_total{{result=\"{result}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_start_does_not_block_another_agent_and_results_are_counted() {
    // No such image: every start fails with 503, as the old service's failed start did.
    let fx = ProcessFixture::new(|s| {
        s.sandbox.image = "sandboxd/no-such-image:1".into();
        s.controller.backoff_initial_ms = 60_000;
        s.controller.backoff_max_seconds = 60;
    });
    let server = fx.start().await;
    let client = reqwest::Client::new();
    let url = |p: &str| format!("http://{}{p}", server.addr);
    let chat = new_chat();
    let vol = &fx.vol;
    let mut answers = Vec::new();
    for agent in ["agent-1", "agent-2", "agent-2"] {
        let r = client
            .post(url("/api/v1/create"))
            .json(&json!({"chat_id": chat, "agent_id": agent, "volume_host_path": vol}))
            .send()
            .await
            .unwrap();
        let status = r.status();
        answers.push((status, r.json::<Value>().await.unwrap()));
    }
    for (status, body) in &answers {
        assert_eq!(*status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(
            detail_text(body).starts_with("sandbox_start_failed: "),
            "{body}"
        );
    }
    // The second agent's request replaced the failed session instead of conflicting with it.
    let view = get_json(&client, &url(&format!("/api/v1/sandboxes/{chat}"))).await;
    assert_eq!(view["agent_id"], "agent-2", "{view}");
    let metrics = get_text(&client, &url("/metrics")).await;
    assert_eq!(create_total(&metrics, "error"), 3, "{metrics}");
    assert_eq!(create_total(&metrics, "conflict"), 0, "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_results_are_counted_like_the_old_service() {
    let fx = ProcessFixture::new(|_| {});
    let server = fx.start().await;
    let client = reqwest::Client::new();
    let url = |p: &str| format!("http://{}{p}", server.addr);
    let vol = &fx.vol;
    let create = |chat: &str, agent: &str| {
        client
            .post(url("/api/v1/create"))
            .json(&json!({"chat_id": chat, "agent_id": agent, "volume_host_path": vol}))
            .send()
    };
    let (a, b) = (new_chat(), new_chat());
    assert_eq!(create(&a, "x").await.unwrap().status(), StatusCode::OK);
    assert_eq!(create(&a, "x").await.unwrap().status(), StatusCode::OK);
    assert_eq!(
        create(&a, "y").await.unwrap().status(),
        StatusCode::CONFLICT
    );
    // A session that expires, then a create for its chat: the old service's `replaced`.
    let r = client
        .put(url(&format!("/api/v1/sandboxes/{b}?wait=30")))
        .json(&json!({"agent_id": "x", "volume_host_path": vol, "ttl_seconds": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    wait_until(Duration::from_secs(30), "expiry", || {
        let client = client.clone();
        let url = url(&format!("/api/v1/sandboxes/{b}"));
        async move {
            let v: Value = client.get(url).send().await.ok()?.json().await.ok()?;
            (v["phase"] == "expired").then_some(())
        }
    })
    .await;
    assert_eq!(create(&b, "z").await.unwrap().status(), StatusCode::OK);
    let metrics = get_text(&client, &url("/metrics")).await;
    for (result, n) in [
        ("created", 1),
        ("reused", 1),
        ("conflict", 1),
        ("replaced", 1),
    ] {
        assert_eq!(create_total(&metrics, result), n, "{result}: {metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_deployment_with_a_token_its_clients_never_send_can_switch_first() {
    let fx = ProcessFixture::new(|s| {
        s.http.host = "0.0.0.0".into();
        s.security.api_token = Some("s3cret".into());
        s.security.token_required = false;
    });
    let server = fx.start().await;
    let client = reqwest::Client::new();
    let url = format!("http://{}/api/v1/sandboxes", server.addr);
    let r = client.get(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK, "no token: let through");
    let r = client
        .get(&url)
        .header("X-API-Token", "s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "the real token (written unmasked to the config)"
    );
    let r = client
        .get(&url)
        .header("X-API-Token", "wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::UNAUTHORIZED,
        "a wrong token is still refused"
    );
    let log = std::fs::read_to_string(fx.config.with_extension("log")).unwrap();
    assert!(
        log.contains("token_required is false") && log.contains("NON-LOOPBACK"),
        "a loud warning at start: {log}"
    );

    // The default still enforces it.
    let fx = ProcessFixture::new(|s| s.security.api_token = Some("s3cret".into()));
    let server = fx.start().await;
    let r = client
        .get(format!("http://{}/api/v1/sandboxes", server.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_carry_the_old_labels() {
    let app = TestApp::spawn().await;
    let chat = new_chat();
    let vol = app.volume("v");
    let (status, body) = app.create(&chat, "agent-1", &vol).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let inspect = app.inspect(body["container_id"].as_str().unwrap()).await;
    let labels = inspect.config.unwrap().labels.unwrap();
    assert_eq!(labels["chat_id"], chat);
    assert_eq!(labels["session_id"], body["session_id"].as_str().unwrap());
    assert_eq!(labels["agent_id"], "agent-1");
    assert_eq!(labels["volume_host_path"], vol.display().to_string());
    assert_eq!(labels["endpoint_port"], "8000");
    assert_eq!(labels["expires_at"], body["expires_at"].as_str().unwrap());
    // The old tooling's filter finds it.
    let out = std::process::Command::new(engine().cli())
        .args([
            "ps",
            "-q",
            "--no-trunc",
            "--filter",
            &format!("label=chat_id={chat}"),
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        body["container_id"].as_str().unwrap()
    );
}

/// The exact conflict rule, on a real SQLite store: a live session conflicts with a create of
/// another agent or volume once it has run, or while its first start is under way (its
/// create may still be waiting). A session whose create timed out (504) or whose start
/// failed (503) is replaced instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_session_that_has_run_or_is_starting_conflicts() {
    use sandboxd::store::{CreateOutcome, NewSession, RunningContainer, Store};
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("c.db"), Duration::from_secs(5), 2)
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let chat: sandboxd::domain::ChatId = new_chat().parse().unwrap();
    let ask = |agent: &str| NewSession {
        state: sandboxd::domain::hibernation::SandboxState::Running,
        chat_id: chat,
        agent_id: agent.into(),
        volume_host_path: "/data".into(),
        spec_json: "{}".into(),
        spec_hash: "h".into(),
        ttl: chrono::Duration::seconds(300),
        profile: None,
    };
    let wait = chrono::Duration::seconds(60);
    let t0 = chrono::Utc::now();
    let at = |s: i64| t0 + chrono::Duration::seconds(s);
    let create = |agent: &'static str, t| {
        let (store, new) = (&store, ask(agent));
        async move { store.create_or_reuse(&new, t, wait).await.unwrap() }
    };
    let first = match create("a", at(0)).await {
        CreateOutcome::Created(r) => r,
        other => panic!("{other:?}"),
    };
    // Its first start is under way: the first asker keeps it.
    assert!(matches!(
        create("b", at(1)).await,
        CreateOutcome::Conflict(_)
    ));
    // Its create has given up (504): another agent replaces it.
    let timed_out = match create("b", at(61)).await {
        CreateOutcome::Replaced(r) => r,
        other => panic!("a session past its create's wait should be replaced: {other:?}"),
    };
    assert_ne!(timed_out.session_id, first.session_id);
    // Its start failed (503): replaced too, at once.
    store
        .record_failure(
            chat,
            timed_out.session_id,
            sandboxd::store::EventAction::Start,
            "boom",
            |_| Duration::from_secs(60),
            at(62),
        )
        .await
        .unwrap();
    let ran = match create("c", at(63)).await {
        CreateOutcome::Replaced(r) => r,
        other => panic!("a failed session should be replaced: {other:?}"),
    };
    let running = RunningContainer {
        container_id: "x",
        ip: "10.0.0.2",
        port: 8000,
        host_port: None,
        start: None,
        network: Some("sbx"),
    };
    assert!(store
        .record_running(
            chat,
            ran.session_id,
            &running,
            sandboxd::store::EventAction::Start,
            at(64)
        )
        .await
        .unwrap());
    // Has run: a conflict, nothing written; still one after a later failed restart.
    assert!(matches!(
        create("d", at(65)).await,
        CreateOutcome::Conflict(_)
    ));
    store
        .record_failure(
            chat,
            ran.session_id,
            sandboxd::store::EventAction::Start,
            "crashed",
            |_| Duration::from_secs(60),
            at(66),
        )
        .await
        .unwrap();
    assert!(matches!(
        create("d", at(200)).await,
        CreateOutcome::Conflict(_)
    ));
    assert_eq!(store.get(chat).await.unwrap().unwrap().agent_id, "c");
    // The same agent and volume reuse it.
    assert!(matches!(
        create("c", at(201)).await,
        CreateOutcome::Reused(_)
    ));
}
