//! Helpers of the warm-pool tests (`integration/warm.rs` and `warm_refill.rs`) and of the e2e
//! bench's warm figures (`benches/support/warm.rs`).

// Each binary that includes this file uses a part of it.
#![allow(dead_code)]

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::support::*;
use sandboxd::config::{ProfileSettings, Settings};
use sandboxd::pool::mounts::mounts_under;

/// Undoes every mount left under a test's directory (members outlive sandboxd by design),
/// after its containers are gone, however the test ends.
pub struct MountGuard(pub PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        let mut left = mounts_under(&self.0);
        left.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in left {
            let _ = rustix::mount::unmount(m.as_str(), rustix::mount::UnmountFlags::DETACH);
        }
    }
}

/// A warm pool of `min_idle` (at most `max`) under the test's directory, no egress rules.
pub fn warm(s: &mut Settings, min_idle: usize, max: usize) {
    let dir = s
        .sandbox
        .chats_root
        .parent()
        .expect("the test dir")
        .to_path_buf();
    s.warm_pool.min_idle = min_idle;
    s.warm_pool.max = max;
    s.warm_pool.root = dir.join("pool");
    s.sandbox.profiles.insert(
        "standard".into(),
        ProfileSettings {
            deny_cidrs: Vec::new(),
            ..Default::default()
        },
    );
}

pub async fn spawn_warm(min_idle: usize, max: usize) -> (TestApp, MountGuard) {
    let app = TestApp::spawn_with(|s| warm(s, min_idle, max)).await;
    let guard = MountGuard(app.dir.path().to_path_buf());
    (app, guard)
}

pub async fn idle(app: &TestApp) -> i64 {
    app.db_scalar("SELECT count(*) FROM pool_members WHERE state = 'idle'")
        .await
}

pub async fn wait_idle(app: &TestApp, n: i64) {
    wait_until(Duration::from_secs(60), "the pool filled", || async {
        (idle(app).await >= n).then_some(())
    })
    .await;
}

/// How each chat's start went (`warm`, or the cold reason), from the start events' detail.
pub async fn starts(app: &TestApp) -> Vec<(String, String)> {
    let (_, events) = app.get("/api/v1/sandboxes?limit=500").await;
    let mut out = Vec::new();
    for s in events["items"].as_array().cloned().unwrap_or_default() {
        let chat = s["chat_id"].as_str().unwrap_or_default().to_string();
        let (_, ev) = app.get(&format!("/api/v1/sandboxes/{chat}/events")).await;
        for e in ev.as_array().cloned().unwrap_or_default() {
            if e["action"] == "start" && e["outcome"] == "ok" {
                let detail: Value = e["detail"]
                    .as_str()
                    .and_then(|d| serde_json::from_str(d).ok())
                    .unwrap_or_else(|| e["detail"].clone());
                let how = detail["start"].as_str().unwrap_or("?").to_string();
                out.push((chat.clone(), how));
            }
        }
    }
    out
}

pub async fn exec(app: &TestApp, chat: &str, script: &str) -> String {
    let (status, out) = app
        .post_json(
            &format!("/api/v1/sandboxes/{chat}/exec"),
            &json!({"command": ["sh", "-c", script]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{out}");
    assert_eq!(out["exit_code"], 0, "{out}");
    out["stdout"].as_str().unwrap_or_default().to_string()
}

/// Every live chat runs in exactly one container of its own, and no container of the
/// instance is anyone else's but an unclaimed pool member's.
pub async fn assert_one_container_per_chat(app: &TestApp) {
    let (_, list) = app.get("/api/v1/sandboxes?limit=500").await;
    let mut ids = HashSet::new();
    for s in list["items"].as_array().cloned().unwrap_or_default() {
        assert_eq!(s["phase"], "running", "{s}");
        let id = s["container_id"].as_str().expect("id").to_string();
        assert!(ids.insert(id.clone()), "two chats share {id}");
    }
    let containers = app.containers().await;
    let running: Vec<_> = containers
        .iter()
        .filter(|c| c.state == Some(bollard::models::ContainerSummaryStateEnum::RUNNING))
        .collect();
    for id in &ids {
        assert!(
            running.iter().any(|c| c.id.as_deref() == Some(id.as_str())),
            "{id} does not run"
        );
    }
    let unclaimed = app
        .db_scalar("SELECT count(*) FROM pool_members WHERE state IN ('idle', 'starting')")
        .await;
    let others: Vec<_> = running
        .iter()
        .filter(|c| !ids.contains(c.id.as_deref().unwrap_or_default()))
        .collect();
    for c in &others {
        let labels = c.labels.clone().unwrap_or_default();
        assert!(
            labels.contains_key("sandboxd.pool_slot"),
            "a running container no chat has and no pool member is: {c:?}"
        );
    }
    assert!(
        others.len() as i64 <= unclaimed,
        "{} members run, {unclaimed} unclaimed",
        others.len()
    );
}
