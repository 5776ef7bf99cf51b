//! Many requests at once: one container per chat, no matter what.

use reqwest::StatusCode;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_creates_for_one_chat_make_exactly_one_container() {
    let app = TestApp::spawn().await;
    let chat = new_chat();
    let vol = app.volume("c");
    let calls = (0..50).map(|_| app.create(&chat, "agent", &vol));
    let results = futures::future::join_all(calls).await;
    let first = &results[0].1;
    for (status, body) in &results {
        assert_eq!(*status, StatusCode::OK, "{body}");
        assert_eq!(body["session_id"], first["session_id"]);
        assert_eq!(body["container_id"], first["container_id"]);
    }
    assert_eq!(app.containers().await.len(), 1);
    assert_eq!(app.db_scalar("SELECT count(*) FROM sandboxes").await, 1);
    assert_eq!(
        app.db_scalar("SELECT count(*) FROM sandbox_events WHERE action = 'session_created'")
            .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_chats_at_once_all_run() {
    let app = TestApp::spawn().await;
    let vol = app.volume("many");
    let chats: Vec<String> = (0..50).map(|_| new_chat()).collect();
    let calls = chats.iter().map(|c| app.create(c, "agent", &vol));
    let results = futures::future::join_all(calls).await;
    for (status, body) in &results {
        assert_eq!(*status, StatusCode::OK, "{body}");
    }
    let cs = app.containers().await;
    assert_eq!(cs.len(), 50);
    assert!(cs
        .iter()
        .all(|c| c.state == Some(bollard::models::ContainerSummaryStateEnum::RUNNING)));
    assert_eq!(
        app.db_scalar("SELECT count(*) FROM sandboxes WHERE phase = 'running'")
            .await,
        50
    );
    // Nothing left to do: a few more passes change nothing.
    app.wait_for_passes(3).await;
    let again = app.containers().await;
    let ids = |v: &[bollard::models::ContainerSummary]| {
        let mut ids: Vec<_> = v.iter().map(|c| c.id.clone()).collect();
        ids.sort();
        ids
    };
    assert_eq!(ids(&cs), ids(&again));
}
