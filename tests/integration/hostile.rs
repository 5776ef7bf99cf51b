//! Hostile input and sandbox hardening: every bad request is a 4xx naming the problem with
//! nothing written; containers come out locked down as configured.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::support::*;

async fn nothing_written(app: &TestApp) {
    assert_eq!(app.db_scalar("SELECT count(*) FROM sandboxes").await, 0);
    assert_eq!(
        app.db_scalar("SELECT count(*) FROM sandbox_events").await,
        0
    );
    assert!(app.containers().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_create_requests_are_refused_with_a_named_reason_and_nothing_written() {
    let app = TestApp::spawn_with(|s| {
        s.http.body_limit_bytes = 4096;
    })
    .await;
    let roots = app.dir.path().join("volumes");
    // Re-spawn with allowed roots now that the temp dir is known.
    let (dir, mut settings, guard) = app.stop().await;
    settings.sandbox.allowed_volume_roots = Some(vec![roots.clone()]);
    let app = TestApp::start(dir, settings).await;
    let _guard = guard;

    let ok_vol = app.volume("ok").display().to_string();
    let outside = app.dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let link_out = roots.join("link-out");
    std::os::unix::fs::symlink(&outside, &link_out).unwrap();
    let link_etc = roots.join("link-etc");
    std::os::unix::fs::symlink("/etc", &link_etc).unwrap();
    let db_dir = app
        .settings
        .database
        .path
        .parent()
        .unwrap()
        .display()
        .to_string();
    let chats_root = std::fs::canonicalize(&app.settings.sandbox.chats_root).unwrap();
    let chat = new_chat();
    let req = |vol: &str| json!({"chat_id": chat, "agent_id": "a", "volume_host_path": vol});

    let volume_cases: Vec<(String, &str)> = vec![
        ("relative/dir".into(), "absolute"),
        (
            format!("{ok_vol}/../../../../../../etc"),
            "protected system location",
        ),
        (format!("{ok_vol}/../../outside"), "allowed_volume_roots"),
        ("/tmp/a\u{0}b".into(), "NUL"),
        ("%2e%2e/etc".into(), "absolute"),
        (format!("{ok_vol}/%2e%2e"), "does not exist"),
        (link_out.display().to_string(), "allowed_volume_roots"),
        (link_etc.display().to_string(), "protected system location"),
        ("/proc/self/root".into(), "protected"),
        ("/var/run/docker.sock".into(), "not a directory"),
        ("/".into(), "protected"),
        ("/etc".into(), "protected system location"),
        ("/sys".into(), "protected system location"),
        ("/dev".into(), "protected system location"),
        ("/boot".into(), "protected"),
        ("/usr/lib".into(), "protected system location"),
        (db_dir.clone(), "sandboxd's own state"),
        (chats_root.display().to_string(), "sandbox directory"),
        (chats_root.join("x").display().to_string(), "does not exist"),
    ];
    for (vol, needle) in &volume_cases {
        let (status, body) = app.post_json("/api/v1/create", &req(vol)).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{vol:?} -> {body}"
        );
        let detail = detail_text(&body);
        assert!(
            detail.contains("volume_host_path") && detail.contains(needle),
            "{vol:?}: `{detail}` should name volume_host_path and `{needle}`"
        );
    }

    let body_cases: Vec<(Value, &str)> = vec![
        (
            json!({"chat_id": "", "agent_id": "a", "volume_host_path": ok_vol}),
            "chat_id",
        ),
        (
            json!({"chat_id": "../etc", "agent_id": "a", "volume_host_path": ok_vol}),
            "chat_id",
        ),
        (
            json!({"chat_id": "1234", "agent_id": "a", "volume_host_path": ok_vol}),
            "chat_id",
        ),
        (
            json!({"chat_id": 7, "agent_id": "a", "volume_host_path": ok_vol}),
            "chat_id",
        ),
        (
            json!({"chat_id": chat, "agent_id": "", "volume_host_path": ok_vol}),
            "agent_id",
        ),
        (
            json!({"chat_id": chat, "agent_id": "\t \n", "volume_host_path": ok_vol}),
            "agent_id",
        ),
        (
            json!({"chat_id": chat, "agent_id": "a\u{0}", "volume_host_path": ok_vol}),
            "agent_id",
        ),
        (
            json!({"chat_id": chat, "agent_id": null, "volume_host_path": ok_vol}),
            "agent_id",
        ),
        (
            json!({"chat_id": chat, "agent_id": ["a"], "volume_host_path": ok_vol}),
            "agent_id",
        ),
        (
            json!({"chat_id": chat, "volume_host_path": ok_vol}),
            "agent_id",
        ),
        (
            json!({"chat_id": chat, "agent_id": "a", "volume_host_path": ok_vol, "image": "x"}),
            "image",
        ),
        (json!([1, 2]), "dictionary"),
        (json!("string"), "dictionary"),
    ];
    for (body, needle) in &body_cases {
        let (status, answer) = app.post_json("/api/v1/create", body).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{body} -> {answer}"
        );
        let detail = detail_text(&answer);
        assert!(
            detail.contains(needle),
            "{body}: `{detail}` should name `{needle}`"
        );
    }

    let raw = |body: Vec<u8>, content_type: &'static str| {
        let app = &app;
        async move {
            let r = app
                .client
                .post(app.url("/api/v1/create"))
                .header("content-type", content_type)
                .body(body)
                .send()
                .await
                .unwrap();
            let status = r.status();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let (status, v) = raw(b"{\"chat_id\": ".to_vec(), "application/json").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(detail_text(&v).contains("JSON decode error"), "{v}");
    let (status, v) = raw(b"\xff\xfe".to_vec(), "application/json").await;
    assert!(
        status == StatusCode::UNPROCESSABLE_ENTITY && v["detail"].is_array(),
        "{status} {v}"
    );
    let (status, v) = raw(b"{}".to_vec(), "text/plain").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(detail_text(&v).contains("Content-Type"), "{v}");
    let big = serde_json::to_vec(
        &json!({"chat_id": chat, "agent_id": "a".repeat(10_000), "volume_host_path": ok_vol}),
    )
    .unwrap();
    let (status, v) = raw(big, "application/json").await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(v["detail"].is_string(), "{v}");

    for path in ["%2e%2e", "..%2f..%2fetc", "not-a-uuid", "%00"] {
        let (status, v) = app.delete(path).await;
        assert!(status.is_client_error(), "DELETE {path}: {status}");
        assert!(!detail_text(&v).is_empty(), "DELETE {path}: {v}");
        let (status, _) = app.get(&format!("/api/v1/sandboxes/{path}")).await;
        assert!(status.is_client_error(), "GET {path}: {status}");
    }
    for (q, field) in [
        ("limit=0", "query.limit"),
        ("limit=abc", "query.limit"),
        ("cursor=zzz", "query.cursor"),
        ("phase=nope", "query.phase"),
    ] {
        let (status, v) = app.get(&format!("/api/v1/sandboxes?{q}")).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{q}: {v}");
        assert!(detail_text(&v).contains(field), "{q}: {v}");
    }
    // Unknown query parameters are ignored, as the old server (FastAPI) did.
    let (status, v) = app.get("/api/v1/sandboxes?unknown=1").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let r = app
        .client
        .put(app.url(&format!("/api/v1/sandboxes/{chat}")))
        .json(&json!({"agent_id": "a", "volume_host_path": ok_vol, "ttl_seconds": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    // A TTL beyond any range was an overflow panic; now a 422 naming the field.
    for ttl in [
        json!(u64::MAX),
        json!(2_592_001),
        json!(-1),
        json!(1.5),
        json!("60"),
    ] {
        let r = app
            .client
            .put(app.url(&format!("/api/v1/sandboxes/{chat}")))
            .json(&json!({"agent_id": "a", "volume_host_path": ok_vol, "ttl_seconds": ttl}))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "PUT ttl {ttl}"
        );
        let v: Value = r.json().await.unwrap();
        assert!(detail_text(&v).contains("body.ttl_seconds"), "{v}");
        let r = app
            .client
            .post(app.url(&format!("/api/v1/sandboxes/{chat}/renew")))
            .json(&json!({ "ttl_seconds": ttl }))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "renew ttl {ttl}"
        );
    }
    // The renew body its schema allows: empty or `null` (404 here: no live session).
    for body in ["", "null"] {
        let r = app
            .client
            .post(app.url(&format!("/api/v1/sandboxes/{chat}/renew")))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "renew body {body:?}");
    }
    let (status, v) = app.get(&format!("/api/v1/sandboxes/{chat}?wait=abc")).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(detail_text(&v).contains("query.wait"), "{v}");

    nothing_written(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_swapped_for_a_symlink_after_acceptance_is_refused_at_create_time() {
    // First run: no engine reachable, so the request is accepted and stays pending.
    let dir = tempfile::tempdir().unwrap();
    let instance = unique_instance();
    let mut settings = test_settings(dir.path(), &instance);
    let real_socket = settings.docker.base_url.clone();
    settings.docker.base_url = format!("unix://{}/no-engine.sock", dir.path().display());
    settings.controller.create_wait_seconds = 2;
    let app = TestApp::start(dir, settings).await;
    let vol = app.volume("swap");
    let chat = new_chat();
    let r = app
        .client
        .put(app.url(&format!("/api/v1/sandboxes/{chat}")))
        .json(&json!({"agent_id": "a", "volume_host_path": vol}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    // The directory becomes a symlink to /etc while nothing was started.
    std::fs::remove_dir(&vol).unwrap();
    std::os::unix::fs::symlink("/etc", &vol).unwrap();

    let (dir, mut settings, guard) = app.stop().await;
    settings.docker.base_url = real_socket;
    let app = TestApp::start(dir, settings).await;
    let _guard = guard;
    let row = wait_until(
        Duration::from_secs(20),
        "a refused start attempt",
        || async {
            let (_, v) = app.get(&format!("/api/v1/sandboxes/{chat}")).await;
            let err = v["last_error"].as_str()?.to_string();
            err.contains("protected system location").then_some(v)
        },
    )
    .await;
    assert_eq!(row["phase"], "failed", "{row}");
    assert!(app.containers().await.is_empty(), "nothing mounted /etc");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandboxes_are_hardened_by_default() {
    let app = TestApp::spawn().await;
    let chat = new_chat();
    let (status, body) = app.create(&chat, "agent", &app.volume("h")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // What the kernel enforces on the agent, whatever the engine reports.
    assert_eq!(
        kernel_view(&app, &chat).await,
        (
            "0000000000000000".into(),
            "0000000000000000".into(),
            "1".into()
        )
    );
    let c = app.inspect(body["container_id"].as_str().unwrap()).await;
    let hc = c.host_config.unwrap();
    match engine() {
        Engine::Docker => assert_eq!(hc.cap_drop, Some(vec!["ALL".to_string()])),
        // Podman shows the default set it dropped, expanded (docs/podman.md).
        Engine::Podman => assert!(hc.cap_drop.unwrap_or_default().len() >= 14),
    }
    assert!(hc.cap_add.unwrap_or_default().is_empty());
    assert_eq!(hc.privileged, Some(false));
    let sec = hc.security_opt.unwrap_or_default();
    let nnp = match engine() {
        Engine::Docker => "no-new-privileges:true",
        Engine::Podman => "no-new-privileges",
    };
    assert!(sec.iter().any(|o| o == nnp), "{sec:?}");
    assert!(
        !sec.iter().any(|o| o.contains("seccomp")),
        "default seccomp kept: {sec:?}"
    );
    assert_eq!(hc.pids_limit, Some(512));
    assert_eq!(hc.memory, Some(1024 * 1024 * 1024));
    assert_eq!(hc.nano_cpus, Some(1_000_000_000));
    assert_eq!(hc.readonly_rootfs, Some(false));
    let sources: Vec<String> = c
        .mounts
        .unwrap()
        .into_iter()
        .filter_map(|m| m.source)
        .collect();
    assert!(!sources
        .iter()
        .any(|s| s.contains("docker.sock") || s.starts_with("/var/run") || s.starts_with("/run")));
    let db_dir = app
        .settings
        .database
        .path
        .parent()
        .unwrap()
        .display()
        .to_string();
    assert!(!sources.contains(&db_dir), "{sources:?}");
    let ip = body["endpoint"]["ip"].as_str().unwrap();
    assert!(
        agent_answers(ip, 8000).await,
        "agent works with every capability dropped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hardening_can_be_tightened_and_loosened_in_config() {
    let app = TestApp::spawn_with(|s| {
        let h = &mut s.sandbox.hardening;
        h.read_only_rootfs = true;
        h.tmpfs_tmp_mb = 16;
        h.user = Some("65534:65534".into());
        h.cap_add = vec!["NET_BIND_SERVICE".into()];
        h.pids_limit = 64;
        h.memory_mb = 128;
        h.cpu_millis = 500;
    })
    .await;
    let chat = new_chat();
    let (status, body) = app.create(&chat, "agent", &app.volume("h2")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // NET_BIND_SERVICE (bit 10) is the one capability left in the bounding set.
    let (_, bounding, no_new_privs) = kernel_view(&app, &chat).await;
    assert_eq!(
        (bounding.as_str(), no_new_privs.as_str()),
        ("0000000000000400", "1")
    );
    let c = app.inspect(body["container_id"].as_str().unwrap()).await;
    let hc = c.host_config.unwrap();
    assert_eq!(hc.readonly_rootfs, Some(true));
    let tmpfs = hc.tmpfs.unwrap();
    assert!(tmpfs["/tmp"].contains("size=16m"));
    if engine() == Engine::Podman {
        // Podman would add these writable; sandboxd mounts them read-only.
        for dir in ["/run", "/var/tmp"] {
            assert!(tmpfs[dir].starts_with("ro,"), "{dir}: {tmpfs:?}");
        }
    }
    assert_eq!(c.config.unwrap().user.as_deref(), Some("65534:65534"));
    if engine() == Engine::Docker {
        assert_eq!(hc.cap_add, Some(vec!["NET_BIND_SERVICE".to_string()]));
    }
    assert_eq!(hc.pids_limit, Some(64));
    assert_eq!(hc.memory, Some(128 * 1024 * 1024));
    assert_eq!(hc.nano_cpus, Some(500_000_000));
    let ip = body["endpoint"]["ip"].as_str().unwrap();
    assert!(
        agent_answers(ip, 8000).await,
        "agent works as nobody on a read-only root"
    );
}

/// The agent's effective and bounding capabilities and its no-new-privileges flag, as the
/// kernel shows them (`/proc/1/status`), read through the data plane.
async fn kernel_view(app: &TestApp, chat: &str) -> (String, String, String) {
    let (status, out) = app
        .post_json(
            &format!("/api/v1/sandboxes/{chat}/exec"),
            &json!({"command": ["cat", "/proc/1/status"]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{out}");
    let text = out["stdout"].as_str().unwrap_or_default().to_string();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    (field("CapEff:"), field("CapBnd:"), field("NoNewPrivs:"))
}
