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
        let _ = std::process::Command::new("docker")
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
