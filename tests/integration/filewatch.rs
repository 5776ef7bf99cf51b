//! File watch against the real engine: what a command in the sandbox does to its files
//! (create, write, rename, delete; in a subdirectory only when recursive) arrives on the
//! stream with container paths, and hostile paths (`..`, off the mounts, a symlink to `/`)
//! are refused.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::dataplane::{exec, running_chat};
use crate::support::*;
use crate::watch::SseReader;

fn watch_path(chat: &str, query: &str) -> String {
    format!("/api/v1/sandboxes/{chat}/files/watch?{query}")
}

/// The next `n` file events (`ready` must have been read).
async fn events(reader: &mut SseReader, n: usize) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    while out.len() < n {
        let ev = reader
            .next(Duration::from_secs(20))
            .await
            .expect("an event");
        assert_ne!(ev.event, "resync", "{}", ev.data);
        out.push((ev.event, ev.data));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_made_in_the_sandbox_arrive_on_the_watch_stream() {
    let app = TestApp::spawn().await;
    let chat = running_chat(&app).await;
    let mut all = SseReader::open(&app, &watch_path(&chat, "recursive=true"), None).await;
    let ready = all.next(Duration::from_secs(10)).await.expect("ready");
    assert_eq!(ready.event, "ready");
    assert_eq!(ready.data["path"], "/workspace/chat");
    let mut top = SseReader::open(&app, &watch_path(&chat, "path=/workspace/chat"), None).await;
    assert_eq!(
        top.next(Duration::from_secs(10))
            .await
            .expect("ready")
            .event,
        "ready"
    );

    // A new directory is watched before its `create` reaches the client: what happens in
    // it afterwards is seen, in order.
    let run = |command: &'static str| {
        let (app, chat) = (&app, &chat);
        async move {
            let (status, out) = exec(app, chat, json!({ "command": command })).await;
            assert_eq!(status, StatusCode::OK, "{out}");
            assert_eq!(out["exit_code"], 0, "{out}");
        }
    };
    run("mkdir d").await;
    let got = events(&mut all, 1).await;
    assert_eq!(
        (got[0].0.as_str(), got[0].1["path"].as_str()),
        ("create", Some("/workspace/chat/d"))
    );
    assert_eq!(got[0].1["is_dir"], true);
    run("echo hi > d/a.txt && mv d/a.txt d/b.txt && rm d/b.txt && touch top.txt").await;
    let got = events(&mut all, 6).await;
    let seen: Vec<(String, String)> = got
        .iter()
        .map(|(e, d)| (e.clone(), d["path"].as_str().unwrap_or("").to_string()))
        .collect();
    let want = |e: &str, p: &str| (e.to_string(), format!("/workspace/chat/{p}"));
    assert_eq!(seen[0], want("create", "d/a.txt"));
    assert_eq!(seen[1], want("modify", "d/a.txt"));
    assert_eq!(seen[2], want("rename", "d/a.txt"));
    assert_eq!(seen[3], want("rename", "d/b.txt"));
    assert_eq!(
        (got[2].1["side"].as_str(), got[3].1["side"].as_str()),
        (Some("from"), Some("to"))
    );
    assert_eq!(
        got[2].1["cookie"], got[3].1["cookie"],
        "the two sides of one rename"
    );
    assert_eq!(seen[4], want("delete", "d/b.txt"));
    assert_eq!(seen[5], want("create", "top.txt"));

    // A tree made at once: what came before its directories' watches is found by a scan
    // (reported as `scanned`), nothing is missed.
    run("mkdir -p e/f && echo x > e/f/g").await;
    let mut created = std::collections::BTreeSet::new();
    while !created.contains("/workspace/chat/e/f/g") {
        let (kind, data) = events(&mut all, 1).await.remove(0);
        if kind == "create" {
            created.insert(data["path"].as_str().unwrap_or("").to_string());
        }
    }
    assert!(
        created.contains("/workspace/chat/e") && created.contains("/workspace/chat/e/f"),
        "{created:?}"
    );

    // Not recursive: the subdirectory's own changes are not seen, only its entry.
    let first = events(&mut top, 1).await;
    assert_eq!(
        (first[0].0.as_str(), first[0].1["path"].as_str()),
        ("create", Some("/workspace/chat/d"))
    );
    let next = events(&mut top, 1).await;
    assert_eq!(next[0].1["path"], "/workspace/chat/top.txt", "{next:?}");

    // A directory moved into the tree is watched from then on; what it held comes as
    // scanned creates, what is made in it after as creates.
    run("mkdir elsewhere && touch elsewhere/f && mv elsewhere d/moved && touch d/moved/g").await;
    let mut created = std::collections::BTreeSet::new();
    while !created.contains("/workspace/chat/d/moved/g") {
        let (kind, data) = events(&mut all, 1).await.remove(0);
        if kind == "create" {
            created.insert(data["path"].as_str().unwrap_or("").to_string());
        }
    }
    assert!(created.contains("/workspace/chat/d/moved/f"), "{created:?}");

    // A directory swapped for a symlink to the host's `/` before its watch is added is
    // neither watched nor scanned: nothing of the host's file system ever shows.
    let chat_dir = app.settings.sandbox.chats_root.join(&chat);
    std::fs::create_dir(chat_dir.join("swap")).expect("mkdir");
    std::fs::remove_dir(chat_dir.join("swap")).expect("rmdir");
    std::os::unix::fs::symlink("/", chat_dir.join("swap")).expect("symlink");
    let outside =
        std::env::temp_dir().join(format!("sandboxd-watch-escape-{}", uuid::Uuid::new_v4()));
    std::fs::write(&outside, b"x").expect("host file");
    run("touch after-swap").await;
    loop {
        let (kind, data) = events(&mut all, 1).await.remove(0);
        let path = data["path"].as_str().unwrap_or("").to_string();
        assert!(
            !path.starts_with("/workspace/chat/swap/"),
            "{kind} {path}: the watch escaped"
        );
        if path == "/workspace/chat/after-swap" {
            break;
        }
    }
    let _ = std::fs::remove_file(&outside);

    // Hostile paths: `..`, off the mounts, a symlink that leads to the host's `/`, nothing.
    std::os::unix::fs::symlink("/", app.volume(&chat).join("escape")).expect("symlink");
    for (query, status) in [
        ("path=../..", StatusCode::UNPROCESSABLE_ENTITY),
        ("path=/etc", StatusCode::UNPROCESSABLE_ENTITY),
        ("path=/workspace/volume/escape", StatusCode::FORBIDDEN),
        ("path=/workspace/volume/escape/etc", StatusCode::FORBIDDEN),
        ("path=no-such-dir", StatusCode::NOT_FOUND),
        ("recursive=perhaps", StatusCode::UNPROCESSABLE_ENTITY),
    ] {
        let (got, body) = app.get(&watch_path(&chat, query)).await;
        assert_eq!(got, status, "{query}: {body}");
    }
    let (got, body) = app.get(&watch_path(&new_chat(), "")).await;
    assert_eq!(got, StatusCode::NOT_FOUND, "{body}");
}
