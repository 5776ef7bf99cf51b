//! End-to-end figures against the real engine: sandboxd's create latency and burst time, each
//! interleaved with the raw Engine API doing the same work (create + start + inspect on the same
//! network, same image), so engine noise hits both sides alike.
//!
//! Run: `scripts/bench.sh` (provisions the engine, then `cargo bench --bench e2e`).
//! Bounded: 20 sequential rounds and one burst of 50 per side; everything it starts is removed.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bollard::models::{ContainerCreateBody, EndpointSettings, HostConfig, NetworkingConfig};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, InspectContainerOptions, ListContainersOptionsBuilder,
    RemoveContainerOptionsBuilder,
};
use bollard::Docker;
use futures::StreamExt;
use sandboxd::app::Application;
use sandboxd::config::{PullPolicy, Settings};
use serde_json::json;

const NETWORK: &str = "sandboxd-test";
const IMAGE: &str = "sandboxd/agent-busybox:latest";
const ROUNDS: usize = 20;
const BURST: usize = 50;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn raw_start(docker: &Docker, instance: &str, n: usize) -> Duration {
    let started = Instant::now();
    let body = ContainerCreateBody {
        image: Some(IMAGE.into()),
        labels: Some(HashMap::from([(
            "sandboxd.instance".to_string(),
            instance.to_string(),
        )])),
        host_config: Some(HostConfig {
            network_mode: Some(NETWORK.into()),
            ..Default::default()
        }),
        networking_config: Some(NetworkingConfig {
            endpoints_config: Some(HashMap::from([(
                NETWORK.to_string(),
                EndpointSettings::default(),
            )])),
        }),
        ..Default::default()
    };
    let name = format!("{instance}-{n}");
    let id = docker
        .create_container(
            Some(CreateContainerOptionsBuilder::new().name(&name).build()),
            body,
        )
        .await
        .expect("raw create")
        .id;
    docker.start_container(&id, None).await.expect("raw start");
    let c = docker
        .inspect_container(&id, None::<InspectContainerOptions>)
        .await
        .expect("raw inspect");
    assert!(c
        .network_settings
        .and_then(|n| n.networks)
        .is_some_and(|n| n.contains_key(NETWORK)));
    started.elapsed()
}

async fn remove_instance(docker: &Docker, instance: &str) {
    let filters = HashMap::from([("label", vec![format!("sandboxd.instance={instance}")])]);
    let list = docker
        .list_containers(Some(
            ListContainersOptionsBuilder::new()
                .all(true)
                .filters(&filters)
                .build(),
        ))
        .await
        .unwrap_or_default();
    let rm = RemoveContainerOptionsBuilder::new().force(true).build();
    futures::stream::iter(list.into_iter().filter_map(|c| c.id))
        .for_each_concurrent(8, |id| {
            let rm = rm.clone();
            async move {
                let _ = docker.remove_container(&id, Some(rm)).await;
            }
        })
        .await;
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let docker = Docker::connect_with_unix_defaults()?
        .negotiate_version()
        .await?;
    let dir = tempfile::tempdir()?;
    let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let instance = format!("bench-{tag}");
    let raw_instance = format!("bench-raw-{tag}");
    let vol = dir.path().join("vol");
    std::fs::create_dir_all(&vol)?;

    let mut s = Settings::default();
    s.http.port = 0;
    s.docker.pull_policy = PullPolicy::Never;
    s.sandbox.image = IMAGE.into();
    s.sandbox.network_name = NETWORK.into();
    s.sandbox.chats_root = dir.path().join("chats");
    s.sandbox.dependencies_host_path = dir.path().join("deps");
    s.sandbox.lambda_tools_host_path = dir.path().join("tools");
    s.database.path = dir.path().join("bench.db");
    s.controller.instance = instance.clone();
    let app = Application::build(s.clone(), None).await?;
    let addr = app.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    let client = reqwest::Client::new();
    let create = |chat: String| {
        let client = client.clone();
        let vol = vol.clone();
        async move {
            let started = Instant::now();
            let r = client
                .post(format!("http://{addr}/api/v1/create"))
                .json(&json!({"chat_id": chat, "agent_id": "bench", "volume_host_path": vol}))
                .send()
                .await
                .expect("request");
            assert!(r.status().is_success(), "create failed: {}", r.status());
            started.elapsed()
        }
    };
    // Warm-up: one of each, not counted.
    create(uuid::Uuid::new_v4().to_string()).await;
    raw_start(&docker, &raw_instance, 10_000).await;

    // 1. Sequential create latency, interleaved A B A B.
    let mut raw = Vec::new();
    let mut ours = Vec::new();
    for i in 0..ROUNDS {
        raw.push(raw_start(&docker, &raw_instance, i).await);
        ours.push(create(uuid::Uuid::new_v4().to_string()).await);
    }
    raw.sort();
    ours.sort();

    // 2. A burst of 50 new chats: all running. Raw side at concurrency 4 (its best here).
    remove_instance(&docker, &raw_instance).await;
    let started = Instant::now();
    futures::stream::iter(0..BURST)
        .for_each_concurrent(4, |i| {
            let docker = &docker;
            let raw_instance = &raw_instance;
            async move {
                raw_start(docker, raw_instance, 1000 + i).await;
            }
        })
        .await;
    let raw_burst = started.elapsed();
    let started = Instant::now();
    futures::future::join_all((0..BURST).map(|_| create(uuid::Uuid::new_v4().to_string()))).await;
    let our_burst = started.elapsed();

    println!();
    println!(
        "sandboxd e2e bench ({ROUNDS} sequential rounds, burst of {BURST}; engine API {})",
        docker.client_version()
    );
    println!(
        "{:<44} {:>10} {:>10} {:>8}",
        "measure", "raw API", "sandboxd", "ratio"
    );
    let row = |name: &str, a: Duration, b: Duration| {
        println!(
            "{name:<44} {:>8.1}ms {:>8.1}ms {:>7.3}x",
            ms(a),
            ms(b),
            b.as_secs_f64() / a.as_secs_f64()
        );
    };
    row(
        "create→running, sequential, p50",
        percentile(&raw, 0.5),
        percentile(&ours, 0.5),
    );
    row(
        "create→running, sequential, p95",
        percentile(&raw, 0.95),
        percentile(&ours, 0.95),
    );
    row(
        &format!("{BURST} new chats, all running (raw at conc. 4)"),
        raw_burst,
        our_burst,
    );
    println!(
        "overhead p50: {:+.1} ms",
        ms(percentile(&ours, 0.5)) - ms(percentile(&raw, 0.5))
    );

    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(20), server).await;
    remove_instance(&docker, &instance).await;
    remove_instance(&docker, &raw_instance).await;
    Ok(())
}
