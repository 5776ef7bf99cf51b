//! Hibernation figures (`scripts/bench.sh hibernate`), interleaved round by round:
//! - pause and unpause through sandboxd (`POST …/pause|resume?wait`) next to the raw engine's
//!   `pause`/`unpause` of a container of the same body;
//! - hibernated → running: an old-contract create on a hibernated sandbox (transparent resume)
//!   next to a raw `start` + inspect of the same body's stopped container, and next to a cold
//!   create of a new sandbox;
//! - memory and CPU of N sandboxes running, paused and hibernated: cgroup (v1) memory and CPU
//!   of their containers (each agent a loop waking every 100 ms) plus the RSS of the engine's
//!   per-container shims.

use std::time::{Duration, Instant};

use bollard::query_parameters::{InspectContainerOptions, StopContainerOptionsBuilder};
use bollard::Docker;
use serde_json::json;

use super::support::{new_chat, TestApp};
use super::{create, in_process, ms, percentile, verdict, volume, MatchedRaw, Report};

const ROUNDS: usize = 20;
const FLEET: usize = 100;

async fn post(client: &reqwest::Client, app: &TestApp, path: &str) -> (u16, Duration) {
    let started = Instant::now();
    let r = client
        .post(app.url(path))
        .json(&json!({}))
        .send()
        .await
        .expect("request");
    let status = r.status().as_u16();
    let _ = r.bytes().await;
    (status, started.elapsed())
}

fn line(out: &mut Report, what: &str, raw: &mut [Duration], ours: &mut [Duration]) -> f64 {
    raw.sort();
    ours.sort();
    let (r50, o50) = (percentile(raw, 0.5), percentile(ours, 0.5));
    out.line(format!(
        "{what}  raw p50 {:7.1} ms  sandboxd p50 {:7.1} ms  p99 {:.1}/{:.1} ms  ratio {:.3}",
        ms(r50),
        ms(o50),
        ms(percentile(raw, 0.99)),
        ms(percentile(ours, 0.99)),
        o50.as_secs_f64() / r50.as_secs_f64()
    ));
    o50.as_secs_f64() / r50.as_secs_f64()
}

async fn raw_container(docker: &Docker, raw: &MatchedRaw, instance: &str) -> String {
    raw.start(docker, 0).await;
    docker
        .inspect_container(&format!("{instance}-m0"), None::<InspectContainerOptions>)
        .await
        .expect("raw container")
        .id
        .expect("id")
}

pub async fn scenario_hibernation(docker: &Docker, out: &mut Report) {
    // The test agent (busybox httpd as PID 1) ignores SIGTERM: each stop takes the grace.
    let app = in_process("hib", |s| s.sandbox.hibernate_stop_seconds = 1).await;
    let vol = volume(&app);
    let client = reqwest::Client::new();
    let raw_instance = format!("{}-raw", app.instance());
    let raw = MatchedRaw::new(&raw_instance).await;
    let raw_id = raw_container(docker, &raw, &raw_instance).await;

    // ---- pause / unpause ----
    let chat = new_chat();
    assert_eq!(create(&client, app.addr, &chat, &vol).await.0, 200);
    let (mut raw_pause, mut raw_unpause, mut our_pause, mut our_unpause) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let t = Instant::now();
        docker.pause_container(&raw_id).await.expect("raw pause");
        raw_pause.push(t.elapsed());
        let (status, took) = post(
            &client,
            &app,
            &format!("/api/v1/sandboxes/{chat}/pause?wait=30"),
        )
        .await;
        assert_eq!(status, 200);
        our_pause.push(took);
        let t = Instant::now();
        docker
            .unpause_container(&raw_id)
            .await
            .expect("raw unpause");
        raw_unpause.push(t.elapsed());
        let (status, took) = post(
            &client,
            &app,
            &format!("/api/v1/sandboxes/{chat}/resume?wait=30"),
        )
        .await;
        assert_eq!(status, 200);
        our_unpause.push(took);
    }
    line(
        out,
        &format!("12 pause (n={ROUNDS})           "),
        &mut raw_pause,
        &mut our_pause,
    );
    line(
        out,
        &format!("12 unpause/resume (n={ROUNDS})  "),
        &mut raw_unpause,
        &mut our_unpause,
    );

    // ---- hibernated → running, against a raw start and a cold create ----
    let (mut raw_start, mut ours, mut cold, mut stops) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let stop = StopContainerOptionsBuilder::new().t(1).build();
    docker
        .stop_container(&raw_id, Some(stop.clone()))
        .await
        .expect("raw stop");
    for _ in 0..ROUNDS {
        let t = Instant::now();
        docker
            .start_container(&raw_id, None)
            .await
            .expect("raw start");
        docker
            .inspect_container(&raw_id, None::<InspectContainerOptions>)
            .await
            .expect("raw inspect");
        raw_start.push(t.elapsed());
        let (status, took) = post(
            &client,
            &app,
            &format!("/api/v1/sandboxes/{chat}/hibernate?wait=60"),
        )
        .await;
        assert_eq!(status, 200);
        stops.push(took);
        let (status, took) = create(&client, app.addr, &chat, &vol).await;
        assert_eq!(status, 200, "resume by create");
        ours.push(took);
        let (status, took) = create(&client, app.addr, &new_chat(), &vol).await;
        assert_eq!(status, 200, "cold create");
        cold.push(took);
        docker
            .stop_container(&raw_id, Some(stop.clone()))
            .await
            .expect("raw stop");
    }
    stops.sort();
    out.line(format!(
        "12 hibernate through sandboxd (stop; the agent ignores SIGTERM, grace 1 s) p50 {:.1} ms p99 {:.1} ms",
        ms(percentile(&stops, 0.5)),
        ms(percentile(&stops, 0.99))
    ));
    let ratio = line(
        out,
        &format!("12 hibernated→running by create (n={ROUNDS}) vs raw start+inspect"),
        &mut raw_start,
        &mut ours,
    );
    out.line(format!(
        "12 resume ≤1.05× raw start [{}]",
        verdict(ratio <= 1.05)
    ));
    cold.sort();
    let vs_cold = percentile(&ours, 0.5).as_secs_f64() / percentile(&cold, 0.5).as_secs_f64();
    out.line(format!(
        "12 resume p50 {:.1} ms vs cold create p50 {:.1} ms (p99 {:.1}): {vs_cold:.3}×  target ≤0.5× [{}]",
        ms(percentile(&ours, 0.5)),
        ms(percentile(&cold, 0.5)),
        ms(percentile(&cold, 0.99)),
        verdict(vs_cold <= 0.5)
    ));
    drop(app);
    super::remove_instance(&raw_instance);

    fleet(docker, out).await;
}

/// Memory (cgroup `memory.usage_in_bytes`, plus shim RSS) and CPU (cgroup `cpuacct.usage`
/// over a window) of a fleet of sandboxes in each state.
async fn fleet(docker: &Docker, out: &mut Report) {
    let app = in_process("hibfleet", |s| s.sandbox.hibernate_stop_seconds = 1).await;
    let vol = volume(&app);
    let client = reqwest::Client::new();
    let chats: Vec<String> = (0..FLEET).map(|_| new_chat()).collect();
    for batch in chats.chunks(8) {
        let calls = batch.iter().map(|c| create(&client, app.addr, c, &vol));
        for (status, _) in futures::future::join_all(calls).await {
            assert_eq!(status, 200);
        }
    }
    let ids: Vec<String> = {
        let mut ids = Vec::new();
        for chat in &chats {
            let (_, v) = app.get(&format!("/api/v1/sandboxes/{chat}")).await;
            ids.push(v["container_id"].as_str().expect("id").to_string());
        }
        ids
    };
    // Each agent polls, as agents do: a loop waking every 100 ms (so running costs some CPU).
    for chat in &chats {
        let r = client
            .post(app.url(&format!("/api/v1/sandboxes/{chat}/exec")))
            .json(&json!({"command": "sh -c 'while true; do sleep 0.1; done' >/dev/null 2>&1 </dev/null &"}))
            .send()
            .await
            .expect("exec");
        assert_eq!(r.status().as_u16(), 200);
    }
    let measure = |state: &'static str, ids: Vec<String>| async move {
        let shims_before = shims(&ids);
        let cpu0 = cpu_ns(&ids);
        tokio::time::sleep(Duration::from_secs(5)).await; // the CPU window
        let cpu = (cpu_ns(&ids) - cpu0) as f64 / 5e9;
        let mem = memory_bytes(&ids) as f64 / (1024.0 * 1024.0);
        let (n, rss) = shims_before;
        format!(
            "13 {FLEET} sandboxes {state:10}  containers' memory {mem:7.1} MiB  shims {n:3} × RSS {rss:6.1} MiB total  CPU {:.3} cores",
            cpu
        )
    };
    out.line(measure("running", ids.clone()).await);
    for state in ["pause", "hibernate"] {
        for batch in chats.chunks(8) {
            let paths: Vec<String> = batch
                .iter()
                .map(|c| format!("/api/v1/sandboxes/{c}/{state}?wait=60"))
                .collect();
            let calls = paths.iter().map(|p| post(&client, &app, p));
            for (status, _) in futures::future::join_all(calls).await {
                assert_eq!(status, 200);
            }
        }
        let label = if state == "pause" {
            "paused"
        } else {
            "hibernated"
        };
        out.line(measure(label, ids.clone()).await);
    }
    let _ = docker;
    drop(app);
}

fn cgroup_file(controller: &str, id: &str, file: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/sys/fs/cgroup/{controller}/docker/{id}/{file}"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// A stopped container has no cgroup: it counts as 0.
fn memory_bytes(ids: &[String]) -> u64 {
    ids.iter()
        .filter_map(|id| cgroup_file("memory", id, "memory.usage_in_bytes"))
        .sum()
}

fn cpu_ns(ids: &[String]) -> u64 {
    ids.iter()
        .filter_map(|id| cgroup_file("cpuacct", id, "cpuacct.usage"))
        .sum()
}

/// The engine's shims of these containers (`containerd-shim-runc-v2 … -id <container>`): how
/// many, and their RSS in MiB.
fn shims(ids: &[String]) -> (usize, f64) {
    let wanted: std::collections::HashSet<&str> = ids.iter().map(String::as_str).collect();
    let mut n = 0;
    let mut kib = 0.0;
    for p in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_shim = args
            .first()
            .is_some_and(|a| String::from_utf8_lossy(a).contains("containerd-shim"));
        let ours = args
            .windows(2)
            .any(|w| w[0] == b"-id" && wanted.contains(String::from_utf8_lossy(w[1]).as_ref()));
        if !(is_shim && ours) {
            continue;
        }
        n += 1;
        kib += std::fs::read_to_string(p.path().join("status"))
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .unwrap_or(0.0);
    }
    (n, kib / 1024.0)
}
