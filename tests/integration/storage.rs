//! Chat storage against the real binary's API, the real engine and real file systems:
//! workspaces, chats, history and attachments, visible inside the chat's sandbox; the quota
//! held by the kernel inside the sandbox and by the API; deletes refused while a sandbox runs.

use std::time::Instant;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::dataplane::exec;
use crate::support::*;

const MIB: u64 = 1 << 20;

async fn send(
    app: &TestApp,
    method: reqwest::Method,
    path: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> (StatusCode, reqwest::header::HeaderMap, Vec<u8>) {
    let mut r = app.client.request(method, app.url(path)).body(body);
    if let Some(t) = content_type {
        r = r.header("content-type", t);
    }
    let r = r.send().await.expect("request");
    let (status, headers) = (r.status(), r.headers().clone());
    (status, headers, r.bytes().await.expect("body").to_vec())
}

fn json_of(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap_or(Value::Null)
}

async fn workspace(app: &TestApp, user: &str, quota: u64) -> String {
    let (status, body) = app
        .post_json(
            "/api/v1/workspaces",
            &json!({"user_id": user, "quota_bytes": quota}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body["workspace_id"].as_str().expect("id").to_string()
}

async fn chat_in(app: &TestApp, ws: &str) -> String {
    let (status, body) = app
        .post_json(&format!("/api/v1/workspaces/{ws}/chats"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body["chat_id"].as_str().expect("chat id").to_string()
}

async fn sh(app: &TestApp, chat: &str, command: &str) -> Value {
    let (status, out) = exec(
        app,
        chat,
        json!({"command": command, "timeout_seconds": 60}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{out}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workspace_chats_files_are_durable_visible_in_its_sandbox_and_held_to_its_quota() {
    let app = TestApp::spawn().await;
    // One workspace per user: the same user again is the same workspace.
    let ws = workspace(&app, "user-1", 8 * MIB).await;
    let (status, again) = app
        .post_json("/api/v1/workspaces", &json!({"user_id": "user-1"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["workspace_id"], ws.as_str());
    let (_, listed) = app.get("/api/v1/workspaces?user_id=user-1").await;
    assert_eq!(
        listed["items"].as_array().map(Vec::len),
        Some(1),
        "{listed}"
    );

    // A chat: its directory with an empty history.
    let chat = chat_in(&app, &ws).await;
    let (status, view) = app.get(&format!("/api/v1/chats/{chat}")).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(view["workspace_id"], ws.as_str());
    let history = format!("/api/v1/chats/{chat}/history");
    let (status, _, text) = send(&app, reqwest::Method::GET, &history, None, vec![]).await;
    assert_eq!((status, text.as_slice()), (StatusCode::OK, b"".as_slice()));
    let put = send(
        &app,
        reqwest::Method::PUT,
        &history,
        None,
        b"# chat\n".to_vec(),
    )
    .await;
    assert_eq!(put.0, StatusCode::OK, "{}", json_of(&put.2));
    let append = format!("/api/v1/chats/{chat}/history:append");
    let added = send(
        &app,
        reqwest::Method::POST,
        &append,
        None,
        b"hello\n".to_vec(),
    )
    .await;
    assert_eq!(added.0, StatusCode::OK, "{}", json_of(&added.2));
    let (_, headers, text) = send(&app, reqwest::Method::GET, &history, None, vec![]).await;
    assert_eq!(text, b"# chat\nhello\n");
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/markdown"));

    // An attachment, its type kept.
    let notes = format!("/api/v1/chats/{chat}/files/notes.txt");
    let (status, _, body) = send(
        &app,
        reqwest::Method::PUT,
        &notes,
        Some("text/plain"),
        b"remember".to_vec(),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{}", json_of(&body));
    let (status, headers, body) = send(&app, reqwest::Method::GET, &notes, None, vec![]).await;
    assert_eq!(
        (status, body.as_slice()),
        (StatusCode::OK, b"remember".as_slice())
    );
    assert_eq!(headers["content-type"], "text/plain");
    let (_, files) = app.get(&format!("/api/v1/chats/{chat}/files")).await;
    assert_eq!(files["items"][0]["name"], "notes.txt", "{files}");
    assert_eq!(files["items"][0]["size_bytes"], 8);
    // Names that are not one plain component, or are the history's, are refused. (`..`
    // never reaches a server through a URL: clients resolve it; the unit tests hold it.)
    for bad in [
        "history.md",
        "a%2Fb",
        "..%2Fetc",
        "a%5Cb",
        "a%00b",
        "new%0Aline",
    ] {
        let path = format!("/api/v1/chats/{chat}/files/{bad}");
        let (status, _, body) = send(&app, reqwest::Method::PUT, &path, None, b"x".to_vec()).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{bad}: {}",
            json_of(&body)
        );
    }

    // Its sandbox mounts the chat's directory: history and attachment are there.
    let (status, body) = app.create(&chat, "agent", &app.volume("v")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let out = sh(
        &app,
        &chat,
        "cat /workspace/chat/history.md /workspace/chat/notes.txt",
    )
    .await;
    assert_eq!(out["stdout"], "# chat\nhello\nremember", "{out}");

    // Another user's chat never sees this one's files.
    let other_ws = workspace(&app, "user-2", 8 * MIB).await;
    let other = chat_in(&app, &other_ws).await;
    let (status, body) = app.create(&other, "agent", &app.volume("v2")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let out = sh(&app, &other, "ls -A /workspace/chat").await;
    assert_eq!(out["stdout"], "history.md\n", "{out}");

    // The kernel holds the quota inside the sandbox: the agent's write past it fails.
    let out = sh(
        &app,
        &chat,
        "dd if=/dev/zero of=/workspace/chat/big bs=1M count=16 2>&1; sync",
    )
    .await;
    assert!(
        out["stdout"]
            .as_str()
            .unwrap()
            .contains("No space left on device"),
        "{out}"
    );
    let (_, view) = app.get(&format!("/api/v1/workspaces/{ws}")).await;
    let used = view["usage"]["used_bytes"].as_u64().expect("usage");
    assert!(used <= 8 * MIB, "{view}");
    assert!(used >= 7 * MIB, "the agent's file counts: {view}");
    // The metrics place it in its band (figures refreshed every resync period).
    let band = match used * 100 / (8 * MIB) {
        0..50 => "under_50",
        50..80 => "50_to_80",
        80..95 => "80_to_95",
        _ => "over_95",
    };
    let line = format!("sandboxd_storage_workspaces{{state=\"{band}\"}} 1");
    wait_until(
        std::time::Duration::from_secs(15),
        "the full workspace in the metrics",
        || async {
            let text = get_text(&app.client, &app.url("/metrics")).await;
            text.lines().any(|l| l == line).then_some(())
        },
    )
    .await;
    // So does the API, before it writes anything.
    let more = format!("/api/v1/chats/{chat}/files/more.bin");
    let (status, _, body) = send(
        &app,
        reqwest::Method::PUT,
        &more,
        None,
        vec![0u8; 2 * MIB as usize],
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{}", json_of(&body));
    assert_eq!(json_of(&body)["detail"], "workspace_quota_exceeded");
    let (_, files) = app.get(&format!("/api/v1/chats/{chat}/files")).await;
    assert_eq!(
        files["items"].as_array().map(Vec::len),
        Some(1),
        "nothing written: {files}"
    );

    // A quota raised while the sandbox runs (within the image: the reserve shrinks): the
    // same write fits, and the sandbox sees it.
    let raise = |quota: u64| {
        let app = &app;
        let ws = ws.clone();
        async move {
            let r = app
                .client
                .patch(app.url(&format!("/api/v1/workspaces/{ws}")))
                .json(&json!({"quota_bytes": quota}))
                .send()
                .await
                .expect("patch");
            (r.status(), r.json::<Value>().await.expect("json"))
        }
    };
    let (status, view) = raise(12 * MIB).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(view["usage"]["quota_bytes"], 12 * MIB);
    let (status, _, body) = send(
        &app,
        reqwest::Method::PUT,
        &more,
        None,
        vec![0u8; 2 * MIB as usize],
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{}", json_of(&body));
    let out = sh(&app, &chat, "ls -l /workspace/chat/more.bin").await;
    assert!(out["stdout"].as_str().unwrap().contains("2097152"), "{out}");

    // A chat with a live sandbox is not deleted; after its sandbox, it goes whole.
    let (status, _, body) = send(
        &app,
        reqwest::Method::DELETE,
        &format!("/api/v1/chats/{chat}"),
        None,
        vec![],
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{}", json_of(&body));
    assert_eq!(json_of(&body)["detail"], "chat_has_active_sandbox");
    let (status, body) = app.delete(&chat).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _, body) = send(
        &app,
        reqwest::Method::DELETE,
        &format!("/api/v1/chats/{chat}"),
        None,
        vec![],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{}", json_of(&body));
    let (status, body) = app.get(&format!("/api/v1/chats/{chat}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["detail"], "chat_not_found");
    let dir = app
        .settings
        .storage
        .root
        .join("mnt")
        .join(&ws)
        .join("chats")
        .join(&chat);
    assert!(!dir.exists(), "nothing of the chat stays on disk");
    let (_, view) = app.get(&format!("/api/v1/workspaces/{ws}")).await;
    assert!(
        view["usage"]["used_bytes"].as_u64().unwrap() < MIB,
        "{view}"
    );
    // With no sandbox on it, a quota past the image grows it (offline where this host may
    // not resize a mounted file system), and the workspace is in service again at once.
    let (status, view) = raise(64 * MIB).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(view["usage"]["quota_bytes"], 64 * MIB);
    let chat = chat_in(&app, &ws).await;
    let big = format!("/api/v1/chats/{chat}/files/big.bin");
    let (status, _, body) = send(
        &app,
        reqwest::Method::PUT,
        &big,
        None,
        vec![7u8; 15 * MIB as usize],
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{}", json_of(&body));

    // Storage writes are in the event log: who, what, how many bytes; never contents.
    let audited = app
        .db_scalar("SELECT count(*) FROM sandbox_events WHERE action = 'storage_write' AND detail LIKE '%\"bytes\"%'")
        .await;
    assert!(audited >= 3, "{audited}");
    let leaked = app
        .db_scalar("SELECT count(*) FROM sandbox_events WHERE detail LIKE '%remember%'")
        .await;
    assert_eq!(leaked, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_workspaces_and_chats_are_named_and_old_clients_are_unaffected() {
    let app = TestApp::spawn().await;
    let missing = uuid::Uuid::new_v4();
    let (status, body) = app.get(&format!("/api/v1/workspaces/{missing}")).await;
    assert_eq!(
        (status, body["detail"].clone()),
        (StatusCode::NOT_FOUND, json!("workspace_not_found"))
    );
    let (status, body) = app
        .post_json(&format!("/api/v1/workspaces/{missing}/chats"), &json!({}))
        .await;
    assert_eq!(
        (status, body["detail"].clone()),
        (StatusCode::NOT_FOUND, json!("workspace_not_found"))
    );
    let (status, body) = app.get(&format!("/api/v1/chats/{missing}/files")).await;
    assert_eq!(
        (status, body["detail"].clone()),
        (StatusCode::NOT_FOUND, json!("chat_not_found"))
    );
    let (status, body) = app
        .post_json(
            "/api/v1/workspaces",
            &json!({"user_id": "u", "quota_bytes": 10}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["detail"][0]["loc"], json!(["body", "quota_bytes"]));
    let ws = workspace(&app, "u", 4 * MIB).await;
    let chat = chat_in(&app, &ws).await;
    let (status, _, body) = send(
        &app,
        reqwest::Method::GET,
        &format!("/api/v1/chats/{chat}/files/nope.txt"),
        None,
        vec![],
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(json_of(&body)["detail"], "chat_file_not_found");
    // A chunked body (no declared length) past the quota: refused as it streams, nothing
    // written. Sent by hand: 5 chunks of 1 MiB into a 4 MiB workspace.
    let status_line = {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(app.addr).await.unwrap();
        let head = format!(
            "PUT /api/v1/chats/{chat}/files/chunked.bin HTTP/1.1\r\nHost: sandboxd\r\n\
             Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        let chunk = vec![b'c'; MIB as usize];
        for _ in 0..5 {
            // The server may answer and close before the last chunks: that is the point.
            if s.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                .await
                .is_err()
                || s.write_all(&chunk).await.is_err()
                || s.write_all(b"\r\n").await.is_err()
            {
                break;
            }
        }
        let _ = s.write_all(b"0\r\n\r\n").await;
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer).await;
        String::from_utf8_lossy(&answer).into_owned()
    };
    assert!(status_line.starts_with("HTTP/1.1 413"), "{status_line}");
    assert!(
        status_line.contains("workspace_quota_exceeded"),
        "{status_line}"
    );
    let (_, files) = app.get(&format!("/api/v1/chats/{chat}/files")).await;
    assert_eq!(files["items"], json!([]), "nothing written");
    // An old client's chat (never in a workspace) runs under `sandbox.chats_root`, as before.
    let old = new_chat();
    let (status, body) = app.create(&old, "agent", &app.volume("v")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(app.settings.sandbox.chats_root.join(&old).is_dir());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_mounts_workspaces_again_and_removes_what_a_crash_left() {
    let app = TestApp::spawn().await;
    let ws = workspace(&app, "user-r", 4 * MIB).await;
    let chat = chat_in(&app, &ws).await;
    let kept = format!("/api/v1/chats/{chat}/files/kept.txt");
    let (status, _, _) = send(&app, reqwest::Method::PUT, &kept, None, b"kept".to_vec()).await;
    assert_eq!(status, StatusCode::CREATED);
    let (dir, settings, guard) = app.stop().await;
    let mnt = settings.storage.root.join("mnt").join(&ws);
    let chats = mnt.join("chats");
    // What a crash can leave: a chat directory whose row was never written, and a write's
    // temporary file.
    let orphan = chats.join(uuid::Uuid::new_v4().to_string());
    std::fs::create_dir(&orphan).unwrap();
    let half = chats.join(&chat).join(".sandboxd-tmp-0");
    std::fs::write(&half, b"half").unwrap();
    // And a reboot: the workspace's file system is no longer mounted.
    rustix::mount::unmount(&mnt, rustix::mount::UnmountFlags::empty()).unwrap();
    assert!(!chats.exists());
    let app = TestApp::start(dir, settings).await;
    let _guard = guard;
    let (status, _, body) = send(&app, reqwest::Method::GET, &kept, None, vec![]).await;
    assert_eq!(
        (status, body.as_slice()),
        (StatusCode::OK, b"kept".as_slice())
    );
    assert!(!orphan.exists(), "a directory without metadata is removed");
    assert!(!half.exists(), "a half-written file is removed");
    assert!(chats.join(&chat).join("history.md").is_file());
}

/// One storage call of the SIGKILL test.
#[derive(Debug, Clone)]
enum StorageOp {
    Put {
        chat: String,
        name: String,
        byte: u8,
        size: usize,
    },
    Append {
        chat: String,
        line: String,
    },
    DeleteChat {
        chat: String,
    },
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_storage_writes_and_deletes_leaves_metadata_and_files_agreeing() {
    use std::collections::{HashMap, HashSet};
    let fx = ProcessFixture::new(|_| {});
    let _mounts = crate::warm_support::MountGuard(fx.dir.path().to_path_buf());
    let client = reqwest::Client::new();
    let mut rng = Rng(0x5707_a9e5);
    let mut server = fx.start().await;
    let base = |s: &ServerProcess| format!("http://{}", s.addr);
    let r = client
        .post(format!("{}/api/v1/workspaces", base(&server)))
        .json(&json!({"user_id": "crash", "quota_bytes": 64 * MIB}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let ws = r.json::<Value>().await.unwrap()["workspace_id"]
        .as_str()
        .unwrap()
        .to_string();
    let chats: Vec<String> = (0..8).map(|_| new_chat()).collect();
    // (chat, name) -> (byte, size) of the last acknowledged write; chats acknowledged gone;
    // history lines acknowledged.
    let mut files: HashMap<(String, String), (u8, usize)> = HashMap::new();
    let mut gone: HashSet<String> = HashSet::new();
    let mut lines: HashMap<String, Vec<String>> = HashMap::new();
    for round in 0..8u8 {
        // Every chat exists at the start of a round (made again after a delete).
        for chat in &chats {
            let r = client
                .post(format!("{}/api/v1/workspaces/{ws}/chats", base(&server)))
                .json(&json!({"chat_id": chat}))
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success(), "{}", r.text().await.unwrap());
            if gone.remove(chat) {
                files.retain(|(c, _), _| c != chat);
                lines.remove(chat);
            }
        }
        let mut ops = Vec::new();
        for chat in &chats {
            if rng.below(4) == 0 {
                ops.push(StorageOp::DeleteChat { chat: chat.clone() });
                continue;
            }
            for k in 0..3 {
                ops.push(StorageOp::Put {
                    chat: chat.clone(),
                    name: format!("f{k}.bin"),
                    byte: round * 16 + k + 1,
                    size: (1 + rng.below(1024)) as usize * 1024,
                });
            }
            for i in 0..2 {
                ops.push(StorageOp::Append {
                    chat: chat.clone(),
                    line: format!("line-{round}-{i}-{chat}"),
                });
            }
        }
        let addr = server.addr;
        // The kill comes right after the k-th answer: calls are in flight on every side of it.
        let kill_after = 1 + rng.below(ops.len() as u64 / 2) as usize;
        let (answered, mut answers) = tokio::sync::mpsc::unbounded_channel::<()>();
        let handles: Vec<_> = ops
            .iter()
            .cloned()
            .map(|op| {
                let client = client.clone();
                let answered = answered.clone();
                tokio::spawn(async move {
                    let base = format!("http://{addr}");
                    let sent = match &op {
                        StorageOp::Put {
                            chat,
                            name,
                            byte,
                            size,
                        } => {
                            client
                                .put(format!("{base}/api/v1/chats/{chat}/files/{name}"))
                                .body(vec![*byte; *size])
                                .send()
                                .await
                        }
                        StorageOp::Append { chat, line } => {
                            client
                                .post(format!("{base}/api/v1/chats/{chat}/history:append"))
                                .body(format!("{line}\n"))
                                .send()
                                .await
                        }
                        StorageOp::DeleteChat { chat } => {
                            client
                                .delete(format!("{base}/api/v1/chats/{chat}"))
                                .send()
                                .await
                        }
                    };
                    let ok = sent.is_ok_and(|r| r.status().is_success());
                    let at = Instant::now();
                    let _ = answered.send(());
                    (op, ok, at)
                })
            })
            .collect();
        drop(answered);
        for _ in 0..kill_after {
            if answers.recv().await.is_none() {
                break;
            }
        }
        server.kill9();
        let killed_at = Instant::now();
        let mut acked_ops = 0;
        let total = handles.len();
        for h in handles {
            let (op, ok, at) = h.await.unwrap();
            let acked = ok && at <= killed_at;
            acked_ops += usize::from(acked);
            match op {
                StorageOp::Put {
                    chat,
                    name,
                    byte,
                    size,
                } => {
                    if acked {
                        files.insert((chat, name), (byte, size));
                    } else {
                        // Either content may be there now.
                        files.remove(&(chat, name));
                    }
                }
                StorageOp::Append { chat, line } if acked => {
                    lines.entry(chat).or_default().push(line)
                }
                StorageOp::Append { .. } => {}
                StorageOp::DeleteChat { chat } if acked => {
                    files.retain(|(c, _), _| *c != chat);
                    lines.remove(&chat);
                    gone.insert(chat);
                }
                StorageOp::DeleteChat { chat } => {
                    // Maybe gone, maybe not: only consistency is checked for it.
                    files.retain(|(c, _), _| *c != chat);
                    lines.remove(&chat);
                }
            }
        }
        eprintln!(
            "storage crash round {round}: {acked_ops} of {total} calls answered before the kill"
        );
        server = fx.start().await;
        let b = base(&server);
        let listed: Value = client
            .get(format!("{b}/api/v1/workspaces/{ws}/chats"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let listed: HashSet<String> = listed["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["chat_id"].as_str().unwrap().to_string())
            .collect();
        let chats_dir = fx.settings.storage.root.join("mnt").join(&ws).join("chats");
        let on_disk: HashSet<String> = std::fs::read_dir(&chats_dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            on_disk, listed,
            "round {round}: directories and metadata agree"
        );
        for chat in &gone {
            assert!(
                !listed.contains(chat),
                "round {round}: acknowledged delete of {chat} undone"
            );
        }
        for chat in &listed {
            let dir = chats_dir.join(chat);
            for entry in std::fs::read_dir(&dir).unwrap().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                assert!(
                    !name.starts_with(".sandboxd-"),
                    "round {round}: remnant {name}"
                );
            }
            let history = std::fs::read_to_string(dir.join("history.md")).unwrap();
            for line in history.lines() {
                assert!(
                    line.starts_with("line-") && line.ends_with(chat.as_str()),
                    "torn line {line:?}"
                );
            }
            for line in lines.get(chat).into_iter().flatten() {
                assert!(
                    history.lines().any(|l| l == line),
                    "round {round}: acknowledged {line} lost"
                );
            }
            let listed_files: Value = client
                .get(format!("{b}/api/v1/chats/{chat}/files"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            for f in listed_files["items"].as_array().unwrap() {
                let name = f["name"].as_str().unwrap();
                let body = std::fs::read(dir.join(name)).unwrap();
                assert_eq!(
                    body.len() as u64,
                    f["size_bytes"].as_u64().unwrap(),
                    "round {round}: {chat}/{name} row and file agree"
                );
                assert!(
                    body.windows(2).all(|w| w[0] == w[1]),
                    "round {round}: {name} is one write, whole"
                );
            }
        }
        for ((chat, name), (byte, size)) in &files {
            let body = std::fs::read(chats_dir.join(chat).join(name))
                .unwrap_or_else(|e| panic!("round {round}: acknowledged {chat}/{name} lost: {e}"));
            assert_eq!(
                (body.len(), body[0]),
                (*size, *byte),
                "round {round}: {chat}/{name}"
            );
        }
    }
    server.kill9();
}
