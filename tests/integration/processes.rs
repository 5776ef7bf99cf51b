//! Background processes against the real engine: output that a client re-attaches to by
//! offset with no gap and no repeat (NDJSON, then SSE with `Last-Event-ID`), stdin, signals
//! and kills that reach the whole tree (a child that ignores SIGTERM included), the limits,
//! and a process listed again, still killable, after sandboxd is SIGKILLed and restarted.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::dataplane::{count_processes, running_chat};
use crate::support::*;
use crate::watch::SseReader;

/// Reads NDJSON items off a response body.
struct Lines {
    response: reqwest::Response,
    buf: Vec<u8>,
}

impl Lines {
    async fn open(app: &TestApp, path: &str) -> Self {
        let response = app.client.get(app.url(path)).send().await.expect("request");
        assert_eq!(response.status(), StatusCode::OK);
        Self {
            response,
            buf: Vec::new(),
        }
    }

    /// The next item, `None` at the end of the stream.
    async fn next(&mut self) -> Option<Value> {
        loop {
            if let Some(nl) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=nl).collect();
                return Some(serde_json::from_slice(&line).expect("JSON line"));
            }
            let chunk = tokio::time::timeout(Duration::from_secs(30), self.response.chunk())
                .await
                .expect("an item in time")
                .expect("stream read")?;
            self.buf.extend_from_slice(&chunk);
        }
    }
}

fn processes(chat: &str) -> String {
    format!("/api/v1/sandboxes/{chat}/processes")
}

async fn start(app: &TestApp, chat: &str, body: Value) -> Value {
    let (status, p) = app.post_json(&processes(chat), &body).await;
    assert_eq!(status, StatusCode::CREATED, "{p}");
    assert_eq!(p["state"], "running", "{p}");
    assert!(p["pid"].as_u64().is_some_and(|pid| pid > 1), "{p}");
    p
}

/// Everything an `output` stream sends until its `end` item: the text, and the end.
async fn read_to_end(lines: &mut Lines) -> (String, Value) {
    let mut text = String::new();
    while let Some(item) = lines.next().await {
        match item["type"].as_str() {
            Some("output") => text.push_str(item["data"].as_str().expect("text")),
            Some("end") => return (text, item),
            _ => panic!("unexpected item {item}"),
        }
    }
    panic!("the stream ended without an end item; so far: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_background_process_outlives_its_reader_and_is_reattached_by_offset() {
    let app = TestApp::spawn().await;
    let chat = running_chat(&app).await;
    // Forty lines, slowly enough that the first reader leaves in the middle.
    let p = start(
        &app,
        &chat,
        json!({"command": "i=0; while [ $i -lt 40 ]; do echo line$i; [ $i = 20 ] && echo half >&2; i=$((i+1)); sleep 0.05; done"}),
    )
    .await;
    let id = p["process_id"].as_str().expect("id").to_string();
    let output = format!("{}/{id}/output", processes(&chat));

    // A first reader follows until it has seen a few lines, then drops its connection.
    let mut first = Lines::open(&app, &format!("{output}?follow=true")).await;
    let (mut seen, mut offset) = (String::new(), 0u64);
    while !seen.contains("line3\n") {
        let item = first.next().await.expect("an item");
        assert_eq!(item["type"], "output", "{item}");
        assert_eq!(item["offset"].as_u64(), Some(offset), "no gap: {item}");
        let data = item["data"].as_str().expect("text");
        offset += data.len() as u64;
        seen.push_str(data);
    }
    drop(first);

    // The process runs on without a reader. A second one comes back over SSE from the last
    // offset seen (`Last-Event-ID`) and reads to the end.
    let mut sse =
        SseReader::open(&app, &format!("{output}?follow=true"), Some(offset as i64)).await;
    let end = loop {
        let ev = sse.next(Duration::from_secs(30)).await.expect("an event");
        match ev.event.as_str() {
            "output" => {
                assert_eq!(
                    ev.data["offset"].as_u64(),
                    Some(offset),
                    "no gap, no repeat"
                );
                let data = ev.data["data"].as_str().expect("text");
                offset += data.len() as u64;
                assert_eq!(
                    ev.id,
                    Some(offset as i64),
                    "the id is where a reader goes on"
                );
                if ev.data["stream"] == "stdout" {
                    seen.push_str(data);
                } else {
                    assert_eq!(data, "half\n");
                }
            }
            "end" => break ev.data,
            other => panic!("unexpected {other}: {}", ev.data),
        }
    };
    let expected: String = (0..40).map(|i| format!("line{i}\n")).collect();
    assert_eq!(seen, expected, "every line exactly once, in order");
    assert_eq!(end["process"]["state"], "exited", "{end}");
    assert_eq!(end["process"]["exit_code"], 0);
    assert_eq!(end["offset"].as_u64(), Some(offset));
    assert_eq!(end["process"]["output_bytes"].as_u64(), Some(offset));

    // A plain read from 0 (no follow) has it all; one past the end reads nothing.
    let mut all = Lines::open(&app, &output).await;
    let (text, end) = read_to_end(&mut all).await;
    assert_eq!(text.len() as u64, offset);
    assert_eq!(end["offset"].as_u64(), Some(offset));
    let mut none = Lines::open(&app, &format!("{output}?since=999999999")).await;
    let (text, _) = read_to_end(&mut none).await;
    assert!(text.is_empty());

    // Listed, with how it ended; audited without contents.
    let (status, list) = app.get(&processes(&chat)).await;
    assert_eq!(status, StatusCode::OK);
    let listed = &list["processes"][0];
    assert_eq!(listed["process_id"], id.as_str());
    assert_eq!(listed["state"], "exited");
    assert_eq!(listed["command"][0], "sh");
    let audited = app
        .db_scalar("SELECT count(*) FROM sandbox_events WHERE action IN ('process_start', 'process_end') AND detail NOT LIKE '%line1%'")
        .await;
    assert_eq!(audited, 2);

    // Stdin: written at the start, then through the API, then closed.
    let cat = start(&app, &chat, json!({"command": ["cat"], "stdin": "first\n"})).await;
    let cat_id = cat["process_id"].as_str().expect("id");
    let stdin = format!("{}/{cat_id}/stdin", processes(&chat));
    let (status, body) = app.post_json(&stdin, &json!({"data": "second\n"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["stdin_open"], true);
    let (status, body) = app
        .post_json(&stdin, &json!({"data_base64": "dGhpcmQK", "eof": true}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let mut out = Lines::open(
        &app,
        &format!("{}/{cat_id}/output?follow=true", processes(&chat)),
    )
    .await;
    let (text, end) = read_to_end(&mut out).await;
    assert_eq!(text, "first\nsecond\nthird\n");
    assert_eq!(end["process"]["state"], "exited");
    assert_eq!(end["process"]["exit_code"], 0);
    let (status, body) = app.post_json(&stdin, &json!({"data": "late"})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(detail_text(&body).contains("process_not_running"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_and_kills_reach_the_whole_tree_and_limits_hold() {
    let app = TestApp::spawn_with(|s| s.data_plane.max_processes_per_sandbox = 2).await;
    let chat = running_chat(&app).await;
    // A tree that ignores SIGTERM (the disposition is inherited across exec): a shell, a
    // child shell and three sleeps.
    let p = start(
        &app,
        &chat,
        json!({"command": "trap '' TERM; sh -c 'trap \"\" TERM; sleep 1000' & sleep 1001 & sleep 1002"}),
    )
    .await;
    let id = p["process_id"].as_str().expect("id").to_string();
    let one = format!("{}/{id}", processes(&chat));
    wait_until(Duration::from_secs(10), "the tree's three sleeps", || {
        let (app, chat) = (&app, &chat);
        async move { (count_processes(app, chat, "sleep100").await == 3).then_some(()) }
    })
    .await;

    // TERM reaches every process of the tree, and every one ignores it.
    let (status, sent) = app
        .post_json(&format!("{one}/signal"), &json!({"signal": "sigterm"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{sent}");
    assert_eq!(sent["signal"], "TERM");
    assert!(sent["delivered"].as_u64().is_some_and(|n| n >= 3), "{sent}");
    let (_, now) = app.get(&one).await;
    assert_eq!(now["state"], "running");
    assert_eq!(count_processes(&app, &chat, "sleep100").await, 3);

    // A second process fits, a third is over the per-sandbox limit.
    let second = start(&app, &chat, json!({"command": ["sleep", "1003"]})).await;
    let (status, body) = app
        .post_json(&processes(&chat), &json!({"command": ["true"]}))
        .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert!(
        detail_text(&body).contains("max_processes_per_sandbox"),
        "{body}"
    );

    // DELETE kills the whole tree, and frees its place.
    let r = app
        .client
        .delete(app.url(&one))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), StatusCode::OK);
    let killed: Value = r.json().await.expect("json");
    assert_eq!(killed["state"], "killed", "{killed}");
    assert_eq!(
        count_processes(&app, &chat, "sleep100").await,
        1,
        "only the second's sleep"
    );
    let third = start(&app, &chat, json!({"command": ["sleep", "1004"]})).await;
    for p in [&second, &third] {
        let path = format!(
            "{}/{}",
            processes(&chat),
            p["process_id"].as_str().expect("id")
        );
        let r = app
            .client
            .delete(app.url(&path))
            .send()
            .await
            .expect("delete");
        assert_eq!(r.status(), StatusCode::OK);
    }
    assert_eq!(count_processes(&app, &chat, "sleep100").await, 0);

    // A signal to an ended process is a conflict; a kill answers it as it is.
    let (status, body) = app
        .post_json(&format!("{one}/signal"), &json!({"signal": "INT"}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let r = app
        .client
        .delete(app.url(&one))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), StatusCode::OK);

    // Hostile input: signals that are not signals, ids that name nothing.
    for bad in [
        json!({"signal": "TERM; reboot"}),
        json!({"signal": 0}),
        json!({"signal": "99"}),
        json!({}),
    ] {
        let (status, body) = app.post_json(&format!("{one}/signal"), &bad).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {body}");
    }
    for path in [
        format!("{}/not-a-uuid", processes(&chat)),
        format!("{}/{}", processes(&chat), uuid::Uuid::new_v4()),
        format!("{}/{id}", processes(&new_chat())),
    ] {
        let (status, body) = app.get(&path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
    }
    let (status, body) = app.get(&format!("{one}/output?since=-1")).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (status, body) = app
        .post_json(
            &processes(&chat),
            &json!({"command": "true", "workdir": "../.."}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let signals = app
        .db_scalar("SELECT count(*) FROM sandbox_events WHERE action = 'process_signal'")
        .await;
    assert_eq!(signals, 4, "TERM and three kills");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_is_listed_and_killable_after_sandboxd_is_sigkilled() {
    let fx = ProcessFixture::new(|_| {});
    let mut server = fx.start().await;
    let base = format!("http://{}", server.addr);
    let client = reqwest::Client::new();
    let chat = new_chat();
    let vol = std::fs::canonicalize(&fx.vol).expect("vol");
    let (status, body) = crate::restart::post(
        server.addr,
        "/api/v1/create",
        &json!({"chat_id": chat, "agent_id": "a", "volume_host_path": vol}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let mut ids = Vec::new();
    // One that runs on, one that ends while sandboxd is down (it waits for a file).
    for cmd in [
        "sleep 1005",
        "while [ ! -e /tmp/go ]; do sleep 0.05; done; exit 7",
    ] {
        let (status, p) =
            crate::restart::post(server.addr, &processes(&chat), &json!({"command": cmd})).await;
        assert_eq!(status, StatusCode::CREATED, "{p}");
        ids.push(p["process_id"].as_str().expect("id").to_string());
    }
    server.kill9();
    let container = body["container_id"].as_str().expect("container");
    let go = std::process::Command::new(engine().cli())
        .args(["exec", container, "touch", "/tmp/go"])
        .status()
        .expect("engine CLI");
    assert!(go.success());

    let server = fx.start().await;
    let list_url = format!("{base}{}", processes(&chat));
    // The one that ended is found ended, with its exit code, by the engine's record.
    let list = wait_until(
        Duration::from_secs(20),
        "the ended process's exit code",
        || {
            let (client, url) = (&client, &list_url);
            async move {
                let list = try_get_json(client, url).await?;
                (list["processes"][1]["state"] == "exited").then_some(list)
            }
        },
    )
    .await;
    let (running, ended) = (&list["processes"][0], &list["processes"][1]);
    assert_eq!(running["process_id"], ids[0].as_str());
    assert_eq!(running["state"], "running", "{running}");
    assert_eq!(running["output_kept"], false);
    assert_eq!(ended["exit_code"], 7, "{ended}");
    // Its output went with the old process; the stream says so and ends.
    let out = get_text(
        &client,
        &format!("{list_url}/{}/output?follow=true", ids[0]),
    )
    .await;
    let end: Value = serde_json::from_str(out.trim()).expect("one end line");
    assert_eq!(end["type"], "end");
    assert_eq!(end["process"]["output_kept"], false);
    // Still killable: the marker finds its tree.
    let r = client
        .delete(format!("{list_url}/{}", ids[0]))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), StatusCode::OK);
    let killed: Value = r.json().await.expect("json");
    assert_eq!(killed["state"], "killed");
    let (status, out) = crate::restart::post(
        server.addr,
        &format!("/api/v1/sandboxes/{chat}/exec"),
        &json!({"command": "for d in /proc/[0-9]*; do case \"$(cat $d/cmdline 2>/dev/null)\" in sleep1005*) exit 1;; esac; done"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{out}");
    assert_eq!(out["exit_code"], 0, "no sleep 1005 left");
}
