//! Retries run on time: a failed start is tried again at its backoff, never at the (much
//! later) resync.

use std::time::{Duration, Instant};

use reqwest::StatusCode;

use crate::support::*;

/// Tags the test image under another name (what `docker tag` does), and removes the name again
/// when dropped.
struct TaggedImage(String);

impl TaggedImage {
    async fn tag(docker: &bollard::Docker, name: &str) -> Self {
        let (repo, tag) = name.rsplit_once(':').expect("name:tag");
        docker
            .tag_image(
                TEST_IMAGE,
                Some(
                    bollard::query_parameters::TagImageOptionsBuilder::new()
                        .repo(repo)
                        .tag(tag)
                        .build(),
                ),
            )
            .await
            .expect("docker tag");
        Self(name.to_string())
    }
}

impl Drop for TaggedImage {
    fn drop(&mut self) {
        let _ = std::process::Command::new(engine().cli())
            .args(["rmi", &self.0])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_start_is_retried_at_its_backoff_not_at_the_resync() {
    let image = format!("sandboxd/late-{}:1", unique_instance());
    let app = TestApp::spawn_with(|s| {
        s.sandbox.image = image.clone();
        // The resync is far away: only the retry at `next_attempt_at` can start it in time.
        s.sandbox.cleanup_interval_seconds = 60;
        s.controller.backoff_initial_ms = 500;
        s.controller.backoff_max_seconds = 1;
    })
    .await;
    let chat = new_chat();
    let (status, body) = app.create(&chat, "a", &app.volume("r")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let _image = TaggedImage::tag(&app.docker, &image).await;
    let appeared = Instant::now();
    // Retries come at most 1 s apart; the resync only after 60 s. Twenty seconds is far from
    // both: a retry that waits for the resync fails here.
    wait_until(
        Duration::from_secs(20),
        "running after the image appeared",
        || async {
            let (_, v) = app.get(&format!("/api/v1/sandboxes/{chat}")).await;
            (v["phase"] == "running").then_some(())
        },
    )
    .await;
    eprintln!("running {:?} after the image appeared", appeared.elapsed());
}

/// An image whose agent exits with code 1 a second after it starts: the test image with
/// another command (`docker commit --change`), removed again when dropped.
struct CrashingImage(String);

impl CrashingImage {
    fn build(name: &str) -> Self {
        let out = std::process::Command::new(engine().cli())
            .args(["create", TEST_IMAGE])
            .output()
            .expect("docker create");
        let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(out.status.success(), "docker create: {out:?}");
        let commit = std::process::Command::new(engine().cli())
            .args([
                "commit",
                "--change",
                r#"CMD ["/bin/sh","-c","sleep 1; exit 1"]"#,
                &id,
                name,
            ])
            .output()
            .expect("docker commit");
        let _ = std::process::Command::new(engine().cli())
            .args(["rm", "-f", &id])
            .output();
        assert!(commit.status.success(), "docker commit: {commit:?}");
        Self(name.to_string())
    }
}

impl Drop for CrashingImage {
    fn drop(&mut self) {
        let _ = std::process::Command::new(engine().cli())
            .args(["rmi", "-f", &self.0])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_looping_sandbox_is_restarted_at_growing_intervals() {
    use futures::StreamExt;
    let image = format!("sandboxd/crashloop-{}:1", unique_instance());
    let _image = CrashingImage::build(&image);
    let app = TestApp::spawn_with(|s| {
        s.sandbox.image = image.clone();
        s.controller.backoff_initial_ms = 500;
        s.controller.backoff_max_seconds = 8;
    })
    .await;
    let filters = std::collections::HashMap::from([
        ("type", vec!["container".to_string()]),
        ("event", vec!["start".to_string()]),
        (
            "label",
            vec![format!("sandboxd.instance={}", app.instance())],
        ),
    ]);
    let mut starts = Box::pin(
        app.docker.events(Some(
            bollard::query_parameters::EventsOptionsBuilder::new()
                .filters(&filters)
                .build(),
        )),
    );
    let chat = new_chat();
    let (status, body) = app.create(&chat, "a", &app.volume("c")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Over 20 s: count the starts the engine reports, and note each wait sandboxd schedules
    // (`next_attempt_at` − the time it was recorded, per crash count). The waits are what
    // sandboxd decides; the start-to-start intervals add the container's own 1 s and the
    // engine's start time, which a loaded engine stretches by seconds.
    let until = tokio::time::Instant::now() + Duration::from_secs(20);
    let poll = {
        let (client, url) = (
            app.client.clone(),
            app.url(&format!("/api/v1/sandboxes/{chat}")),
        );
        tokio::spawn(async move {
            let mut waits: Vec<(u64, Duration)> = Vec::new();
            while tokio::time::Instant::now() < until {
                if let Ok(r) = client.get(&url).send().await {
                    if let Ok(v) = r.json::<serde_json::Value>().await {
                        let at = |k: &str| {
                            v[k].as_str()
                                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                        };
                        let n = v["attempts"].as_u64().unwrap_or(0);
                        if let (Some(next), Some(set)) = (at("next_attempt_at"), at("updated_at")) {
                            if n > 0 && waits.last().is_none_or(|(m, _)| *m != n) {
                                waits.push((n, (next - set).to_std().unwrap_or_default()));
                            }
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            waits
        })
    };
    let mut starts_at = Vec::new();
    while let Ok(Some(Ok(_))) = tokio::time::timeout_at(until, starts.next()).await {
        starts_at.push(Instant::now());
    }
    let waits = poll.await.unwrap();
    let intervals: Vec<Duration> = starts_at.windows(2).map(|w| w[1] - w[0]).collect();
    eprintln!(
        "{} starts in 20 s, intervals {intervals:?}, scheduled waits {waits:?}",
        starts_at.len()
    );
    // Without backoff it was restarted every ≈ 1.3 s: about 15 starts in 20 s.
    assert!(
        (3..=9).contains(&starts_at.len()),
        "{} starts in 20 s, intervals {intervals:?}",
        starts_at.len()
    );
    // Each scheduled wait is at least the one before (it doubles; the jitter stays within the
    // doubling), and they grow.
    assert!(waits.len() >= 3, "waits {waits:?}");
    for w in waits.windows(2) {
        assert!(
            w[1].0 > w[0].0 && w[1].1 >= w[0].1,
            "waits must grow: {waits:?}"
        );
    }
    assert!(
        waits.last().map(|w| w.1) >= waits.first().map(|w| w.1 * 2),
        "waits must grow: {waits:?}"
    );
    // The loop is visible in the database and the API.
    let (_, v) = app.get(&format!("/api/v1/sandboxes/{chat}")).await;
    assert!(v["restarts"].as_u64() >= Some(3), "{v}");
    let exits = app
        .db_scalar("SELECT count(*) FROM sandbox_events WHERE action = 'exit' AND error LIKE 'exited with code 1 after %'")
        .await;
    assert!(exits >= 3, "{exits} exits recorded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_image_is_used_as_soon_as_it_appears() {
    let image = format!("sandboxd/appears-{}:1", unique_instance());
    let app = TestApp::spawn_with(|s| {
        s.sandbox.image = image.clone();
        s.sandbox.cleanup_interval_seconds = 60;
        // The first retry would come after 30 s and the resync after 60 s: only the engine's
        // report that the image appeared can start it sooner.
        s.controller.backoff_initial_ms = 30_000;
        s.controller.backoff_max_seconds = 60;
    })
    .await;
    let chat = new_chat();
    let (status, body) = app.create(&chat, "a", &app.volume("i")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let _image = TaggedImage::tag(&app.docker, &image).await;
    let appeared = Instant::now();
    wait_until(
        Duration::from_secs(15),
        "running once the image appeared",
        || async {
            let (_, v) = app.get(&format!("/api/v1/sandboxes/{chat}")).await;
            (v["phase"] == "running").then_some(())
        },
    )
    .await;
    eprintln!("running {:?} after the image appeared", appeared.elapsed());
}
