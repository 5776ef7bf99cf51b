//! Crash safety: the built binary is SIGKILLed at random moments while creates and deletes are
//! in flight, then started again; and the exact crash windows around Docker's create are
//! reproduced with sandboxd's own Docker adapter.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::support::*;

#[derive(Debug, Clone)]
enum Op {
    Create(String),
    Delete(String),
}

/// What clients were told before the crash.
#[derive(Debug, Default)]
struct Acks {
    /// chat → session of an acknowledged create (200).
    created: HashMap<String, String>,
    /// chats with an acknowledged delete.
    deleted: HashSet<String>,
}

async fn send(
    client: &reqwest::Client,
    addr: std::net::SocketAddr,
    op: &Op,
    vol: &str,
) -> Option<(StatusCode, Value)> {
    let r = match op {
        Op::Create(chat) => {
            client
                .post(format!("http://{addr}/api/v1/create"))
                .json(&json!({"chat_id": chat, "agent_id": "a", "volume_host_path": vol}))
                .send()
                .await
        }
        Op::Delete(chat) => {
            client
                .delete(format!("http://{addr}/api/v1/sandboxes/{chat}"))
                .send()
                .await
        }
    }
    .ok()?;
    let status = r.status();
    Some((status, r.json().await.ok()?))
}

/// Waits until Docker matches the rows exactly, then checks what clients were told.
async fn assert_converged(
    settings: &sandboxd::config::Settings,
    docker: &bollard::Docker,
    acks: &Acks,
    touched_after_ack: &HashSet<String>,
) -> Duration {
    let (took, rows) = wait_converged(settings, docker, Duration::from_secs(90)).await;
    let now = chrono::Utc::now();
    for (chat, session) in &acks.created {
        if touched_after_ack.contains(chat) {
            continue;
        }
        let row = rows.iter().find(|r| r.chat_id.to_string() == *chat);
        let row = row.unwrap_or_else(|| panic!("acknowledged create of {chat} lost"));
        assert_eq!(
            row.session_id.to_string(),
            *session,
            "session of {chat} changed"
        );
    }
    for chat in &acks.deleted {
        if touched_after_ack.contains(chat) {
            continue;
        }
        let live = rows
            .iter()
            .any(|r| r.chat_id.to_string() == *chat && r.is_live(now));
        assert!(!live, "acknowledged delete of {chat} undone");
    }
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_at_random_moments_loses_and_duplicates_nothing() {
    let rounds: u64 = std::env::var("SANDBOXD_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let seed = std::env::var("SANDBOXD_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_cafe_u64);
    eprintln!("crash test: {rounds} rounds, seed {seed}");
    let mut rng = Rng(seed);
    let fx = ProcessFixture::new(|s| {
        s.sandbox.cleanup_interval_seconds = 1;
        s.controller.create_wait_seconds = 30;
    });
    let settings = &fx.settings;
    let vol = fx.vol.display().to_string();
    let docker = docker().await;
    let pool: Vec<String> = (0..16).map(|_| new_chat()).collect();
    let client = reqwest::Client::new();
    let mut acks = Acks::default();
    let mut worst = Duration::ZERO;

    for round in 0..rounds {
        let mut server = fx.start().await;
        // Each chat gets one kind of op per round (several concurrent ones of that kind), so
        // an acknowledgement is never overtaken by an opposite op on the same chat.
        let deleting: Vec<bool> = pool.iter().map(|_| rng.below(10) < 3).collect();
        let ops: Vec<Op> = (0..50)
            .map(|_| {
                let i = rng.below(pool.len() as u64) as usize;
                let chat = pool[i].clone();
                if deleting[i] {
                    Op::Delete(chat)
                } else {
                    Op::Create(chat)
                }
            })
            .collect();
        let kill_after = Duration::from_millis(rng.below(2500));
        let handles: Vec<_> = ops
            .iter()
            .cloned()
            .map(|op| {
                let client = client.clone();
                let vol = vol.clone();
                let addr = server.addr;
                tokio::spawn(async move {
                    let r = send(&client, addr, &op, &vol).await;
                    (op, r, Instant::now())
                })
            })
            .collect();
        tokio::time::sleep(kill_after).await;
        server.kill9();
        let killed_at = Instant::now();

        // Replies that arrived before the kill are acknowledgements; ops still in flight are
        // ambiguous and make their chat exempt from the "nothing lost" check for this round.
        let mut touched = HashSet::new();
        for h in handles {
            let (op, reply, at) = h.await.unwrap();
            let chat = match &op {
                Op::Create(c) | Op::Delete(c) => c.clone(),
            };
            match reply {
                Some((StatusCode::OK, body)) if at <= killed_at => match op {
                    Op::Create(_) => {
                        acks.deleted.remove(&chat);
                        acks.created
                            .insert(chat, body["session_id"].as_str().unwrap().to_string());
                    }
                    Op::Delete(_) => {
                        acks.created.remove(&chat);
                        acks.deleted.insert(chat);
                    }
                },
                _ => {
                    touched.insert(chat);
                }
            }
        }
        // Acks only count when no ambiguous op on the same chat may have overtaken them.
        for chat in &touched {
            acks.created.remove(chat);
            acks.deleted.remove(chat);
        }

        let _server = fx.start().await;
        let took = assert_converged(settings, &docker, &acks, &touched).await;
        worst = worst.max(took);
        eprintln!("round {round}: killed after {kill_after:?}, converged {took:?} after restart");
    }
    eprintln!("crash test: worst convergence after restart {worst:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_docker_create_and_the_status_write_never_makes_a_second_container() {
    use sandboxd::backend::StartRequest;

    // A pending row that no sandboxd has acted on: written while the engine is unreachable.
    let dir = tempfile::tempdir().unwrap();
    let instance = unique_instance();
    let mut settings = test_settings(dir.path(), &instance);
    let real = settings.docker.clone();
    settings.docker.base_url = format!("unix://{}/no-engine.sock", dir.path().display());
    let app = TestApp::start(dir, settings).await;
    let chats = [new_chat(), new_chat()];
    for (i, chat) in chats.iter().enumerate() {
        let r = app
            .client
            .put(app.url(&format!("/api/v1/sandboxes/{chat}")))
            .json(&json!({"agent_id": "a", "volume_host_path": app.volume(&format!("v{i}"))}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    let (dir, mut settings, guard) = app.stop().await;
    let _guard = guard;

    // Do what sandboxd does right before it records the result, then "crash":
    // chat 0: created and started; chat 1: created, never started.
    let store = sandboxd::store::Store::open(&settings.database.path, Duration::from_secs(5), 1)
        .await
        .unwrap();
    let mut real_settings = settings.clone();
    real_settings.docker = real.clone();
    real_settings.sandbox.network_name = TEST_NETWORK.into();
    let runtime = sandboxd::backend::connect(&real_settings, Default::default())
        .await
        .unwrap();
    let row0 = store.get(chats[0].parse().unwrap()).await.unwrap().unwrap();
    let spec0 = serde_json::from_str(&row0.spec_json).unwrap();
    std::fs::create_dir_all(settings.sandbox.chats_root.join(&chats[0])).unwrap();
    let id0 = runtime
        .create_container(&StartRequest {
            chat_id: row0.chat_id,
            session_id: row0.session_id,
            agent_id: &row0.agent_id,
            spec: &spec0,
            spec_hash: &row0.spec_hash,
            volume_host_path: &row0.volume_host_path,
            expires_at: row0.expires_at,
        })
        .await
        .unwrap();
    runtime
        .start_container(&id0, TEST_NETWORK, 8000)
        .await
        .unwrap();
    let started_at = app_docker_started_at(&id0).await;
    let row1 = store.get(chats[1].parse().unwrap()).await.unwrap().unwrap();
    let name1 = sandboxd::backend::labels::container_name(&instance, row1.chat_id, row1.session_id);
    let body = bollard::models::ContainerCreateBody {
        image: Some(TEST_IMAGE.into()),
        labels: Some(sandboxd::backend::labels::for_session(
            &sandboxd::backend::labels::SessionLabels {
                instance: &instance,
                chat_id: row1.chat_id,
                session_id: row1.session_id,
                spec_hash: &row1.spec_hash,
                agent_id: "a",
                volume_host_path: &row1.volume_host_path,
                endpoint_port: 8000,
                expires_at: row1.expires_at,
            },
        )),
        ..Default::default()
    };
    let d = docker().await;
    d.create_container(
        Some(
            bollard::query_parameters::CreateContainerOptionsBuilder::new()
                .name(&name1)
                .build(),
        ),
        body,
    )
    .await
    .unwrap();

    settings.docker = real;
    let app = TestApp::start(dir, settings).await;
    wait_until(Duration::from_secs(30), "both running", || async {
        let (_, a) = app.get(&format!("/api/v1/sandboxes/{}", chats[0])).await;
        let (_, b) = app.get(&format!("/api/v1/sandboxes/{}", chats[1])).await;
        (a["phase"] == "running" && b["phase"] == "running").then_some(())
    })
    .await;
    let (_, a) = app.get(&format!("/api/v1/sandboxes/{}", chats[0])).await;
    assert_eq!(
        a["container_id"].as_str(),
        Some(id0.as_str()),
        "adopted, not replaced"
    );
    assert_eq!(
        app_docker_started_at(&id0).await,
        started_at,
        "adopted, not restarted"
    );
    wait_until(
        Duration::from_secs(10),
        "exactly two containers",
        || async { (app.containers().await.len() == 2).then_some(()) },
    )
    .await;
}

async fn app_docker_started_at(id: &str) -> Option<String> {
    docker()
        .await
        .inspect_container(id, None)
        .await
        .ok()?
        .state?
        .started_at
}
