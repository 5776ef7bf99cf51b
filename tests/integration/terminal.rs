//! Terminals over WebSocket against the real engine: the size a terminal is opened with and
//! resized to (`stty size`), hostile input, a dropped socket re-attached by id with its last
//! output replayed, a take-over, a close that kills the whole tree, the token in the first
//! message, and a terminal closed when its grace period runs out.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::dataplane::{count_processes, running_chat};
use crate::support::*;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(app: &TestApp, chat: &str, query: &str, token: Option<&str>) -> Socket {
    let url = format!("ws://{}/api/v1/sandboxes/{chat}/pty?{query}", app.addr);
    let mut request = url.into_client_request().expect("request");
    if let Some(t) = token {
        request
            .headers_mut()
            .insert("X-API-Token", t.parse().expect("header"));
    }
    let (socket, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("upgrade");
    socket
}

/// The next control message (output frames before it are skipped).
async fn control(socket: &mut Socket) -> Value {
    loop {
        match next(socket).await {
            Message::Text(t) => return serde_json::from_str(t.as_str()).expect("JSON control"),
            Message::Close(_) => panic!("closed before a control message"),
            _ => {}
        }
    }
}

async fn next(socket: &mut Socket) -> Message {
    tokio::time::timeout(Duration::from_secs(20), socket.next())
        .await
        .expect("a frame in time")
        .expect("the socket is open")
        .expect("a frame")
}

/// Reads output until it contains `wanted`; all output read.
async fn output_until(socket: &mut Socket, wanted: &str) -> String {
    let mut seen = String::new();
    while !seen.contains(wanted) {
        match next(socket).await {
            Message::Binary(b) => seen.push_str(&String::from_utf8_lossy(&b)),
            Message::Text(t) => {
                let v: Value = serde_json::from_str(t.as_str()).expect("JSON");
                assert_ne!(v["type"], "exit", "ended before {wanted:?}: {seen}");
            }
            Message::Close(_) => panic!("closed before {wanted:?}: {seen}"),
            _ => {}
        }
    }
    seen
}

async fn keys(socket: &mut Socket, text: &str) {
    socket
        .send(Message::Binary(text.as_bytes().to_vec().into()))
        .await
        .expect("send");
}

async fn send_control(socket: &mut Socket, v: Value) {
    socket
        .send(Message::Text(v.to_string().into()))
        .await
        .expect("send");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_is_sized_resized_reattached_and_closed_with_its_tree() {
    let app = TestApp::spawn().await;
    let chat = running_chat(&app).await;
    let mut term = connect(&app, &chat, "cols=100&rows=30", None).await;
    let ready = control(&mut term).await;
    assert_eq!(ready["type"], "ready", "{ready}");
    assert_eq!(
        (ready["cols"].as_u64(), ready["rows"].as_u64()),
        (Some(100), Some(30))
    );
    assert!(ready["pid"].as_u64().is_some_and(|p| p > 1), "{ready}");
    let id = ready["terminal_id"].as_str().expect("id").to_string();

    // The size it was opened with, then a resize.
    keys(&mut term, "stty size\n").await;
    output_until(&mut term, "30 100").await;
    send_control(
        &mut term,
        json!({"type": "resize", "cols": 120, "rows": 40}),
    )
    .await;
    keys(&mut term, "stty size\n").await;
    output_until(&mut term, "40 120").await;

    // Hostile input: a huge resize is refused and changes nothing; bytes that are not
    // UTF-8 reach the TTY without harm; unknown control messages are errors, not closes.
    send_control(
        &mut term,
        json!({"type": "resize", "cols": 100000, "rows": 70000}),
    )
    .await;
    let err = control(&mut term).await;
    assert_eq!(err["type"], "error", "{err}");
    keys(&mut term, "\u{0}").await;
    term.send(Message::Binary(vec![0xff, 0xfe, b'\n'].into()))
        .await
        .expect("send");
    send_control(&mut term, json!({"type": "reboot"})).await;
    assert_eq!(control(&mut term).await["type"], "error");
    keys(&mut term, "stty size; sleep 1007 & echo mark-$((6*7))\n").await;
    let seen = output_until(&mut term, "mark-42").await;
    assert!(seen.contains("40 120"), "{seen}");
    wait_until(Duration::from_secs(10), "the background sleep", || {
        let (app, chat) = (&app, &chat);
        async move { (count_processes(app, chat, "sleep1007").await == 1).then_some(()) }
    })
    .await;

    // The socket drops; the terminal waits. A re-attach by id replays the last output and
    // types into the same shell.
    drop(term);
    let mut again = connect(&app, &chat, &format!("terminal_id={id}"), None).await;
    let ready = control(&mut again).await;
    assert_eq!(ready["terminal_id"], id.as_str());
    assert_eq!(ready["cols"].as_u64(), Some(120));
    output_until(&mut again, "mark-42").await;
    keys(&mut again, "echo again-$((2+3))\n").await;
    output_until(&mut again, "again-5").await;

    // A third socket takes it over; the second is told and closed.
    let mut third = connect(&app, &chat, &format!("terminal_id={id}"), None).await;
    assert_eq!(control(&mut third).await["type"], "ready");
    assert_eq!(control(&mut again).await["type"], "taken_over");

    // Close: the whole tree goes, the background sleep with it.
    send_control(&mut third, json!({"type": "close"})).await;
    let exit = control(&mut third).await;
    assert_eq!(exit["type"], "exit", "{exit}");
    assert_eq!(exit["reason"], "closed");
    assert_eq!(count_processes(&app, &chat, "sleep1007").await, 0);
    let r = app
        .client
        .get(app.url(&format!("/api/v1/sandboxes/{chat}/pty?terminal_id={id}")))
        .header("Connection", "upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    // Opened and closed, audited with byte counts, never contents.
    let closed = app
        .db_scalar("SELECT count(*) FROM sandbox_events WHERE action = 'terminal' AND detail LIKE '%\"closed\":\"closed\"%' AND detail NOT LIKE '%mark%'")
        .await;
    assert_eq!(closed, 1);

    // Sizes out of range and a plain GET are HTTP errors, before any upgrade.
    let (status, body) = app
        .get(&format!("/api/v1/sandboxes/{chat}/pty?cols=65536"))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (status, body) = app.get(&format!("/api/v1/sandboxes/{chat}/pty")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_sends_the_token_first_and_an_abandoned_terminal_is_closed_after_its_grace() {
    const TOKEN: &str = "pty-s3cret";
    let mut app = TestApp::spawn_with(|s| {
        s.security.api_token = Some(TOKEN.into());
        s.data_plane.terminal_grace_seconds = 1;
    })
    .await;
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("X-API-Token", TOKEN.parse().expect("header"));
    app.client = reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .expect("client");
    let chat = running_chat(&app).await;

    // A wrong token in the first message: an error, and the socket is closed.
    let mut wrong = connect(&app, &chat, "", None).await;
    send_control(&mut wrong, json!({"type": "auth", "token": "guess"})).await;
    assert_eq!(control(&mut wrong).await["detail"], "unauthorized");
    match next(&mut wrong).await {
        Message::Close(Some(frame)) => assert_eq!(u16::from(frame.code), 1008),
        other => panic!("expected a close, got {other:?}"),
    }
    // Only the terminal route takes its token late: an attachment named `pty` with an
    // upgrade header and no token is refused as any request without one.
    let r = reqwest::Client::new()
        .put(app.url(&format!("/api/v1/chats/{}/files/pty", uuid::Uuid::new_v4())))
        .header("Connection", "upgrade")
        .header("Upgrade", "websocket")
        .body("x")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // A wrong token in the header is refused before any upgrade.
    let url = format!("ws://{}/api/v1/sandboxes/{chat}/pty", app.addr);
    let mut request = url.into_client_request().expect("request");
    request
        .headers_mut()
        .insert("X-API-Token", "guess".parse().expect("header"));
    assert!(tokio_tungstenite::connect_async(request).await.is_err());

    // The right one, first: a terminal.
    let mut term = connect(&app, &chat, "", None).await;
    send_control(&mut term, json!({"type": "auth", "token": TOKEN})).await;
    let ready = control(&mut term).await;
    assert_eq!(ready["type"], "ready", "{ready}");
    keys(&mut term, "sleep 1008 & echo started\n").await;
    output_until(&mut term, "started").await;
    wait_until(Duration::from_secs(10), "the background sleep", || {
        let (app, chat) = (&app, &chat);
        async move { (count_processes(app, chat, "sleep1008").await == 1).then_some(()) }
    })
    .await;

    // Abandoned: after its grace the terminal is closed and its tree killed.
    drop(term);
    wait_until(Duration::from_secs(20), "the grace period's close", || {
        let app = &app;
        async move {
            let n = app
                .db_scalar("SELECT count(*) FROM sandbox_events WHERE action = 'terminal' AND detail LIKE '%grace_expired%'")
                .await;
            (n == 1).then_some(())
        }
    })
    .await;
    assert_eq!(count_processes(&app, &chat, "sleep1008").await, 0);
}
