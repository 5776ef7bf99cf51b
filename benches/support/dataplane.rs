//! Data-plane figures (part of the e2e bench): exec round trip against a raw Engine API exec
//! on the same sandbox (interleaved), 1 MB file write and read against the raw archive API,
//! 100 concurrent execs across 10 sandboxes, and 100 watch clients during a burst of 50
//! creates. Bounded loops; everything started is removed.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bollard::query_parameters::{
    DownloadFromContainerOptionsBuilder, UploadToContainerOptionsBuilder,
};
use bollard::Docker;
use futures::StreamExt;
use serde_json::{json, Value};

use super::{create, in_process, ms, percentile, verdict, volume, Report};
use crate::support::{new_chat, TestApp};

/// The raw baseline: create + start (attached, output drained) + inspect for the exit code.
async fn raw_exec(docker: &Docker, container: &str) -> Duration {
    let started = Instant::now();
    let exec = docker
        .create_exec(
            container,
            CreateExecOptions::<String> {
                cmd: Some(vec!["echo".into(), "hi".into()]),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                ..Default::default()
            },
        )
        .await
        .expect("raw create_exec");
    if let StartExecResults::Attached { mut output, .. } = docker
        .start_exec(&exec.id, None::<StartExecOptions>)
        .await
        .expect("raw start_exec")
    {
        while output.next().await.is_some() {}
    }
    let code = docker
        .inspect_exec(&exec.id)
        .await
        .expect("raw inspect")
        .exit_code;
    assert_eq!(code, Some(0));
    started.elapsed()
}

async fn sandboxd_exec(client: &reqwest::Client, url: &str, body: &Value) -> (u16, Duration) {
    let started = Instant::now();
    let r = client
        .post(url)
        .json(body)
        .send()
        .await
        .expect("exec request");
    let status = r.status().as_u16();
    let _ = r.bytes().await;
    (status, started.elapsed())
}

/// A running sandbox of `app`: its chat id and container id.
pub(super) async fn running(client: &reqwest::Client, app: &TestApp) -> (String, String) {
    let chat = new_chat();
    let vol = volume(app);
    let r = client
        .post(format!("http://{}/api/v1/create", app.addr))
        .json(&json!({"chat_id": chat, "agent_id": "bench", "volume_host_path": vol}))
        .send()
        .await
        .expect("create");
    let body: Value = r.json().await.expect("create body");
    let container = body["container_id"]
        .as_str()
        .expect("container")
        .to_string();
    (chat, container)
}

pub async fn scenario_exec(docker: &Docker, out: &mut Report) {
    const ROUNDS: usize = 60;
    let app = in_process("exec", |_| {}).await;
    let client = reqwest::Client::new();
    let (chat, container) = running(&client, &app).await;
    let url = format!("http://{}/api/v1/sandboxes/{chat}/exec", app.addr);
    let body = json!({"command": ["echo", "hi"]});
    // Warm both paths.
    raw_exec(docker, &container).await;
    sandboxd_exec(&client, &url, &body).await;
    let (mut raw, mut ours) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        raw.push(raw_exec(docker, &container).await);
        let (status, took) = sandboxd_exec(&client, &url, &body).await;
        assert_eq!(status, 200);
        ours.push(took);
    }
    raw.sort();
    ours.sort();
    let (r50, o50) = (percentile(&raw, 0.5), percentile(&ours, 0.5));
    let ratio = o50.as_secs_f64() / r50.as_secs_f64();
    out.line(format!(
        "7 exec round trip p50 (n={ROUNDS}, interleaved, same sandbox)  raw create+start+inspect {:6.1} ms  sandboxd POST exec {:6.1} ms  ratio {ratio:.3}  p95 {:.1}/{:.1} ms  target ≤1.10× [{}]",
        ms(r50), ms(o50), ms(percentile(&raw, 0.95)), ms(percentile(&ours, 0.95)), verdict(ratio <= 1.10)
    ));

    // 1 MB write and read: sandboxd's routes against the raw archive API on the same sandbox.
    const FILE_ROUNDS: usize = 15;
    let data: Vec<u8> = (0..1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let files = format!("http://{}/api/v1/sandboxes/{chat}/files", app.addr);
    let (mut w_raw, mut w_ours, mut r_raw, mut r_ours) = (vec![], vec![], vec![], vec![]);
    for i in 0..FILE_ROUNDS {
        let started = Instant::now();
        let mut tar = tokio_tar::Builder::new(Vec::new());
        let mut h = tokio_tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        tar.append_data(&mut h, format!("raw{i}.bin"), data.as_slice())
            .await
            .expect("tar");
        let tar = tar.into_inner().await.expect("tar");
        docker
            .upload_to_container(
                &container,
                Some(
                    UploadToContainerOptionsBuilder::new()
                        .path("/workspace/chat")
                        .build(),
                ),
                bollard::body_full(tar.into()),
            )
            .await
            .expect("raw upload");
        w_raw.push(started.elapsed());

        let started = Instant::now();
        let r = client
            .put(format!("{files}?path=ours{i}.bin"))
            .body(data.clone())
            .send()
            .await
            .expect("write");
        assert_eq!(r.status().as_u16(), 200);
        let _ = r.bytes().await;
        w_ours.push(started.elapsed());

        let started = Instant::now();
        let mut n = 0usize;
        let mut s = docker.download_from_container(
            &container,
            Some(
                DownloadFromContainerOptionsBuilder::new()
                    .path(&format!("/workspace/chat/raw{i}.bin"))
                    .build(),
            ),
        );
        while let Some(chunk) = s.next().await {
            n += chunk.expect("raw download").len();
        }
        assert!(n > data.len());
        r_raw.push(started.elapsed());

        let started = Instant::now();
        let r = client
            .get(format!("{files}?path=ours{i}.bin"))
            .send()
            .await
            .expect("read");
        let back = r.bytes().await.expect("read body");
        assert_eq!(back.len(), data.len());
        r_ours.push(started.elapsed());
    }
    for v in [&mut w_raw, &mut w_ours, &mut r_raw, &mut r_ours] {
        v.sort();
    }
    out.line(format!(
        "8 1 MB file p50 (n={FILE_ROUNDS})  write: raw archive {:.1} ms, sandboxd {:.1} ms ({:.2}×)  read: raw archive {:.1} ms, sandboxd {:.1} ms ({:.2}×)  (measured, no target)",
        ms(percentile(&w_raw, 0.5)), ms(percentile(&w_ours, 0.5)),
        percentile(&w_ours, 0.5).as_secs_f64() / percentile(&w_raw, 0.5).as_secs_f64(),
        ms(percentile(&r_raw, 0.5)), ms(percentile(&r_ours, 0.5)),
        percentile(&r_ours, 0.5).as_secs_f64() / percentile(&r_raw, 0.5).as_secs_f64(),
    ));
}

pub async fn scenario_concurrent_execs(out: &mut Report) {
    const SANDBOXES: usize = 10;
    const EXECS: usize = 100;
    let app = in_process("execs", |s| {
        s.data_plane.max_concurrent = EXECS;
        s.data_plane.max_concurrent_per_sandbox = EXECS / SANDBOXES;
    })
    .await;
    let client = reqwest::Client::new();
    let mut chats = Vec::new();
    for _ in 0..SANDBOXES {
        chats.push(running(&client, &app).await.0);
    }
    let started = Instant::now();
    let results = futures::future::join_all((0..EXECS).map(|i| {
        let url = format!(
            "http://{}/api/v1/sandboxes/{}/exec",
            app.addr,
            chats[i % SANDBOXES]
        );
        let client = client.clone();
        async move {
            let r = client
                .post(url)
                .json(&json!({"command": "echo $((6*7))"}))
                .send()
                .await;
            match r {
                Ok(r) if r.status().as_u16() == 200 => {
                    let v: Value = r.json().await.unwrap_or(Value::Null);
                    v["exit_code"] == 0 && v["stdout"] == "42\n"
                }
                _ => false,
            }
        }
    }))
    .await;
    let took = started.elapsed();
    let ok = results.iter().filter(|r| **r).count();
    out.line(format!(
        "9 {EXECS} concurrent execs across {SANDBOXES} sandboxes  {ok}/{EXECS} correct in {:.0} ms → {:.0} execs/s  target: no error [{}]",
        ms(took),
        EXECS as f64 / took.as_secs_f64(),
        verdict(ok == EXECS)
    ));
}

pub async fn scenario_watch(out: &mut Report) {
    const CLIENTS: usize = 100;
    const BURST: usize = 50;
    let app = in_process("watch", |_| {}).await;
    let vol = volume(&app);
    let client = reqwest::Client::new();
    let store_path = app.settings.database.path.clone();
    let url = format!("http://{}/api/v1/sandboxes?watch=true", app.addr);
    // Every client connects first, then the burst; each collects ids until it has seen the
    // burst's last change or 60 s pass.
    let mut watchers = Vec::new();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(CLIENTS);
    let (done_tx, _) = tokio::sync::broadcast::channel::<i64>(1);
    for _ in 0..CLIENTS {
        let (client, url, ready, mut done) = (
            client.clone(),
            url.clone(),
            ready_tx.clone(),
            done_tx.subscribe(),
        );
        watchers.push(tokio::spawn(async move {
            let mut r = client.get(url).send().await.expect("watch");
            let _ = ready.send(()).await;
            let mut ids = Vec::new();
            let mut buf = String::new();
            let mut until: Option<i64> = None;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            loop {
                if let Some(last) = until {
                    if ids.last().is_some_and(|id| *id >= last) {
                        break;
                    }
                }
                tokio::select! {
                    chunk = r.chunk() => match chunk {
                        Ok(Some(c)) => {
                            buf.push_str(&String::from_utf8_lossy(&c));
                            while let Some(end) = buf.find("\n\n") {
                                let block: String = buf.drain(..end + 2).collect();
                                if let Some(id) = block.lines().find_map(|l| l.strip_prefix("id:")) {
                                    ids.push(id.trim().parse::<i64>().unwrap_or(-1));
                                }
                            }
                        }
                        _ => break,
                    },
                    last = done.recv(), if until.is_none() => until = last.ok(),
                    _ = tokio::time::sleep_until(deadline) => break,
                }
            }
            ids
        }));
    }
    for _ in 0..CLIENTS {
        ready_rx.recv().await;
    }
    let store = sandboxd::store::Store::open_read_only(&store_path)
        .await
        .expect("store");
    let from = store.last_event_id().await.expect("last id");
    let started = Instant::now();
    let creates = futures::future::join_all((0..BURST).map(|_| {
        let (client, vol, addr) = (client.clone(), vol.clone(), app.addr);
        async move { create(&client, addr, &new_chat(), &vol).await.0 }
    }))
    .await;
    let burst_took = started.elapsed();
    assert!(creates.iter().all(|s| *s == 200));
    let expected: Vec<i64> = store
        .events_after(from, 100_000)
        .await
        .expect("events")
        .into_iter()
        .filter(|e| !sandboxd::store::EventAction::is_audit(&e.action))
        .map(|e| e.id)
        .collect();
    let last = *expected.last().expect("events");
    let _ = done_tx.send(last);
    let mut complete = 0;
    for w in watchers {
        let ids = w.await.expect("watcher");
        let got: BTreeSet<i64> = ids.iter().copied().filter(|id| *id > from).collect();
        if got == expected.iter().copied().collect::<BTreeSet<_>>() && got.len() == ids.len() {
            complete += 1;
        }
    }
    let delivered = started.elapsed();
    out.line(format!(
        "10 watch: {CLIENTS} clients during a burst of {BURST} creates ({} changes; burst {:.0} ms, all delivered by {:.0} ms)  {complete}/{CLIENTS} clients got every change exactly once  target: all [{}]",
        expected.len(),
        ms(burst_took),
        ms(delivered),
        verdict(complete == CLIENTS)
    ));
}
