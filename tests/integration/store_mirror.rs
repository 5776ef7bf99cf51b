//! The server's in-memory rows must equal the SQLite table after any sequence of writes,
//! including concurrent ones and writes whose caller goes away mid-flight.

use std::time::Duration;

use chrono::Utc;
use sandboxd::domain::{ChatId, Phase};
use sandboxd::store::{ListFilter, NewSession, RunningContainer, Store};

use crate::support::{new_chat, Rng};

/// The server's store (reads from memory) and a second, plain one on the same file (reads
/// from disk).
async fn stores(dir: &std::path::Path) -> (Store, Store) {
    let path = dir.join("m.db");
    let served = Store::open(&path, Duration::from_secs(5), 4).await.unwrap();
    served.migrate().await.unwrap();
    let served = served.serve_reads_from_memory().await.unwrap();
    let disk = Store::open(&path, Duration::from_secs(5), 1).await.unwrap();
    (served, disk)
}

async fn assert_same(served: &Store, disk: &Store, step: &str) {
    let (mem, db) = (served.all().await.unwrap(), disk.all().await.unwrap());
    assert_eq!(mem, db, "rows differ after {step}");
    let filters = [
        ListFilter {
            limit: 3,
            ..Default::default()
        },
        ListFilter {
            phase: Some(Phase::Running),
            limit: 100,
            ..Default::default()
        },
        ListFilter {
            agent_id: Some("b".into()),
            after: db.get(1).map(|r| r.chat_id),
            limit: 2,
            ..Default::default()
        },
    ];
    for f in &filters {
        assert_eq!(
            served.list(f).await.unwrap(),
            disk.list(f).await.unwrap(),
            "list {f:?} differs after {step}"
        );
    }
    for r in &db {
        assert_eq!(served.get(r.chat_id).await.unwrap().as_ref(), Some(r));
    }
}

fn session(chat: ChatId, rng: &mut Rng) -> NewSession {
    NewSession {
        state: sandboxd::domain::hibernation::SandboxState::Running,
        chat_id: chat,
        agent_id: ["a", "b"][rng.below(2) as usize].into(),
        volume_host_path: "/data/v".into(),
        spec_json: "{}".into(),
        spec_hash: ["h1", "h2"][rng.below(2) as usize].into(),
        // Some sessions expire at once, so expiry and re-creation are exercised.
        ttl: chrono::Duration::seconds([0, 3600][rng.below(2) as usize]),
        profile: None,
    }
}

/// One random write on a random chat, as the API or the controller would make it.
async fn random_write(store: &Store, chats: &[ChatId], seed: u64) {
    let mut rng = Rng(seed | 1);
    let chat = chats[rng.below(chats.len() as u64) as usize];
    let now = Utc::now();
    let current = store.get(chat).await.unwrap();
    let session_id = current.as_ref().map(|r| r.session_id);
    match (rng.below(10), session_id) {
        (0, _) => drop(
            store
                .create_or_reuse(&session(chat, &mut rng), now, chrono::Duration::zero())
                .await,
        ),
        (1, _) => drop(
            store
                .apply(&session(chat, &mut rng), now, chrono::Duration::days(7))
                .await,
        ),
        (2, _) => drop(store.request_delete(chat, now).await),
        (3, _) => drop(store.renew(chat, chrono::Duration::seconds(60), now).await),
        (4, Some(s)) => drop(store.retry_now(chat, s, now).await),
        (5, Some(s)) => {
            let running = RunningContainer {
                container_id: "c0ffee",
                ip: "10.0.0.2",
                port: 8000,
                host_port: None,
                start: None,
                network: Some("sbx"),
            };
            drop(
                store
                    .record_running(chat, s, &running, sandboxd::store::EventAction::Start, now)
                    .await,
            );
        }
        (6, Some(s)) => drop(
            store
                .record_failure(
                    chat,
                    s,
                    sandboxd::store::EventAction::Start,
                    "boom",
                    |_| Duration::from_secs(1),
                    now,
                )
                .await,
        ),
        (7, Some(s)) => drop(store.record_expired(chat, s, &[], now).await),
        (8, Some(s)) => drop(store.purge(chat, s, &[], now).await),
        _ => drop(store.prune(now, now + chrono::Duration::days(1)).await),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_rows_equal_the_table_after_random_concurrent_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (served, disk) = stores(dir.path()).await;
    let chats: Vec<ChatId> = (0..6).map(|_| new_chat().parse().unwrap()).collect();
    let mut rng = Rng(0x5eed_1234);
    let mut most_rows = 0;
    for round in 0..120 {
        // Four writers at once, on possibly the same chat.
        let seeds: Vec<u64> = (0..4).map(|_| rng.next()).collect();
        futures::future::join_all(seeds.iter().map(|s| random_write(&served, &chats, *s))).await;
        assert_same(&served, &disk, &format!("round {round}")).await;
        most_rows = most_rows.max(served.mirrored_rows().unwrap_or(0));
    }
    assert!(most_rows >= 3, "the sequence left too little to compare");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_abandoned_by_its_caller_still_reaches_memory_if_it_commits() {
    let dir = tempfile::tempdir().unwrap();
    let (served, disk) = stores(dir.path()).await;
    let chats: Vec<ChatId> = (0..4).map(|_| new_chat().parse().unwrap()).collect();
    let mut rng = Rng(0xdead_beef);
    for round in 0..150 {
        // Give up on each write after a random 0–2 ms: some are dropped before their commit,
        // some during it, some finish.
        let seeds: Vec<u64> = (0..3).map(|_| rng.next()).collect();
        let cutoffs: Vec<u64> = (0..3).map(|_| rng.below(2_000)).collect();
        futures::future::join_all(seeds.iter().zip(&cutoffs).map(|(s, c)| {
            tokio::time::timeout(Duration::from_micros(*c), random_write(&served, &chats, *s))
        }))
        .await;
        // A commit handed to its own task may still be finishing; it holds the write gate,
        // so any later write waits for it. Make one that changes nothing.
        let barrier = sandboxd::store::NewEvent {
            chat_id: "-",
            session_id: None,
            container_id: None,
            action: sandboxd::store::EventAction::RemoveOrphan,
            outcome: sandboxd::store::EventOutcome::Ok,
            error: Some("barrier"),
            actor: None,
            detail: None,
        };
        served.event(&barrier, Utc::now()).await.unwrap();
        assert_same(&served, &disk, &format!("round {round}")).await;
    }
}
