//! Interactive data-plane figures (part of the e2e bench, scenario `interactive`): a
//! background process's start against a one-shot exec on the same sandbox (interleaved); a
//! keystroke's round trip through sandboxd's terminal WebSocket against a TTY exec attached
//! through the raw Engine API (`docker exec -it`'s path), same command, same sandbox; and how
//! long a file change takes to reach a file watch, written on the host side of the mount and
//! from inside the sandbox. Bounded loops; everything started is removed.

use std::time::{Duration, Instant};

use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bollard::Docker;
use futures::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;

use super::dataplane::running;
use super::{in_process, ms, percentile, verdict, Report};

const START_ROUNDS: usize = 40;
const KEYSTROKES: usize = 200;
const WATCH_ROUNDS: usize = 50;

fn row(v: &mut [Duration]) -> (f64, f64) {
    v.sort();
    (ms(percentile(v, 0.5)), ms(percentile(v, 0.99)))
}

pub async fn scenario_interactive(docker: &Docker, out: &mut Report) {
    let app = in_process("interactive", |s| {
        s.data_plane.processes_kept_ended = 4;
    })
    .await;
    let client = reqwest::Client::new();
    let (chat, container) = running(&client, &app).await;
    let base = format!("http://{}/api/v1/sandboxes/{chat}", app.addr);

    // 1. Start: a background process (201 once its pid is known) against a one-shot exec
    //    that runs to its end. Both run `true`.
    let (mut exec, mut start) = (Vec::new(), Vec::new());
    for _ in 0..START_ROUNDS {
        let t = Instant::now();
        let r = client
            .post(format!("{base}/exec"))
            .json(&json!({"command": ["true"]}))
            .send()
            .await
            .expect("exec");
        assert_eq!(r.status().as_u16(), 200);
        let _ = r.bytes().await;
        exec.push(t.elapsed());
        let t = Instant::now();
        let r = client
            .post(format!("{base}/processes"))
            .json(&json!({"command": ["true"]}))
            .send()
            .await
            .expect("start");
        assert_eq!(r.status().as_u16(), 201);
        let _ = r.bytes().await;
        start.push(t.elapsed());
    }
    let ((e50, e99), (s50, s99)) = (row(&mut exec), row(&mut start));
    out.line(format!(
        "9 background start p50/p99 (n={START_ROUNDS}, interleaved)  one-shot exec {e50:.1}/{e99:.1} ms  POST processes {s50:.1}/{s99:.1} ms  ratio {:.2} (measured, no target)",
        s50 / e50
    ));

    // 2. Keystroke round trip: `cat` on a TTY echoes each key (the line discipline). Raw:
    //    a TTY exec attached through the Engine API.
    let raw = raw_tty_round_trips(docker, &container).await;
    let ours = sandboxd_tty_round_trips(&app, &chat).await;
    let ((r50, r99), (o50, o99)) = (row(&mut raw.clone()), row(&mut ours.clone()));
    out.line(format!(
        "10 terminal keystroke round trip p50/p99 (n={KEYSTROKES})  raw TTY exec attach {r50:.2}/{r99:.2} ms  sandboxd WebSocket {o50:.2}/{o99:.2} ms  (measured, no target)"
    ));

    // 3. File watch: from the write to the event on the stream.
    let host_dir = app.settings.sandbox.chats_root.join(&chat);
    let mut host = Vec::new();
    let mut inside = Vec::new();
    let mut events = WatchReader::open(&client, &format!("{base}/files/watch")).await;
    for i in 0..WATCH_ROUNDS {
        let t = Instant::now();
        std::fs::write(host_dir.join(format!("h{i}")), b"x").expect("host write");
        events.until_created(&format!("/workspace/chat/h{i}")).await;
        host.push(t.elapsed());
    }
    // Inside: a process in the sandbox makes a file for each line on its stdin.
    let r = client
        .post(format!("{base}/processes"))
        .json(&json!({"command": "while read n; do : > /workspace/chat/s$n; done"}))
        .send()
        .await
        .expect("writer");
    let writer: serde_json::Value = r.json().await.expect("writer");
    let stdin = format!(
        "{base}/processes/{}/stdin",
        writer["process_id"].as_str().expect("id")
    );
    for i in 0..WATCH_ROUNDS {
        let t = Instant::now();
        let r = client
            .post(&stdin)
            .json(&json!({"data": format!("{i}\n")}))
            .send()
            .await
            .expect("stdin");
        assert_eq!(r.status().as_u16(), 200);
        events.until_created(&format!("/workspace/chat/s{i}")).await;
        inside.push(t.elapsed());
    }
    let ((h50, h99), (i50, i99)) = (row(&mut host), row(&mut inside));
    out.line(format!(
        "11 file watch event latency p50/p99 (n={WATCH_ROUNDS})  host-side write {h50:.2}/{h99:.2} ms  write in the sandbox (stdin POST included) {i50:.2}/{i99:.2} ms  target p99 ≤100 ms [{}]",
        verdict(h99 <= 100.0 && i99 <= 100.0)
    ));
}

/// `cat` in a TTY exec through the raw API: per keystroke, the time until its echo.
async fn raw_tty_round_trips(docker: &Docker, container: &str) -> Vec<Duration> {
    let exec = docker
        .create_exec(
            container,
            CreateExecOptions::<String> {
                cmd: Some(vec!["cat".into()]),
                attach_stdin: Some(true),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                tty: Some(true),
                ..Default::default()
            },
        )
        .await
        .expect("raw tty exec");
    let StartExecResults::Attached {
        mut output,
        mut input,
    } = docker
        .start_exec(
            &exec.id,
            Some(StartExecOptions {
                detach: false,
                tty: true,
                output_capacity: None,
            }),
        )
        .await
        .expect("raw tty start")
    else {
        panic!("detached");
    };
    let mut took = Vec::new();
    for _ in 0..KEYSTROKES {
        let t = Instant::now();
        input.write_all(b"x").await.expect("key");
        input.flush().await.expect("flush");
        loop {
            let chunk = output.next().await.expect("echo").expect("echo");
            if chunk.into_bytes().contains(&b'x') {
                break;
            }
        }
        took.push(t.elapsed());
    }
    let _ = input.write_all(&[4, 4]).await; // end of file: `cat` exits
    took
}

/// The same through sandboxd's terminal.
async fn sandboxd_tty_round_trips(app: &crate::support::TestApp, chat: &str) -> Vec<Duration> {
    let url = format!("ws://{}/api/v1/sandboxes/{chat}/pty?command=cat", app.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("pty");
    loop {
        if let Some(Ok(Message::Text(t))) = ws.next().await {
            if t.as_str().contains("\"ready\"") {
                break;
            }
        }
    }
    let mut took = Vec::new();
    for _ in 0..KEYSTROKES {
        let t = Instant::now();
        ws.send(Message::Binary(b"x".to_vec().into()))
            .await
            .expect("key");
        loop {
            match ws.next().await.expect("frame").expect("frame") {
                Message::Binary(b) if b.contains(&b'x') => break,
                _ => {}
            }
        }
        took.push(t.elapsed());
    }
    let _ = ws
        .send(Message::Text(json!({"type": "close"}).to_string().into()))
        .await;
    took
}

/// A file watch's SSE stream, read for `create` events.
struct WatchReader {
    response: reqwest::Response,
    buf: String,
}

impl WatchReader {
    async fn open(client: &reqwest::Client, url: &str) -> Self {
        let mut me = Self {
            response: client.get(url).send().await.expect("watch"),
            buf: String::new(),
        };
        me.until("event: ready").await;
        me
    }

    async fn until(&mut self, wanted: &str) {
        while !self.buf.contains(wanted) {
            let chunk = tokio::time::timeout(Duration::from_secs(10), self.response.chunk())
                .await
                .expect("an event in time")
                .expect("stream")
                .expect("open");
            self.buf.push_str(&String::from_utf8_lossy(&chunk));
        }
        let at = self.buf.find(wanted).unwrap_or(0) + wanted.len();
        self.buf.drain(..at);
    }

    async fn until_created(&mut self, path: &str) {
        self.until(&format!("\"type\":\"create\",\"path\":\"{path}\""))
            .await;
    }
}
