//! Expiry, orphans, hand-removed containers: the loop converges on its own.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bollard::models::ContainerCreateBody;
use bollard::query_parameters::{CreateContainerOptionsBuilder, RemoveContainerOptionsBuilder};
use reqwest::StatusCode;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_session_is_removed_on_time_and_replaced_by_a_new_one_on_create() {
    let app = TestApp::spawn_with(|s| {
        s.sandbox.ttl_seconds = 3;
        // The resync tick is long: removal must come from the expiry wake-up.
        s.sandbox.cleanup_interval_seconds = 60;
    })
    .await;
    let chat = new_chat();
    let vol = app.volume("t");
    let (status, first) = app.create(&chat, "agent", &vol).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let expires = chrono::DateTime::parse_from_rfc3339(first["expires_at"].as_str().unwrap())
        .unwrap()
        .with_timezone(&chrono::Utc);

    let gone_at = wait_until(
        Duration::from_secs(30),
        "expired container removed",
        || async { app.containers().await.is_empty().then(chrono::Utc::now) },
    )
    .await;
    let late = (gone_at - expires).num_milliseconds();
    assert!(late >= 0, "removed {late} ms before expiry");
    // Well inside the 60 s resync tick: the expiry wake-up removed it. How soon after expiry
    // is a latency figure for `scripts/bench.sh`, not a bound for a loaded test engine.
    assert!(late < 30_000, "removed {late} ms after expiry");

    // The container goes first, then the status write: under load there is a moment between.
    let row = wait_until(Duration::from_secs(5), "phase expired", || async {
        let (_, row) = app.get(&format!("/api/v1/sandboxes/{chat}")).await;
        (row["phase"] == "expired").then_some(row)
    })
    .await;
    assert_eq!(row["session_id"], first["session_id"], "row kept");

    let (status, second) = app.create(&chat, "agent", &vol).await;
    assert_eq!(status, StatusCode::OK, "{second}");
    assert_ne!(second["session_id"], first["session_id"]);
    assert_ne!(second["container_id"], first["container_id"]);
    assert_eq!(app.containers().await.len(), 1);
}

async fn make_container(app: &TestApp, labels: HashMap<String, String>) -> String {
    let name = format!(
        "foreign-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    );
    let body = ContainerCreateBody {
        image: Some(TEST_IMAGE.into()),
        labels: Some(labels),
        ..Default::default()
    };
    let id = app
        .docker
        .create_container(
            Some(CreateContainerOptionsBuilder::new().name(&name).build()),
            body,
        )
        .await
        .expect("create foreign container")
        .id;
    let ours = body_is_ours(app, &id).await;
    match app.docker.start_container(&id, None).await {
        Ok(()) => {}
        // sandboxd may remove its orphans between our create and start: that is the point.
        Err(_) if ours => {}
        Err(e) => panic!("start {id}: {e}"),
    }
    id
}

async fn body_is_ours(app: &TestApp, id: &str) -> bool {
    match app.docker.inspect_container(id, None).await {
        Ok(c) => c.config.and_then(|c| c.labels).is_some_and(|l| {
            l.get("sandboxd.instance").map(String::as_str) == Some(app.instance())
        }),
        Err(_) => true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphans_are_removed_and_foreign_containers_are_untouched() {
    let app = TestApp::spawn().await;
    let other_instance = unique_instance();
    let _other_guard = InstanceGuard(other_instance.clone());
    let l = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let chat = new_chat();
    let orphan = make_container(
        &app,
        l(&[
            ("sandboxd.managed", "true"),
            ("sandboxd.instance", app.instance()),
            ("sandboxd.chat_id", &chat),
            ("sandboxd.session_id", &new_chat()),
        ]),
    )
    .await;
    let garbage = make_container(
        &app,
        l(&[
            ("sandboxd.managed", "true"),
            ("sandboxd.instance", app.instance()),
            ("sandboxd.chat_id", "garbage"),
        ]),
    )
    .await;
    let unlabeled_marker = format!("marker-{}", uuid::Uuid::new_v4().simple());
    let unlabeled = make_container(&app, l(&[("test.marker", &unlabeled_marker)])).await;
    let foreign = make_container(
        &app,
        l(&[
            ("sandboxd.managed", "true"),
            ("sandboxd.instance", &other_instance),
            ("sandboxd.chat_id", &chat),
        ]),
    )
    .await;

    let started = Instant::now();
    wait_until(Duration::from_secs(15), "orphans removed", || async {
        app.containers().await.is_empty().then_some(())
    })
    .await;
    // By the 2 s resync, not by some later accident: a few periods' slack for a loaded engine.
    assert!(
        started.elapsed() < Duration::from_secs(12),
        "{:?}",
        started.elapsed()
    );
    for id in [&orphan, &garbage] {
        assert!(
            app.docker.inspect_container(id, None).await.is_err(),
            "{id} still exists"
        );
    }
    for id in [&unlabeled, &foreign] {
        let c = app.inspect(id).await;
        assert_eq!(
            c.state.unwrap().running,
            Some(true),
            "foreign container {id} touched"
        );
    }
    let rm = RemoveContainerOptionsBuilder::new().force(true).build();
    app.docker
        .remove_container(&unlabeled, Some(rm))
        .await
        .unwrap();
    // `foreign` is removed by _other_guard.
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_removed_by_hand_is_recreated_for_the_same_session() {
    let app = TestApp::spawn_with(|s| s.sandbox.cleanup_interval_seconds = 60).await;
    let chat = new_chat();
    let (status, first) = app.create(&chat, "agent", &app.volume("h")).await;
    assert_eq!(status, StatusCode::OK);
    let old = first["container_id"].as_str().unwrap().to_string();
    let rm = RemoveContainerOptionsBuilder::new().force(true).build();
    app.docker.remove_container(&old, Some(rm)).await.unwrap();

    // The resync tick is a minute away: the Docker event wakes the loop.
    let replacement = wait_until(Duration::from_secs(15), "replacement running", || async {
        let (_, v) = app.get(&format!("/api/v1/sandboxes/{chat}")).await;
        let id = v["container_id"].as_str()?.to_string();
        (v["phase"] == "running" && id != old).then_some(v)
    })
    .await;
    assert_eq!(
        replacement["session_id"], first["session_id"],
        "same session"
    );
    let cs = app.containers().await;
    assert_eq!(cs.len(), 1);
    assert_eq!(cs[0].id.as_deref(), replacement["container_id"].as_str());

    // A create call now returns the replacement.
    let (_, again) = app.create(&chat, "agent", &app.volume("h")).await;
    assert_eq!(again["container_id"], replacement["container_id"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_container_is_replaced() {
    let app = TestApp::spawn().await;
    let chat = new_chat();
    let (_, first) = app.create(&chat, "agent", &app.volume("s")).await;
    let old = first["container_id"].as_str().unwrap().to_string();
    app.docker
        .kill_container(
            &old,
            None::<bollard::query_parameters::KillContainerOptions>,
        )
        .await
        .unwrap();
    wait_until(Duration::from_secs(15), "replacement", || async {
        let (_, v) = app.get(&format!("/api/v1/sandboxes/{chat}")).await;
        (v["phase"] == "running" && v["container_id"].as_str()? != old).then_some(())
    })
    .await;
    wait_until(
        Duration::from_secs(10),
        "dead container removed",
        || async { (app.containers().await.len() == 1).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drifted_container_for_a_live_session_is_removed() {
    let app = TestApp::spawn().await;
    let chat = new_chat();
    let (status, first) = app.create(&chat, "agent", &app.volume("drift")).await;
    assert_eq!(status, StatusCode::OK);
    // Same chat and session, but labels that do not match the row's spec: drift.
    let labels: HashMap<String, String> = [
        ("sandboxd.managed", "true"),
        ("sandboxd.instance", app.instance()),
        ("sandboxd.chat_id", chat.as_str()),
        ("sandboxd.session_id", first["session_id"].as_str().unwrap()),
        ("sandboxd.spec_hash", "tampered"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let drifted = make_container(&app, labels).await;
    wait_until(
        Duration::from_secs(15),
        "drifted container removed",
        || async {
            app.docker
                .inspect_container(&drifted, None)
                .await
                .is_err()
                .then_some(())
        },
    )
    .await;
    let cs = app.containers().await;
    assert_eq!(cs.len(), 1);
    assert_eq!(
        cs[0].id.as_deref(),
        first["container_id"].as_str(),
        "the healthy one stays"
    );
}
