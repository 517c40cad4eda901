//! The real-time stream through real processes: two API replicas on one database and
//! namespace, a generator and a sender. A WebSocket client of the second API (the key
//! given as a subprotocol, as a browser does) sees every event of a task submitted
//! through the first, whichever replica applied it, for a task with no `webhook_url`;
//! SSE resumes after `Last-Event-ID` and a WebSocket after `resume_after`, with nothing
//! lost or repeated.

use std::time::Duration;

use conduit_testkit::Stack;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::{
    tungstenite::{client::IntoClientRequest, http::HeaderValue, Message},
    MaybeTlsStream, WebSocketStream,
};

const WAIT: Duration = Duration::from_secs(60);

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Opens `/v1/stream` on `base` (`http://127.0.0.1:port`), authenticated by
/// `Authorization: Bearer` or, with `as_subprotocol`, by `conduit.key.<key>`.
async fn ws_open(base: &str, key: &str, as_subprotocol: bool) -> Ws {
    let url = format!("{}/v1/stream", base.replacen("http://", "ws://", 1));
    let mut req = url.into_client_request().expect("WebSocket request");
    let (name, value) = if as_subprotocol {
        (
            "sec-websocket-protocol",
            format!("conduit.v1, conduit.key.{key}"),
        )
    } else {
        ("authorization", format!("Bearer {key}"))
    };
    req.headers_mut()
        .insert(name, HeaderValue::from_str(&value).expect("header value"));
    let (ws, response) = tokio_tungstenite::connect_async(req)
        .await
        .expect("WebSocket upgrade");
    if as_subprotocol {
        assert_eq!(
            response.headers()["sec-websocket-protocol"],
            "conduit.v1",
            "the server selects conduit.v1 and never echoes the key"
        );
    }
    ws
}

/// The next event frame, pings skipped.
async fn ws_next(ws: &mut Ws) -> Value {
    loop {
        let frame = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a stream event in time")
            .expect("the socket is open")
            .expect("a frame");
        match frame {
            Message::Text(text) => return serde_json::from_str(&text).expect("event JSON"),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

/// `(id, type)` of the events of `task` up to and including its terminal one.
async fn ws_until_terminal(ws: &mut Ws, task: &str) -> Vec<(String, String)> {
    let mut got = Vec::new();
    loop {
        let event = ws_next(ws).await;
        if event["data"]["task_id"] != task {
            continue;
        }
        let kind = event["type"].as_str().unwrap_or_default().to_owned();
        got.push((
            event["id"].as_str().unwrap_or_default().to_owned(),
            kind.clone(),
        ));
        if kind != "progress" {
            return got;
        }
    }
}

/// `(id, event)` of every SSE record of `task` on `base` after `last_event_id`, until
/// the server ends the stream (after the terminal event).
async fn sse_all(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    task: &str,
    last_event_id: &str,
) -> Vec<(String, String)> {
    let mut response = http
        .get(format!("{base}/v1/videos/generations/tasks/{task}/events"))
        .bearer_auth(key)
        .header("Last-Event-ID", last_event_id)
        .send()
        .await
        .expect("SSE request");
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"]
            .to_str()
            .unwrap_or_default(),
        "text/event-stream"
    );
    let mut text = String::new();
    while let Some(chunk) = tokio::time::timeout(WAIT, response.chunk())
        .await
        .expect("an SSE chunk in time")
        .expect("reading SSE")
    {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    text.split("\n\n")
        .filter_map(|block| {
            let field = |name: &str| {
                block
                    .lines()
                    .find_map(|l| l.strip_prefix(name).map(str::to_owned))
            };
            Some((field("id: ")?, field("event: ")?))
        })
        .collect()
}

#[tokio::test]
async fn two_api_processes_stream_every_event_with_exact_resume() {
    let stack = Stack::start().await;
    let mut second = stack.spawn_api(1).await;
    let second_base = second.url("");

    // A client of the second replica, authenticated the way a browser can.
    let mut live = ws_open(&second_base, &stack.key, true).await;
    // A task with no webhook_url, submitted through the first replica; a render of a
    // few seconds sends progress.
    let task = stack
        .submit_ok(&json!({
            "model": "local-video",
            "prompt": "a lighthouse streamed to two replicas",
            "duration": 12,
            "fps": 24,
            "size": "1280x720",
        }))
        .await;
    let events = ws_until_terminal(&mut live, &task).await;
    assert_eq!(
        events.last().map(|e| e.1.as_str()),
        Some("completed"),
        "{events:?}"
    );
    assert!(
        events.len() >= 2,
        "no progress before the terminal event: {events:?}"
    );
    let ids: Vec<&str> = events.iter().map(|e| e.0.as_str()).collect();
    let mut unique = ids.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "an event came twice: {events:?}");

    // SSE on the first replica resumes after the first event: exactly the rest.
    let rest = sse_all(&stack.http, &stack.api_url(""), &stack.key, &task, ids[0]).await;
    assert_eq!(rest, events[1..], "SSE resume after {}", ids[0]);

    // A WebSocket on the first replica, header-authenticated, following only this task
    // and resuming after the first event: exactly the rest, in order.
    let mut resumed = ws_open(&stack.api_url(""), &stack.key, false).await;
    resumed
        .send(Message::Text(
            json!({"subscribe": [task], "resume_after": ids[0]})
                .to_string()
                .into(),
        ))
        .await
        .expect("send subscribe and resume");
    let again = ws_until_terminal(&mut resumed, &task).await;
    assert_eq!(again, events[1..], "WebSocket resume after {}", ids[0]);

    second.terminate(Stack::STOP_GRACE);
    stack.stop().await;
}
