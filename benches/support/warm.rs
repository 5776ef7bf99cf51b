//! Warm-start figures (`scripts/bench.sh warm`): cold vs warm create p50/p99 against the raw
//! Engine API's create + start of the same container, interleaved; bursts of 50 with pools of
//! 50 and 10; the refill rate; the idle cost of 20 members.

use std::time::{Duration, Instant};

use bollard::Docker;

use super::profiles::create_profile;
use super::{create, in_process, ms, percentile, verdict, volume, MatchedRaw, Report};
use crate::support::{containers_of, new_chat, wait_until_every, TestApp};
use crate::warm_support::{idle, warm, MountGuard};

/// A pool of `min_idle` (the tests' `warm`), and two profiles alike but for their names:
/// `standard` (the pool's class) and `cold` (never in the pool, so its creates start cold on
/// the same engine). The mounts go after the app (`stop`).
async fn app_with_pool(tag: &str, min_idle: usize) -> (TestApp, MountGuard) {
    let app = in_process(tag, |s| {
        warm(s, min_idle, min_idle.max(1));
        s.controller.max_concurrent_actions = 4;
        let open = s.sandbox.profiles["standard"].clone();
        s.sandbox.profiles.insert("cold".into(), open);
    })
    .await;
    let mounts = MountGuard(app.dir.path().to_path_buf());
    (app, mounts)
}

/// How long until `n` members are idle (polled every 20 ms: it is a figure).
async fn time_to_idle(app: &TestApp, n: i64, within: Duration) -> Duration {
    let started = Instant::now();
    wait_until_every(
        Duration::from_millis(20),
        within,
        "the pool filled",
        || async { (idle(app).await >= n).then_some(()) },
    )
    .await;
    started.elapsed()
}

/// Stops the app (its containers go), then undoes its pool's mounts.
fn stop((app, mounts): (TestApp, MountGuard)) {
    drop(app);
    drop(mounts);
}

pub async fn scenario_warm(docker: &Docker, out: &mut Report) {
    const ROUNDS: usize = 30;
    // 1. Interleaved: warm, cold (same engine, same sandboxd), raw create + start.
    let pooled = app_with_pool("warm", ROUNDS + 2).await;
    let app = &pooled.0;
    time_to_idle(app, (ROUNDS + 2) as i64, Duration::from_secs(120)).await;
    let client = reqwest::Client::new();
    let matched = MatchedRaw::new(&format!("{}-matched", app.instance())).await;
    create_profile(&client, app, "standard").await;
    create_profile(&client, app, "cold").await;
    matched.start(docker, 10_000).await;
    let (mut warm, mut cold, mut raw) = (Vec::new(), Vec::new(), Vec::new());
    let full = (ROUNDS + 2) as i64;
    let mut under_refill = Vec::new();
    for i in 0..ROUNDS {
        warm.push(create_profile(&client, app, "standard").await);
        if i % 2 == 0 {
            // A cold start while the pool refills the member just claimed: two starts on the
            // engine at once.
            under_refill.push(create_profile(&client, app, "cold").await);
        }
        // Each path alone: the refill is done before the cold start and the raw baseline.
        time_to_idle(app, full, Duration::from_secs(60)).await;
        cold.push(create_profile(&client, app, "cold").await);
        raw.push(matched.start(docker, i).await);
    }
    under_refill.sort();
    for v in [&mut warm, &mut cold, &mut raw] {
        v.sort();
    }
    let (w50, w99) = (percentile(&warm, 0.5), percentile(&warm, 0.99));
    let (c50, c99) = (percentile(&cold, 0.5), percentile(&cold, 0.99));
    let r50 = percentile(&raw, 0.5);
    out.line(format!(
        "14 warm create p50 {:.1} ms (p99 {:.1}) vs cold {:.1} ms (p99 {:.1}) vs raw create+start {:.1} ms: warm/raw {:.3}×, cold/raw {:.3}×  target warm ≤50 ms p50, ≤100 ms p99 [{}] (n={ROUNDS} interleaved)",
        ms(w50), ms(w99), ms(c50), ms(c99), ms(r50),
        w50.as_secs_f64() / r50.as_secs_f64(), c50.as_secs_f64() / r50.as_secs_f64(),
        verdict(w50 <= Duration::from_millis(50) && w99 <= Duration::from_millis(100)),
    ));
    out.line(format!(
        "14b cold create while the pool refills (two starts on the engine at once): p50 {:.1} ms, p99 {:.1} ms (n={})",
        ms(percentile(&under_refill, 0.5)),
        ms(percentile(&under_refill, 0.99)),
        under_refill.len()
    ));
    super::remove_instance(&format!("{}-matched", app.instance()));
    stop(pooled);

    // 2. Bursts of 50 against pools of 50 and 10.
    for pool in [50usize, 10] {
        let pooled = app_with_pool(&format!("wburst{pool}"), pool).await;
        let app = &pooled.0;
        time_to_idle(app, pool as i64, Duration::from_secs(180)).await;
        let vol = volume(app);
        let started = Instant::now();
        let mut lat = futures::future::join_all((0..50).map(|_| {
            let (client, vol, addr) = (client.clone(), vol.clone(), app.addr);
            async move { create(&client, addr, &new_chat(), &vol).await }
        }))
        .await
        .into_iter()
        .map(|(status, took)| {
            assert_eq!(status, 200);
            took
        })
        .collect::<Vec<_>>();
        let took = started.elapsed();
        lat.sort();
        out.line(format!(
            "15 burst of 50 with a pool of {pool}: all running in {:.2} s; per create p50 {:.0} ms, p99 {:.0} ms",
            took.as_secs_f64(),
            ms(percentile(&lat, 0.5)),
            ms(percentile(&lat, 0.99)),
        ));
        stop(pooled);
    }

    // 3. Refill: from nothing to 20 idle members.
    let pooled = app_with_pool("wrefill", 20).await;
    let app = &pooled.0;
    let took = time_to_idle(app, 20, Duration::from_secs(180)).await;
    out.line(format!(
        "16 refill: 20 members idle {:.2} s after start = {:.1} members/s (action slots: 4, one kept free for cold starts)",
        took.as_secs_f64(),
        20.0 / took.as_secs_f64()
    ));

    // 4. The idle cost of those 20: CPU over 10 s and memory, from their cgroups and shims.
    let ids: Vec<String> = containers_of(docker, app.instance())
        .await
        .into_iter()
        .filter_map(|c| c.id)
        .collect();
    let cpu = |ids: &[String]| {
        ids.iter()
            .filter_map(|id| {
                std::fs::read_to_string(format!("/sys/fs/cgroup/cpuacct/docker/{id}/cpuacct.usage"))
                    .ok()
                    .or_else(|| {
                        std::fs::read_to_string(format!(
                            "/sys/fs/cgroup/system.slice/docker-{id}.scope/cpu.stat"
                        ))
                        .ok()
                        .and_then(|s| {
                            s.lines()
                                .find_map(|l| l.strip_prefix("usage_usec "))
                                .map(|u| format!("{}", u.trim().parse::<u64>().unwrap_or(0) * 1000))
                        })
                    })
            })
            .filter_map(|s| s.trim().parse::<u64>().ok())
            .sum::<u64>()
    };
    let before = cpu(&ids);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let used_ns = cpu(&ids).saturating_sub(before);
    let mut mem = 0u64;
    for id in &ids {
        let options = bollard::query_parameters::StatsOptionsBuilder::new()
            .stream(false)
            .one_shot(true)
            .build();
        use futures::StreamExt;
        if let Some(Ok(s)) = docker.stats(id, Some(options)).next().await {
            mem += s.memory_stats.and_then(|m| m.usage).unwrap_or(0);
        }
    }
    let shim_kb: u64 = std::process::Command::new("ps")
        .args(["-o", "rss=,args=", "-C", "containerd-shim-runc-v2"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default()
        .lines()
        .filter(|l| ids.iter().any(|id| l.contains(id.as_str())))
        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    out.line(format!(
        "17 idle cost of {} members: CPU {:.3} core-ms/s over 10 s ({:.4}% of a core; {:.0} ms in all since they started), memory {:.1} MB in their cgroups + {:.1} MB shim RSS",
        ids.len(),
        used_ns as f64 / 1e6 / 10.0,
        used_ns as f64 / 1e9 / 10.0 * 100.0,
        before as f64 / 1e6,
        mem as f64 / 1e6,
        shim_kb as f64 / 1024.0,
    ));
    stop(pooled);
}
