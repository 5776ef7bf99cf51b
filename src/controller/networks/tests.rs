use std::sync::Arc;

use super::*;
use crate::backend::fake::FakeBackend;

fn rt(fake: &FakeBackend) -> SharedBackend {
    Arc::new(fake.clone())
}

fn on(id: &str, network: &str) -> Observed {
    Observed {
        container_id: id.into(),
        chat_id: None,
        session_id: None,
        spec_hash: None,
        running: false,
        paused: false,
        ip: None,
        legacy: false,
        pool_slot: None,
        network: Some(network.into()),
    }
}

#[tokio::test]
async fn a_full_network_sends_new_containers_to_a_shard_of_its_settings() {
    let fake = FakeBackend::new("t");
    fake.add_network("sbx", None);
    let rt = rt(&fake);
    let nets = Networks::new(2, true);
    let mut made = Vec::new();
    for i in 0..5 {
        let p = nets.place(&rt, "sbx").await.unwrap();
        p.created(&format!("c{i}"));
        made.push(p.network.clone());
    }
    // Placed ones count before any pass has seen them.
    assert_eq!(made, ["sbx", "sbx", "sbx-1", "sbx-1", "sbx-2"]);
    assert_eq!(fake.network_names(), ["sbx", "sbx-1", "sbx-2"]);
    assert_eq!(nets.shards_of("sbx"), ["sbx-1", "sbx-2"]);
    assert_eq!(nets.network_of("c2").as_deref(), Some("sbx-1"));
}

#[tokio::test]
async fn a_place_given_back_before_the_create_frees_it() {
    let fake = FakeBackend::new("t");
    let rt = rt(&fake);
    let nets = Networks::new(1, true);
    let first = nets.place(&rt, "sbx").await.unwrap();
    assert_eq!(first.network, "sbx");
    drop(first); // the create failed
    let again = nets.place(&rt, "sbx").await.unwrap();
    assert_eq!(again.network, "sbx");
}

#[tokio::test]
async fn counts_follow_the_pass_and_stopped_containers_keep_their_place() {
    let fake = FakeBackend::new("t");
    let rt = rt(&fake);
    let nets = Networks::new(2, true);
    // A restart: two containers (one of them stopped) already on the base.
    nets.observe(&[on("a", "sbx"), on("b", "sbx")], Some(Instant::now()));
    assert_eq!(nets.place(&rt, "sbx").await.unwrap().network, "sbx-1");
    // One went: its place is free again.
    nets.observe(&[on("a", "sbx")], Some(Instant::now()));
    assert_eq!(nets.place(&rt, "sbx").await.unwrap().network, "sbx");
}

#[tokio::test]
async fn a_seen_container_is_counted_once() {
    let fake = FakeBackend::new("t");
    let rt = rt(&fake);
    let nets = Networks::new(2, true);
    let p = nets.place(&rt, "sbx").await.unwrap();
    p.created("a");
    drop(p);
    nets.observe(&[on("a", "sbx")], Some(Instant::now()));
    // "a" counts once (listed), so the base has room for one more.
    let p = nets.place(&rt, "sbx").await.unwrap();
    assert_eq!(p.network, "sbx");
    p.created("b");
    assert_eq!(nets.place(&rt, "sbx").await.unwrap().network, "sbx-1");
}

#[tokio::test]
async fn a_small_subnet_bounds_a_network_below_the_capacity() {
    let fake = FakeBackend::new("t");
    fake.add_network("sbx", Some(1));
    let rt = rt(&fake);
    let nets = Networks::new(1000, true);
    let p = nets.place(&rt, "sbx").await.unwrap();
    p.created("a");
    // The shard copies the base's subnet size.
    let p = nets.place(&rt, "sbx").await.unwrap();
    assert_eq!(p.network, "sbx-1");
}

#[tokio::test]
async fn without_sharding_a_full_network_is_an_error_naming_the_limit() {
    let fake = FakeBackend::new("t");
    let rt = rt(&fake);
    let nets = Networks::new(1, false);
    nets.place(&rt, "sbx").await.unwrap().created("a");
    let e = nets.place(&rt, "sbx").await.err().unwrap().to_string();
    assert!(e.contains("network `sbx` is full"), "{e}");
    assert!(e.contains("sandbox.network_capacity"), "{e}");
    assert!(e.contains("sandbox.network_sharding"), "{e}");
    assert_eq!(fake.network_names(), Vec::<String>::new(), "no shard made");
}

#[tokio::test]
async fn empty_shards_are_removed_and_used_ones_kept() {
    let fake = FakeBackend::new("t");
    let rt = rt(&fake);
    let nets = Networks::new(1, true);
    for id in ["a", "b", "c"] {
        nets.place(&rt, "sbx").await.unwrap().created(id);
    }
    assert_eq!(fake.network_names(), ["sbx-1", "sbx-2"]);
    // The pass sees only "c" (on sbx-2) left; nothing of the fake's is on sbx-1 either.
    nets.observe(&[on("c", "sbx-2")], Some(Instant::now()));
    nets.prune(&rt).await;
    assert_eq!(fake.network_names(), ["sbx-2"]);
    assert_eq!(nets.shards_of("sbx"), ["sbx-2"]);
    // A place in flight keeps its network.
    nets.observe(&[], Some(Instant::now()));
    let held = nets.place(&rt, "sbx").await.unwrap();
    assert_eq!(held.network, "sbx");
    let next = nets.place(&rt, "sbx").await.unwrap();
    assert_eq!(next.network, "sbx-1", "made again");
    nets.prune(&rt).await;
    // sbx-2's last container is gone (the pass saw none); sbx-1 is placed on: kept.
    assert_eq!(fake.network_names(), ["sbx-1"], "in flight: kept");
    drop((held, next));
    nets.prune(&rt).await;
    assert_eq!(fake.network_names(), Vec::<String>::new());
}

#[tokio::test]
async fn shards_of_an_earlier_run_are_found() {
    let fake = FakeBackend::new("t");
    let rt = rt(&fake);
    {
        let earlier = Networks::new(1, true);
        for id in ["a", "b"] {
            earlier.place(&rt, "sbx").await.unwrap().created(id);
        }
    }
    let nets = Networks::new(1, true);
    nets.observe(&[on("a", "sbx"), on("b", "sbx-1")], Some(Instant::now()));
    nets.prune(&rt).await; // lists the shards, removes none (used)
    assert_eq!(nets.shards_of("sbx"), ["sbx-1"]);
    assert_eq!(nets.place(&rt, "sbx").await.unwrap().network, "sbx-2");
}

#[tokio::test]
async fn only_a_list_begun_after_a_create_can_tell_its_container_is_gone() {
    let fake = FakeBackend::new("t");
    let rt = rt(&fake);
    let nets = Networks::new(1, true);
    let began = Instant::now();
    nets.place(&rt, "sbx").await.unwrap().created("member");
    // The loop's copy lacks the pool's newest member; a list begun before its create too.
    nets.observe(&[], None);
    nets.observe(&[], Some(began));
    assert_eq!(nets.place(&rt, "sbx").await.unwrap().network, "sbx-1");
    // A list begun after it, without it: it went.
    nets.observe(&[], Some(Instant::now()));
    assert_eq!(nets.place(&rt, "sbx").await.unwrap().network, "sbx");
}
