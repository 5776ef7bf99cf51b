//! Networks that fill up, on the real engine: past `sandbox.network_capacity` sandboxes go on
//! further networks of the same settings, with the profile's egress rules before their first
//! sandbox, reachable at their address there, and removed when empty; a config that pins one
//! network refuses past the limit, naming it. The capacity is set to 2 so a handful of
//! sandboxes show what 1,023 would (a bridge's real limit is what `scripts/bench.sh scale`
//! approaches).

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

use crate::support::*;

/// The network option each engine keeps as given (a shard must carry it over).
fn mtu_option() -> &'static str {
    match engine() {
        Engine::Docker => "com.docker.network.driver.mtu",
        Engine::Podman => "mtu",
    }
}

fn network_json(name: &str) -> Option<Value> {
    let out = Command::new(engine().cli())
        .args(["network", "inspect", name, "--format", "{{json .}}"])
        .output()
        .expect("network inspect");
    if !out.status.success() {
        return None;
    }
    // Podman prints a list of one.
    match serde_json::from_slice(&out.stdout).expect("network json") {
        Value::Array(mut one) => one.pop(),
        net => Some(net),
    }
}

/// A string field of a network, found under either engine's spelling (`Labels`/`labels`).
fn field<'a>(net: &'a Value, keys: &[&str]) -> Option<&'a Value> {
    keys.iter().find_map(|k| net.get(*k))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_network_spills_onto_shards_of_its_settings_that_go_when_empty() {
    let mtu = mtu_option();
    let network = OwnNetwork::create_with(&["--opt", &format!("{mtu}=1400")]);
    let base = network.0.clone();
    let app = TestApp::spawn_with(|s| {
        s.sandbox.network_name = base.clone();
        s.sandbox.network_capacity = 2;
    })
    .await;

    let mut placed: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut chats = Vec::new();
    for i in 0..5 {
        let chat = new_chat();
        let (status, body) = app
            .create(&chat, "agent", &app.volume(&format!("v{i}")))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let (_, view) = app.get(&format!("/api/v1/sandboxes/{chat}")).await;
        let on = view["network"]
            .as_str()
            .expect("the view names the network");
        let ip = body["endpoint"]["ip"].as_str().unwrap().to_string();
        // The container is on that network, at the endpoint's address, and answers there.
        let inspect = app.inspect(body["container_id"].as_str().unwrap()).await;
        let endpoints = inspect.network_settings.unwrap().networks.unwrap();
        assert_eq!(endpoints.len(), 1, "{endpoints:?}");
        assert_eq!(endpoints[on].ip_address.as_deref(), Some(ip.as_str()));
        assert!(agent_answers(&ip, 8000).await, "{chat} on {on} at {ip}");
        placed.entry(on.to_string()).or_default().push(chat.clone());
        chats.push(chat);
    }
    let counts: Vec<(String, usize)> = placed.iter().map(|(n, c)| (n.clone(), c.len())).collect();
    let shard = |n: u32| format!("{base}-{n}");
    assert_eq!(
        counts,
        [(base.clone(), 2), (shard(1), 2), (shard(2), 1)],
        "two per network, in order"
    );

    for n in [1, 2] {
        let net = network_json(&shard(n)).expect("the shard exists");
        let labels = field(&net, &["Labels", "labels"]).expect("labels");
        assert_eq!(labels["sandboxd.shard_of"], base.as_str(), "{net}");
        assert_eq!(labels["sandboxd.instance"], app.instance(), "{net}");
        let options = field(&net, &["Options", "options"]).expect("options");
        assert_eq!(options[mtu], "1400", "the base's settings: {net}");
        // The profile's egress rules (the default denies private ranges) cover it.
        let bridge = engine().bridge_of(&shard(n));
        assert!(
            iptables_save().contains(&bridge),
            "no egress rules for {} ({bridge})",
            shard(n)
        );
    }
    let (_, show) = app.get(&format!("/api/v1/sandboxes/{}", chats[4])).await;
    assert_eq!(show["network"], shard(2).as_str());

    // A hibernated sandbox (a stopped container, no address) keeps its shard through listing
    // passes, and resumes on it.
    let last = &chats[4];
    let slept = crate::hibernation::settle(&app, last, "hibernate", "hibernated").await;
    app.wait_for_passes(2).await;
    assert!(
        network_json(&shard(2)).is_some(),
        "kept for a hibernated sandbox"
    );
    let woke = crate::hibernation::settle(&app, last, "resume", "running").await;
    assert_eq!(woke["container_id"], slept["container_id"], "{woke}");
    assert_eq!(woke["network"], shard(2).as_str(), "{woke}");
    let ip = woke["endpoint"]["ip"].as_str().expect("an address again");
    assert!(
        agent_answers(ip, 8000).await,
        "resumed on {} at {ip}",
        shard(2)
    );

    for chat in &chats {
        let (status, _) = app.delete(chat).await;
        assert_eq!(status, StatusCode::OK);
    }
    wait_until(
        Duration::from_secs(60),
        "the shards to be removed",
        || async {
            (network_json(&shard(1)).is_none() && network_json(&shard(2)).is_none()).then_some(())
        },
    )
    .await;
    assert!(
        network_json(&base).is_some(),
        "the configured network stays"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_network_refuses_past_its_capacity_naming_the_limit() {
    let app = TestApp::spawn_with(|s| {
        s.sandbox.network_capacity = 1;
        s.sandbox.network_sharding = false;
    })
    .await;
    let first = new_chat();
    let (status, body) = app.create(&first, "agent", &app.volume("a")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let second = new_chat();
    let (status, body) = app.create(&second, "agent", &app.volume("b")).await;
    assert!(status.is_server_error(), "{status} {body}");
    let view = wait_until(
        Duration::from_secs(30),
        "the refusal in the view",
        || async {
            let (_, v) = app.get(&format!("/api/v1/sandboxes/{second}")).await;
            v["last_error"].is_string().then_some(v)
        },
    )
    .await;
    let error = view["last_error"].as_str().unwrap();
    assert!(
        error.contains(&format!("network `{TEST_NETWORK}` is full"))
            && error.contains("sandbox.network_capacity")
            && error.contains("sandbox.network_sharding"),
        "{error}"
    );
    assert!(
        network_json(&format!("{TEST_NETWORK}-1")).is_none(),
        "no further network"
    );
    assert_eq!(app.containers().await.len(), 1);
    for chat in [&first, &second] {
        app.delete(chat).await;
    }
    app.stop().await;
}
