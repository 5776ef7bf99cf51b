//! A bounded load test on loopback: mixed create/get/delete requests at high concurrency over
//! many chats. No 5xx, no `database is locked`, and Docker ends up equal to the rows.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::json;

use crate::support::*;

pub struct LoadReport {
    pub statuses: BTreeMap<(String, u16), u64>,
    pub elapsed: Duration,
    pub locked: u64,
}

/// Sends `requests` requests at `concurrency` over `chats` chats: 45% create, 35% get,
/// 20% delete. Bounded by count; every request has a client timeout.
pub async fn run_load(
    app: &TestApp,
    requests: u64,
    concurrency: usize,
    chats: usize,
) -> LoadReport {
    let pool: Vec<String> = (0..chats).map(|_| new_chat()).collect();
    let vol = app.volume("load");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .expect("client");
    let counter = Arc::new(AtomicU64::new(0x9e37_79b9_7f4a_7c15));
    let locked = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let results: Vec<(String, u16)> = futures::stream::iter(0..requests)
        .map(|_| {
            let n = counter.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
            let mixed = n.wrapping_mul(0xbf58_476d_1ce4_e5b9) >> 7;
            let chat = pool[(mixed % chats as u64) as usize].clone();
            let dice = (mixed >> 20) % 100;
            let client = client.clone();
            let vol = vol.clone();
            let locked = locked.clone();
            let base = format!("http://{}", app.addr);
            async move {
                let (kind, r) = if dice < 45 {
                    let body =
                        json!({"chat_id": chat, "agent_id": "load", "volume_host_path": vol});
                    (
                        "create",
                        client
                            .post(format!("{base}/api/v1/create"))
                            .json(&body)
                            .send()
                            .await,
                    )
                } else if dice < 80 {
                    (
                        "get",
                        client
                            .get(format!("{base}/api/v1/sandboxes/{chat}"))
                            .send()
                            .await,
                    )
                } else {
                    (
                        "delete",
                        client
                            .delete(format!("{base}/api/v1/sandboxes/{chat}"))
                            .send()
                            .await,
                    )
                };
                let status = match r {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let text = r.text().await.unwrap_or_default();
                        if text.contains("database is locked") {
                            locked.fetch_add(1, Ordering::Relaxed);
                        }
                        if status >= 500
                            || (status == 409 && !text.contains("sandbox_deleted_while_starting"))
                        {
                            eprintln!("load: {kind} {chat} -> {status} {text}");
                            return (format!("{kind}: {text}"), status);
                        }
                        status
                    }
                    Err(_) => 0,
                };
                (kind.to_string(), status)
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let mut statuses = BTreeMap::new();
    for r in results {
        *statuses.entry(r).or_insert(0) += 1;
    }
    LoadReport {
        statuses,
        elapsed: started.elapsed(),
        locked: locked.load(Ordering::Relaxed),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_thousand_mixed_requests_at_concurrency_64_over_500_chats() {
    let app = TestApp::spawn_with(|s| {
        s.controller.create_wait_seconds = 120;
        s.controller.delete_wait_seconds = 120;
        s.sandbox.hardening.memory_mb = 64;
    })
    .await;
    let report = run_load(&app, 2000, 64, 500).await;
    eprintln!("load: {:?} in {:?}", report.statuses, report.elapsed);
    let bad: Vec<_> = report
        .statuses
        .iter()
        .filter(|((_, s), _)| *s >= 500 || *s == 0)
        .collect();
    assert!(bad.is_empty(), "server errors or dropped requests: {bad:?}");
    assert_eq!(report.locked, 0, "`database is locked` reached a client");
    for (kind, status) in report.statuses.keys() {
        let ok = match kind.as_str() {
            // 409 only when a concurrent delete of the same chat won (checked above).
            "create" => *status == 200 || *status == 409,
            "get" => *status == 200 || *status == 404,
            _ => *status == 200,
        };
        assert!(ok, "unexpected {kind} status {status}");
    }
    let (took, rows) = wait_converged(&app.settings, &app.docker, Duration::from_secs(120)).await;
    eprintln!(
        "load: {} rows, converged {took:?} after the last reply",
        rows.len()
    );
}
