//! One host, many sandboxes (`scripts/bench.sh scale`, on request only; issue 24): start
//! `SCALE_SANDBOXES` (default 1,000) sandboxes of the test image through the built binary,
//! then record the ramp's starts/s, host memory per sandbox (the containers' cgroups and the
//! shims' RSS), the API mix with every row in the table, a resync pass's time and the idle CPU,
//! a SIGKILL and restart (serving, ready, restarted), and the time to delete them all.
//! Bounded by count; everything started is removed (the fixture's guard) at the end.

use std::time::{Duration, Instant};

use bollard::Docker;
use futures::StreamExt;

use super::{
    binary, cpu_seconds, create, ms, rss_mib, run_wrk, started_times, verdict, wait_http,
    wrk_script, Report,
};
use crate::support::{containers_of, new_chat, ServerProcess};

/// Requests at once while ramping up and while deleting.
const CONCURRENCY: usize = 16;

/// A series' value on a `/metrics` page (0 when absent).
fn metric(page: &str, series: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// Memory the engine charges to the containers (cgroup v1 or v2), and the shims' RSS.
fn host_memory_mib(ids: &[String]) -> (f64, f64) {
    let mut containers = 0u64;
    for id in ids {
        for path in [
            format!("/sys/fs/cgroup/memory/docker/{id}/memory.usage_in_bytes"),
            format!("/sys/fs/cgroup/system.slice/docker-{id}.scope/memory.current"),
        ] {
            if let Some(v) = std::fs::read_to_string(&path)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
            {
                containers += v;
                break;
            }
        }
    }
    let out = std::process::Command::new("ps")
        .args(["-C", "containerd-shim-runc-v2", "-o", "rss="])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let shims_kib: u64 = out
        .lines()
        .filter_map(|l| l.trim().parse::<u64>().ok())
        .sum();
    (containers as f64 / 1048576.0, shims_kib as f64 / 1024.0)
}

/// How often a process's threads were preempted so far (involuntary context switches).
fn preempted(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .filter_map(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("nonvoluntary_ctxt_switches:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .sum()
}

/// The host's busy and total CPU ticks so far (`/proc/stat`).
fn host_ticks() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let at = |i: usize| f.get(i).copied().unwrap_or(0.0);
    // user nice system idle iowait irq softirq steal
    let busy = at(0) + at(1) + at(2) + at(5) + at(6) + at(7);
    (busy, busy + at(3) + at(4))
}

/// The engine's daemon (`dockerd`), for its CPU time.
fn engine_pid() -> Option<u32> {
    let out = std::process::Command::new("pidof")
        .arg("dockerd")
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

pub async fn scenario_scale(docker: &Docker, out: &mut Report) {
    let n: usize = std::env::var("SCALE_SANDBOXES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let fx = binary("scale", |s| {
        s.sandbox.hardening.memory_mb = 64;
        s.sandbox.ttl_seconds = 7200;
        s.logging.level = "WARNING".into();
    });
    let (instance, vol) = (fx.settings.controller.instance.clone(), fx.vol.clone());
    let client = reqwest::Client::new();
    let mut server = fx.start().await;
    let addr = server.addr;
    let base = format!("http://{addr}");

    // 1. The ramp, and whose CPU it takes (sandboxd's, the engine's).
    let pid = server.child.id();
    let dockerd = engine_pid();
    let (sd0, en0) = (cpu_seconds(pid), dockerd.map_or(0.0, cpu_seconds));
    let chats: Vec<String> = (0..n).map(|_| new_chat()).collect();
    let started = Instant::now();
    let marks = std::sync::Mutex::new(Vec::new());
    let done = std::sync::atomic::AtomicUsize::new(0);
    let failed = std::sync::atomic::AtomicUsize::new(0);
    futures::stream::iter(chats.iter())
        .for_each_concurrent(CONCURRENCY, |chat| {
            let (client, vol, started) = (client.clone(), vol.clone(), started);
            let (marks, done, failed) = (&marks, &done, &failed);
            async move {
                let (status, _) = create(&client, addr, chat, &vol).await;
                if status != 200 {
                    failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return;
                }
                let k = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                if k % 100 == 0 {
                    if let Ok(mut m) = marks.lock() {
                        m.push((k, started.elapsed()));
                    }
                }
            }
        })
        .await;
    let ramp = started.elapsed();
    let running = done.load(std::sync::atomic::Ordering::Relaxed);
    let failures = failed.load(std::sync::atomic::Ordering::Relaxed);
    let marks = marks.into_inner().unwrap_or_default();
    let per_100: Vec<String> = marks
        .windows(2)
        .map(|w| format!("{:.1}", 100.0 / (w[1].1 - w[0].1).as_secs_f64()))
        .collect();
    let (sd1, en1) = (cpu_seconds(pid), dockerd.map_or(0.0, cpu_seconds));
    out.line(format!(
        "12 scale ramp: {running}/{n} running in {:.1} s ({:.1} starts/s overall; per 100: {}), {failures} failed; CPU over the ramp: sandboxd {:.1} s ({:.0}% of a core), dockerd {:.1} s  target {n} running [{}]",
        ramp.as_secs_f64(),
        running as f64 / ramp.as_secs_f64(),
        per_100.join(" "),
        sd1 - sd0,
        (sd1 - sd0) / ramp.as_secs_f64() * 100.0,
        en1 - en0,
        verdict(running == n)
    ));

    // Where they went: past `sandbox.network_capacity` (1,000) on further networks.
    let listed = containers_of(docker, &instance).await;
    let mut per_network = std::collections::BTreeMap::<String, usize>::new();
    for c in &listed {
        let mode = c.host_config.as_ref().and_then(|h| h.network_mode.clone());
        *per_network.entry(mode.unwrap_or_default()).or_default() += 1;
    }
    let shards: Vec<String> = per_network
        .keys()
        .filter(|k| k.as_str() != fx.settings.sandbox.network_name)
        .cloned()
        .collect();
    out.line(format!(
        "12b networks with {} containers: {} (capacity {} per network; a bridge refuses its 1,024th)  target every sandbox running past 1,023 [{}]",
        listed.len(),
        per_network
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", "),
        fx.settings.sandbox.network_capacity,
        verdict(running == n && (n <= 1023 || !shards.is_empty()))
    ));

    // 2. Memory per sandbox.
    let ids: Vec<String> = listed.into_iter().filter_map(|c| c.id).collect();
    let (cg, shims) = host_memory_mib(&ids);
    let k = ids.len().max(1) as f64;
    out.line(format!(
        "13 host memory with {} sandboxes: containers (cgroups) {:.0} MiB = {:.2} MiB each; shims {:.0} MiB = {:.2} MiB each; total {:.2} MiB per sandbox (measured, no target)",
        ids.len(), cg, cg / k, shims, shims / k, (cg + shims) / k
    ));

    // 3. The API mix with every row in the table.
    let dir = fx.dir.path();
    let chats_file = dir.join("chats.txt");
    std::fs::write(&chats_file, chats.join("\n")).expect("chats");
    let script = dir.join("mix.lua");
    std::fs::write(&script, wrk_script(&chats_file, &vol, "mix")).expect("script");
    run_wrk(&script, &base, 32, 2);
    let (c0, s0) = (cpu_seconds(pid), preempted(pid));
    let r = run_wrk(&script, &base, 32, 10);
    let mix_cpu = (cpu_seconds(pid) - c0) / 10.0 * 100.0;
    let switches = preempted(pid) - s0;
    out.line(format!(
        "14 API mix (⅓ reuse, ⅓ GET, ⅓ list) with {n} rows @32 for 10 s: {:.0} req/s  p50 {:.2} ms  p99 {:.2} ms  failed {}; sandboxd {mix_cpu:.0}% of a core (wrk has the rest), its threads preempted {switches} times  target p99 ≤10 ms [{}]",
        r.rps, r.p50_ms, r.p99_ms, r.failed, verdict(r.failed == 0 && r.p99_ms <= 10.0)
    ));

    // 4. At rest: a pass's mean time over a minute, and sandboxd's CPU.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let metrics_url = format!("{base}/metrics");
    let read = |client: &reqwest::Client| {
        let (client, url) = (client.clone(), metrics_url.clone());
        async move {
            match client.get(url).send().await {
                Ok(r) => r.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            }
        }
    };
    let m0 = read(&client).await;
    let c0 = cpu_seconds(pid);
    let h0 = host_ticks();
    let window = Duration::from_secs(60);
    tokio::time::sleep(window).await;
    let m1 = read(&client).await;
    let c1 = cpu_seconds(pid);
    let h1 = host_ticks();
    let host_busy = (h1.0 - h0.0) / (h1.1 - h0.1).max(1.0) * 100.0;
    let sum = "sandboxd_reconcile_pass_duration_seconds_sum";
    let count = "sandboxd_reconcile_pass_duration_seconds_count";
    let passes = metric(&m1, count) - metric(&m0, count);
    let pass_ms = if passes > 0.0 {
        (metric(&m1, sum) - metric(&m0, sum)) / passes * 1000.0
    } else {
        f64::NAN
    };
    out.line(format!(
        "15 at rest with {n} for 60 s: {passes:.0} passes, mean {pass_ms:.1} ms each; sandboxd {:.2}% of a core, RSS {:.1} MiB; the host {host_busy:.0}% busy (all cores) (measured, no target)",
        (c1 - c0) / window.as_secs_f64() * 100.0,
        rss_mib(pid)
    ));

    // 5. SIGKILL and restart.
    let before = started_times(docker, &instance).await;
    server.kill9();
    let t0 = Instant::now();
    server = ServerProcess::spawn(&fx.config, fx.port, &[]);
    let serving = wait_http(
        &client,
        &format!("{base}/api/v1/health"),
        Duration::from_secs(30),
    )
    .await;
    let ready = wait_http(
        &client,
        &format!("{base}/api/v1/ready"),
        Duration::from_secs(120),
    )
    .await;
    let ready_after = t0.elapsed();
    let after = started_times(docker, &instance).await;
    let restarted = after
        .iter()
        .filter(|(id, st)| before.get(*id) != Some(st))
        .count();
    out.line(format!(
        "16 SIGKILL and restart with {n}: serving after {:.0} ms, ready after {:.0} ms, {} containers, {restarted} restarted  target ready ≤2 s, 0 restarted [{}]",
        serving.map_or(f64::NAN, ms),
        ms(ready_after),
        after.len(),
        verdict(ready.is_some() && ready_after <= Duration::from_secs(2) && restarted == 0)
    ));

    // 6. Delete them all.
    let t = Instant::now();
    futures::stream::iter(chats.iter())
        .for_each_concurrent(CONCURRENCY, |chat| {
            let client = client.clone();
            let url = format!("{base}/api/v1/sandboxes/{chat}");
            async move {
                let _ = client.delete(url).send().await;
            }
        })
        .await;
    let deleted_in = t.elapsed();
    let left = containers_of(docker, &instance).await.len();
    // The further networks go once empty (after the next listing pass).
    let gone = Instant::now();
    let mut shards_left = shards.clone();
    while !shards_left.is_empty() && gone.elapsed() < Duration::from_secs(120) {
        let mut still = Vec::new();
        for name in &shards_left {
            if docker.inspect_network(name, None).await.is_ok() {
                still.push(name.clone());
            }
        }
        shards_left = still;
        if !shards_left.is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    out.line(format!(
        "17 delete all {n}: {:.1} s ({:.1}/s), {left} containers left; further networks {:?} removed {:.1} s later, left {:?} (measured, no target)",
        deleted_in.as_secs_f64(),
        n as f64 / deleted_in.as_secs_f64(),
        shards,
        gone.elapsed().as_secs_f64(),
        shards_left
    ));
    drop(server);
}
