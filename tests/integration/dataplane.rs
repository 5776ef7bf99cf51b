//! The data plane against the real engine: exec (timeouts that kill whole process trees,
//! output caps, streaming, concurrency limits), files (write, streamed read, listing, path
//! rules, symlinks, limits), the audit log, and the answers for sandboxes that do not run or
//! an engine that does not answer.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::proxy::DockerProxy;
use crate::support::*;

/// Creates a running sandbox through the old contract; its chat id.
pub async fn running_chat(app: &TestApp) -> String {
    let chat = new_chat();
    let (status, body) = app.create(&chat, "agent-dp", &app.volume(&chat)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    chat
}

pub async fn exec(app: &TestApp, chat: &str, body: Value) -> (StatusCode, Value) {
    app.post_json(&format!("/api/v1/sandboxes/{chat}/exec"), &body)
        .await
}

/// How many processes in the sandbox have a command line (its words joined) starting with
/// `prefix`.
pub async fn count_processes(app: &TestApp, chat: &str, prefix: &str) -> u64 {
    let script = format!(
        "n=0; for d in /proc/[0-9]*; do case \"$(cat $d/cmdline 2>/dev/null)\" in {prefix}*) n=$((n+1));; esac; done; echo $n"
    );
    let (status, out) = exec(app, chat, json!({ "command": script })).await;
    assert_eq!(status, StatusCode::OK, "{out}");
    out["stdout"]
        .as_str()
        .unwrap_or("")
        .trim()
        .parse()
        .expect("a count")
}

async fn put_file(app: &TestApp, chat: &str, query: &str, data: Vec<u8>) -> (StatusCode, Value) {
    let r = app
        .client
        .put(app.url(&format!("/api/v1/sandboxes/{chat}/files?{query}")))
        .body(data)
        .send()
        .await
        .expect("request");
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn get_file(app: &TestApp, chat: &str, query: &str) -> (StatusCode, Vec<u8>) {
    let r = app
        .client
        .get(app.url(&format!("/api/v1/sandboxes/{chat}/files?{query}")))
        .send()
        .await
        .expect("request");
    let status = r.status();
    (status, r.bytes().await.expect("body").to_vec())
}

/// The status of a WebSocket upgrade request for a terminal (an error comes before the
/// upgrade, as plain HTTP).
async fn pty_status(app: &TestApp, chat: &str) -> StatusCode {
    app.client
        .get(app.url(&format!("/api/v1/sandboxes/{chat}/pty")))
        .header("Connection", "upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .expect("request")
        .status()
}

fn json_of(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_runs_commands_and_reports_exit_output_and_audit() {
    let app = TestApp::spawn_with(|s| s.data_plane.exec_output_limit_bytes = 1000).await;
    let chat = running_chat(&app).await;

    // A string runs under `sh -c`; env, workdir and stdin are applied.
    let (status, out) = exec(
        &app,
        &chat,
        json!({
            "command": "echo \"$GREETING\"; pwd; cat; echo oops >&2; exit 3",
            "env": {"GREETING": "hello there"},
            "workdir": "/workspace/volume",
            "stdin": "from stdin\n",
            "timeout_seconds": 30
        }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{out}");
    assert_eq!(out["exit_code"], 3);
    assert_eq!(
        out["stdout"],
        "hello there\n/workspace/volume\nfrom stdin\n"
    );
    assert_eq!(out["stderr"], "oops\n");
    assert_eq!(out["timed_out"], false);
    assert_eq!(out["truncated"], false);
    assert!(out["duration_ms"].as_u64().is_some());

    // An argv list is run as is (no shell: `$HOME` stays literal). The default working
    // directory is the chat mount.
    let (_, out) = exec(&app, &chat, json!({"command": ["echo", "$HOME"]})).await;
    assert_eq!(out["stdout"], "$HOME\n");
    let (_, out) = exec(&app, &chat, json!({"command": "pwd"})).await;
    assert_eq!(out["stdout"], "/workspace/chat\n");

    // Output past the cap is dropped and flagged; the command still ends normally.
    let (_, out) = exec(
        &app,
        &chat,
        json!({"command": "i=0; while [ $i -lt 500 ]; do echo 0123456789; i=$((i+1)); done"}),
    )
    .await;
    assert_eq!(out["exit_code"], 0);
    assert_eq!(out["truncated"], true);
    assert_eq!(out["stdout"].as_str().unwrap().len(), 1000);

    // Bytes that are not UTF-8 come back intact, as base64.
    let (status, out) = exec(
        &app,
        &chat,
        json!({"command": "printf '\\377\\000\\376ok'"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(out["stdout_encoding"], "base64");
    assert_eq!(out["stdout"], "/wD+b2s=");
    assert_eq!(out["stderr_encoding"], "utf-8");

    // A command that does not exist is the engine's answer, not a 500.
    let (status, out) = exec(&app, &chat, json!({"command": ["/no/such/binary"]})).await;
    assert_eq!(status, StatusCode::OK, "{out}");
    assert_ne!(out["exit_code"], 0);

    // Every exec is audited: who, the command, the exit code and byte counts; never output.
    let lines = app
        .db_scalar("SELECT count(*) FROM sandbox_events WHERE action = 'exec' AND actor LIKE 'anonymous@127.0.0.1:%'")
        .await;
    assert_eq!(lines, 6);
    let leaked = app
        .db_scalar("SELECT count(*) FROM sandbox_events WHERE detail LIKE '%hello there%' OR detail LIKE '%from stdin%'")
        .await;
    assert_eq!(leaked, 0, "outputs and stdin stay out of the log");
    let with_codes = app
        .db_scalar("SELECT count(*) FROM sandbox_events WHERE action = 'exec' AND json_extract(detail, '$.exit_code') = 3 AND json_extract(detail, '$.stdout_bytes') = 41 AND json_extract(detail, '$.command') LIKE '%GREETING%'")
        .await;
    assert_eq!(with_codes, 1);
}

/// Processes in the container whose command line contains `needle`.
async fn processes_matching(app: &TestApp, chat: &str, needle: &str) -> Vec<String> {
    let (_, out) = exec(
        app,
        chat,
        json!({"command": "for d in /proc/[0-9]*; do tr '\\0' ' ' < $d/cmdline 2>/dev/null; echo; done"}),
    )
    .await;
    out["stdout"]
        .as_str()
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle) && !l.contains("/proc/"))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_timeout_kills_every_process_it_started_even_ones_ignoring_sigterm() {
    let app = TestApp::spawn().await;
    let chat = running_chat(&app).await;
    // A child that ignores SIGTERM, one that left the session (setsid), one with an empty
    // environment (found as a descendant), and a foreground sleeper holding the output open.
    let (status, out) = exec(
        &app,
        &chat,
        json!({
            "command": "(trap '' TERM; sleep 301) & setsid sleep 302 & env -i /bin/sleep 304 & echo started; sleep 303",
            "timeout_seconds": 1
        }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{out}");
    assert_eq!(out["timed_out"], true);
    assert_eq!(out["exit_code"], 124);
    assert_eq!(out["stdout"], "started\n", "output before the kill is kept");
    let left = processes_matching(&app, &chat, "sleep 30").await;
    assert!(left.is_empty(), "still running after the timeout: {left:?}");
    // The sandbox's own process is untouched.
    let (_, out) = exec(
        &app,
        &chat,
        json!({"command": "cat /proc/1/cmdline | tr '\\0' ' '"}),
    )
    .await;
    assert!(out["stdout"].as_str().unwrap().contains("httpd"), "{out}");
    let timeouts = app
        .db_scalar(
            "SELECT count(*) FROM sandbox_events WHERE action = 'exec' AND outcome = 'timeout'",
        )
        .await;
    assert_eq!(timeouts, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_streams_output_chunks_then_the_exit_code_and_a_gone_client_kills_the_command() {
    let app = TestApp::spawn().await;
    let chat = running_chat(&app).await;
    let mut r = app
        .client
        .post(app.url(&format!("/api/v1/sandboxes/{chat}/exec")))
        .header("accept", "application/x-ndjson")
        .json(&json!({"command": "for i in 1 2 3; do echo line$i; sleep 0.2; done; echo bad >&2; exit 7"}))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "application/x-ndjson");
    // Read it as it comes: each line is one chunk, each chunk arrives as its own body frame.
    let mut frames = 0;
    let mut text = String::new();
    while let Some(chunk) = r.chunk().await.expect("chunk") {
        frames += 1;
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let stdout: Vec<&str> = lines
        .iter()
        .filter(|l| l["stream"] == "stdout")
        .map(|l| l["data"].as_str().unwrap())
        .collect();
    assert_eq!(stdout.concat(), "line1\nline2\nline3\n");
    assert!(stdout.len() >= 3, "output arrived in one piece: {lines:?}");
    assert!(frames >= 4, "the body was not streamed: {frames} frames");
    assert!(lines
        .iter()
        .any(|l| l["stream"] == "stderr" && l["data"] == "bad\n"));
    let last = lines.last().unwrap();
    assert_eq!(last["exit_code"], 7);
    assert_eq!(last["timed_out"], false);

    // A client that goes away mid-stream: its command is killed (not left running).
    let r = app
        .client
        .post(app.url(&format!("/api/v1/sandboxes/{chat}/exec")))
        .json(&json!({"command": "while true; do echo tick; sleep 0.1; done", "stream": true, "timeout_seconds": 300}))
        .send()
        .await
        .expect("request");
    let mut r = r;
    let first = r.chunk().await.expect("chunk").expect("a first line");
    assert!(std::str::from_utf8(&first).unwrap().contains("tick"));
    drop(r);
    wait_until(
        Duration::from_secs(15),
        "the command of a client that left is killed",
        || async {
            processes_matching(&app, &chat, "while true")
                .await
                .is_empty()
                .then_some(())
        },
    )
    .await;

    // The same for a silent streamed command (nothing to write tells sandboxd the client is
    // gone), and for a buffered exec whose client hangs up.
    let r = app
        .client
        .post(app.url(&format!("/api/v1/sandboxes/{chat}/exec")))
        .json(&json!({"command": "sleep 321", "stream": true, "timeout_seconds": 300}))
        .send()
        .await
        .expect("request");
    drop(r);
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(1500))
        .build()
        .unwrap();
    let r = impatient
        .post(app.url(&format!("/api/v1/sandboxes/{chat}/exec")))
        .json(&json!({"command": "sleep 322", "timeout_seconds": 300}))
        .send()
        .await;
    assert!(r.is_err(), "the client gave up first");
    wait_until(
        Duration::from_secs(15),
        "the commands of clients that left are killed",
        || async {
            processes_matching(&app, &chat, "sleep 32")
                .await
                .is_empty()
                .then_some(())
        },
    )
    .await;
    let abandoned = app
        .db_scalar("SELECT count(*) FROM sandbox_events WHERE action = 'exec' AND json_extract(detail, '$.abandoned') = 1")
        .await;
    assert_eq!(abandoned, 3, "each abandoned exec is audited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_concurrency_is_limited_per_sandbox_and_overall_with_429_and_retry_after() {
    let app = TestApp::spawn_with(|s| {
        s.data_plane.max_concurrent = 3;
        s.data_plane.max_concurrent_per_sandbox = 2;
    })
    .await;
    let (a, b) = (running_chat(&app).await, running_chat(&app).await);
    let slow = json!({"command": "sleep 2", "timeout_seconds": 10});
    let mut held = Vec::new();
    for chat in [&a, &a, &b] {
        let (client, url, body) = (
            app.client.clone(),
            app.url(&format!("/api/v1/sandboxes/{chat}/exec")),
            slow.clone(),
        );
        held.push(tokio::spawn(async move {
            client
                .post(url)
                .json(&body)
                .send()
                .await
                .map(|r| r.status())
        }));
    }
    // Wait until all three hold their slots.
    wait_until(Duration::from_secs(10), "all three slots taken", || async {
        let metrics = get_text(&app.client, &app.url("/metrics")).await;
        metrics
            .lines()
            .any(|l| l == "sandboxd_data_plane_in_flight 3")
            .then_some(())
    })
    .await;
    let r = app
        .client
        .post(app.url(&format!("/api/v1/sandboxes/{a}/exec")))
        .json(&json!({"command": "true"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.headers()["retry-after"], "1");
    let body: Value = r.json().await.unwrap();
    assert!(detail_text(&body).contains("max_concurrent"), "{body}");
    // b has one call in flight (below its own limit of 2), but all three overall slots are
    // taken: the overall limit answers.
    let (status, body) = exec(&app, &b, json!({"command": "true"})).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert!(
        detail_text(&body).contains("data_plane.max_concurrent is 3"),
        "{body}"
    );
    for h in held {
        assert_eq!(h.await.unwrap().unwrap(), StatusCode::OK);
    }
    // Slots are given back.
    let (status, _) = exec(&app, &a, json!({"command": "true"})).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_written_read_and_listed_with_modes_parents_and_limits() {
    let app = TestApp::spawn_with(|s| {
        s.data_plane.file_write_limit_bytes = 256 * 1024;
        s.data_plane.file_read_limit_bytes = 64 * 1024;
    })
    .await;
    let chat = running_chat(&app).await;

    // Binary content, missing parents, a mode.
    let data: Vec<u8> = (0..50_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let (status, body) = put_file(
        &app,
        &chat,
        "path=out/deep/data.bin&mode=0600",
        data.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["path"], "/workspace/chat/out/deep/data.bin");
    assert_eq!(body["bytes"], 50_000);
    assert_eq!(body["mode"], "0600");
    assert_eq!(
        body["created_dirs"],
        json!(["/workspace/chat/out", "/workspace/chat/out/deep"])
    );
    let (status, back) = get_file(&app, &chat, "path=out/deep/data.bin").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(back, data, "read back byte for byte");
    // It is on the host, in the chat directory.
    let host = app
        .settings
        .sandbox
        .chats_root
        .join(&chat)
        .join("out/deep/data.bin");
    assert_eq!(std::fs::read(&host).unwrap(), data);
    // The sandbox sees it with that mode.
    let (_, out) = exec(
        &app,
        &chat,
        json!({"command": "stat -c %a out/deep/data.bin"}),
    )
    .await;
    assert_eq!(out["stdout"], "600\n");

    // Absolute paths on a writable mount; overwrite keeps one file.
    let (status, _) = put_file(&app, &chat, "path=/workspace/volume/v.txt", b"one".to_vec()).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = put_file(&app, &chat, "path=/workspace/volume/v.txt", b"two".to_vec()).await;
    assert_eq!(status, StatusCode::OK);
    let (_, back) = get_file(&app, &chat, "path=/workspace/volume/v.txt").await;
    assert_eq!(back, b"two");

    // Listing.
    let (status, listing) = app
        .get(&format!("/api/v1/sandboxes/{chat}/dir?path=out/deep"))
        .await;
    assert_eq!(status, StatusCode::OK, "{listing}");
    assert_eq!(listing["path"], "/workspace/chat/out/deep");
    assert_eq!(listing["entries"][0]["name"], "data.bin");
    assert_eq!(listing["entries"][0]["kind"], "file");
    assert_eq!(listing["entries"][0]["size"], 50_000);
    assert_eq!(listing["entries"][0]["mode"], "0600");
    let (_, root) = app.get(&format!("/api/v1/sandboxes/{chat}/dir")).await;
    let names: Vec<&str> = root["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["out"], "only direct children: {root}");
    assert_eq!(root["entries"][0]["kind"], "dir");

    // Limits: over the write limit 413 (nothing written), over the read limit 413.
    let (status, body) = put_file(&app, &chat, "path=big.bin", vec![1u8; 300 * 1024]).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert!(detail_text(&body).contains("data_plane.file_write_limit_bytes"));
    assert!(!app
        .settings
        .sandbox
        .chats_root
        .join(&chat)
        .join("big.bin")
        .exists());
    let (status, _) = put_file(&app, &chat, "path=mid.bin", vec![2u8; 100 * 1024]).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = get_file(&app, &chat, "path=mid.bin").await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(detail_text(&json_of(&body)).contains("file_read_limit_bytes"));

    // Kinds: a directory is not a file, a file is not a directory, a missing path is 404.
    let (status, _) = get_file(&app, &chat, "path=out").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = app
        .get(&format!("/api/v1/sandboxes/{chat}/dir?path=mid.bin"))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, body) = get_file(&app, &chat, "path=nope.txt").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(detail_text(&json_of(&body)).contains("/workspace/chat/nope.txt"));

    // Writes are audited with path and size, never content.
    let audited = app
        .db_scalar("SELECT count(*) FROM sandbox_events WHERE action = 'file_write' AND json_extract(detail, '$.path') = '/workspace/chat/out/deep/data.bin' AND json_extract(detail, '$.bytes') = 50000")
        .await;
    assert_eq!(audited, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_file_paths_are_refused_and_symlinks_never_lead_off_the_mounts() {
    let app = TestApp::spawn().await;
    let chat = running_chat(&app).await;
    let base = format!("/api/v1/sandboxes/{chat}");
    // Rules checked before any engine call: 422 naming the query parameter.
    let long = "a/".repeat(2100);
    let cases = [
        ("../../etc/passwd", "`..`"),
        ("out/../../x", "`..`"),
        ("/workspace/chat/../../etc", "`..`"),
        ("/etc/passwd", "not under one of the sandbox's mounts"),
        (
            "/proc/self/environ",
            "not under one of the sandbox's mounts",
        ),
        (
            "/workspace/chatty/x",
            "not under one of the sandbox's mounts",
        ),
        ("a%00b", "NUL"),
        (long.as_str(), "longer than 4096"),
        ("", "empty"),
    ];
    for (path, why) in cases {
        for (status, body) in [
            put_file(&app, &chat, &format!("path={path}"), b"x".to_vec()).await,
            {
                let (s, b) = get_file(&app, &chat, &format!("path={path}")).await;
                (s, json_of(&b))
            },
            app.get(&format!("{base}/dir?path={path}")).await,
        ] {
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{path}: {body}");
            assert_eq!(body["detail"][0]["loc"], json!(["query", "path"]), "{body}");
            assert!(detail_text(&body).contains(why), "{path}: {body}");
        }
    }
    // A read-only mount: 403, not a 500.
    let (status, body) = put_file(&app, &chat, "path=/opt/dependencies/x.py", b"x".to_vec()).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(detail_text(&body).contains("read-only"), "{body}");
    // No setuid, setgid or sticky bits (the file lands in a host directory).
    for mode in ["4755", "2755", "1777", "99", "rw"] {
        let (status, body) = put_file(
            &app,
            &chat,
            &format!("path=m.sh&mode={mode}"),
            b"x".to_vec(),
        )
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{mode}: {body}");
        assert_eq!(body["detail"][0]["loc"], json!(["query", "mode"]));
    }
    // A mount root is not a file.
    let (status, _) = put_file(&app, &chat, "path=/workspace/volume", b"x".to_vec()).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);

    // Symlinks made inside the sandbox.
    let (_, out) = exec(
        &app,
        &chat,
        json!({"command": "ln -s /proc/self/environ env && ln -s /etc etc && ln -s /opt/dependencies deps && echo inside > real.txt && ln -s real.txt alias && ln -s /workspace/volume vol"}),
    )
    .await;
    assert_eq!(out["exit_code"], 0, "{out}");
    // To /proc: refused, never the contents.
    let (status, body) = get_file(&app, &chat, "path=env").await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert!(!String::from_utf8_lossy(&body).contains("AGENT_ID"));
    // Through a symlinked directory, to read or write: refused.
    let (status, _) = get_file(&app, &chat, "path=etc/passwd").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = put_file(&app, &chat, "path=etc/evil", b"x".to_vec()).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = put_file(&app, &chat, "path=deps/evil.py", b"x".to_vec()).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (_, out) = exec(
        &app,
        &chat,
        json!({"command": "ls /etc/evil /opt/dependencies/evil.py 2>&1"}),
    )
    .await;
    assert!(
        out["stdout"].as_str().unwrap().contains("No such file"),
        "{out}"
    );
    // A symlink on the mounts is followed.
    let (status, body) = get_file(&app, &chat, "path=alias").await;
    assert_eq!(
        (status, body.as_slice()),
        (StatusCode::OK, b"inside\n".as_slice())
    );
    let (status, listing) = app.get(&format!("{base}/dir?path=vol")).await;
    assert_eq!(status, StatusCode::OK, "{listing}");
    assert_eq!(listing["path"], "/workspace/volume");
    // Writing to a symlink's name replaces the link; it never writes through it.
    let (status, _) = put_file(&app, &chat, "path=env", b"plain".to_vec()).await;
    assert_eq!(status, StatusCode::OK);
    let (_, out) = exec(
        &app,
        &chat,
        json!({"command": "[ -L env ] && echo link || cat env"}),
    )
    .await;
    assert_eq!(out["stdout"], "plain");

    // Huge and malformed exec input.
    let huge = "x".repeat(70 * 1024);
    let (status, body) = exec(&app, &chat, json!({"command": huge})).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    let big = "y".repeat(40 * 1024);
    let (status, body) = exec(&app, &chat, json!({"command": ["echo", big]})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(detail_text(&body).contains("exec_max_command_bytes"));
    for bad in [
        json!({}),
        json!({"command": []}),
        json!({"command": ""}),
        json!({"command": [1, 2]}),
        json!({"command": ["a\u{0}b"]}),
        json!({"command": "true", "timeout_seconds": 0}),
        json!({"command": "true", "timeout_seconds": 99999}),
        json!({"command": "true", "env": {"A=B": "x"}}),
        json!({"command": "true", "env": {"SANDBOXD_EXEC_ID": "x"}}),
        json!({"command": "true", "workdir": "../.."}),
        json!({"command": "true", "workdir": "/etc"}),
        json!({"command": "true", "workdir": "/etc", "stream": true}),
        json!({"command": "true", "surprise": 1}),
        json!({"command": "true", "stdin": "a", "stdin_base64": "YQ=="}),
    ] {
        let (status, body) = exec(&app, &chat, bad.clone()).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {body}");
        assert!(body["detail"][0]["loc"][0] == "body", "{bad}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_plane_answers_404_409_and_503_and_the_desired_state_api_still_works() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = DockerProxy::start(dir.path()).await;
    let app = TestApp::spawn_with(|s| s.docker.base_url = proxy.base_url()).await;
    // No such chat.
    let (status, body) = exec(&app, &new_chat(), json!({"command": "true"})).await;
    assert_eq!(
        (status, detail_text(&body)),
        (StatusCode::NOT_FOUND, "sandbox_not_found".into())
    );
    let chat = running_chat(&app).await;
    // A sandbox whose starts fail (the engine answers 500 for it): 409 naming the phase.
    let broken = new_chat();
    proxy.fail(Some(&broken));
    let (status, _) = app.create(&broken, "a", &app.volume("b")).await;
    assert!(status.is_server_error(), "{status}");
    let (status, body) = exec(&app, &broken, json!({"command": "true"})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(detail_text(&body).contains("failed"), "{body}");
    proxy.fail(None);
    // A pending sandbox (declared, the engine away so it cannot start): 409 naming the phase.
    proxy.set_down(true);
    let pending = new_chat();
    let r = app
        .client
        .put(app.url(&format!("/api/v1/sandboxes/{pending}")))
        .json(&json!({"agent_id": "a", "volume_host_path": app.volume("p")}))
        .send()
        .await
        .unwrap();
    assert!(
        r.status().is_success(),
        "the desired-state API works without the engine"
    );
    let (status, body) = exec(&app, &pending, json!({"command": "true"})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let phase_named = ["pending", "failed"]
        .iter()
        .any(|p| detail_text(&body).contains(p));
    assert!(phase_named, "{body}");
    // So do a background process and a terminal.
    let (status, body) = app
        .post_json(
            &format!("/api/v1/sandboxes/{pending}/processes"),
            &json!({"command": "true"}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(pty_status(&app, &pending).await, StatusCode::CONFLICT);
    // A running sandbox with the engine away: 503 with a clear detail, for every route.
    let (status, body) = exec(&app, &chat, json!({"command": "true"})).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        detail_text(&body).contains("docker engine unavailable"),
        "{body}"
    );
    let (status, _) = put_file(&app, &chat, "path=x", b"x".to_vec()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let (status, _) = get_file(&app, &chat, "path=x").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let (status, body) = app
        .post_json(
            &format!("/api/v1/sandboxes/{chat}/processes"),
            &json!({"command": "true"}),
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(
        pty_status(&app, &chat).await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    // Listing processes reads the store, and a file watch reads the host's inotify: both
    // work without the engine.
    let (status, body) = app
        .get(&format!("/api/v1/sandboxes/{chat}/processes"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let mut watch =
        crate::watch::SseReader::open(&app, &format!("/api/v1/sandboxes/{chat}/files/watch"), None)
            .await;
    let ready = watch.next(Duration::from_secs(10)).await.expect("ready");
    assert_eq!(ready.event, "ready");
    drop(watch);
    // The engine back: the data plane reconnects on its own.
    proxy.set_down(false);
    wait_until(
        Duration::from_secs(20),
        "the data plane reconnects",
        || async {
            (exec(&app, &chat, json!({"command": "true"})).await.0 == StatusCode::OK).then_some(())
        },
    )
    .await;
    // Deleted: 404 once the row is gone (409 `deleting` before that).
    let (status, _) = app.delete(&chat).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = exec(&app, &chat, json!({"command": "true"})).await;
    assert!(
        matches!(status, StatusCode::NOT_FOUND | StatusCode::CONFLICT),
        "{status}"
    );
}
