//! Warm-pool refill under a steady load. Alone in its binary (cargo runs test binaries one
//! after another), so the engine's start times are this test's own and not the rest of the
//! suite's: what it measures is whether the refill keeps up, not how loaded CI is.

#[path = "integration/support.rs"]
mod support;
#[path = "integration/warm_support.rs"]
mod warm_support;

use std::time::Duration;

use reqwest::StatusCode;
use support::*;
use warm_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refill_keeps_the_pool_ahead_of_two_creates_a_second() {
    let (app, _mounts) = spawn_warm(3, 6).await;
    wait_idle(&app, 3).await;
    let mut lowest = i64::MAX;
    for _ in 0..20 {
        let tick = tokio::time::Instant::now();
        let chat = new_chat();
        let (status, body) = app.create(&chat, "a", &app.volume(&chat)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        lowest = lowest.min(idle(&app).await);
        tokio::time::sleep_until(tick + Duration::from_millis(500)).await;
    }
    let how = starts(&app).await;
    let cold: Vec<_> = how.iter().filter(|(_, h)| h != "warm").collect();
    assert!(
        cold.is_empty(),
        "every create at 2/s was warm: {cold:?} (lowest idle {lowest})"
    );
    assert_one_container_per_chat(&app).await;
}
