//! The real-time stream: SSE per task and the WebSocket per key, with history, resume,
//! subscribe, subprotocol auth, a second API process, and slow clients.

use std::time::Duration;

use conduit_core::messages::StatusKind;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::{
    tungstenite::{
        client::IntoClientRequest,
        http::HeaderValue,
        protocol::{frame::coding::CloseCode, Message},
    },
    MaybeTlsStream, WebSocketStream,
};
use uuid::Uuid;

use crate::helpers::{body, eventually, start_api, TestApp, TIMEOUT};

/// One SSE record.
#[derive(Debug, Clone)]
struct Record {
    id: String,
    event: String,
    data: Value,
}

/// Reads SSE records from a streaming response.
struct SseReader {
    response: reqwest::Response,
    buffer: String,
}

impl SseReader {
    async fn open(port: u16, key: &str, task: Uuid, last_event_id: Option<&str>) -> Self {
        let mut req = reqwest::Client::new()
            .get(format!(
                "http://127.0.0.1:{port}/v1/videos/generations/tasks/{task}/events"
            ))
            .bearer_auth(key);
        if let Some(id) = last_event_id {
            req = req.header("Last-Event-ID", id);
        }
        let response = req.send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        Self {
            response,
            buffer: String::new(),
        }
    }

    /// The next record, or `None` when the stream ended.
    async fn next(&mut self) -> Option<Record> {
        loop {
            while let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let (mut id, mut event, mut data) = (None, None, None);
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        id = Some(v.to_owned());
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        event = Some(v.to_owned());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data = Some(serde_json::from_str(v).unwrap());
                    }
                }
                if let (Some(id), Some(event), Some(data)) = (id, event, data) {
                    return Some(Record { id, event, data });
                }
            }
            let chunk = tokio::time::timeout(TIMEOUT, self.response.chunk())
                .await
                .expect("an SSE chunk within the timeout")
                .expect("reading the SSE stream")?;
            self.buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }

    /// The records up to the end of the stream.
    async fn rest(&mut self) -> Vec<Record> {
        let mut out = Vec::new();
        while let Some(r) = self.next().await {
            out.push(r);
        }
        out
    }
}

fn progress(percent: u8) -> StatusKind {
    StatusKind::Progress {
        percent,
        message: format!("at {percent}"),
        eta_seconds: Some(10),
    }
}

fn processing() -> StatusKind {
    StatusKind::Processing {
        message: "started".into(),
    }
}

/// Waits until the task shows `percent`.
async fn at_progress(app: &TestApp, task: Uuid, percent: i64) {
    eventually("progress applied", TIMEOUT, || async {
        (app.task(task).await["progress"] == percent).then_some(())
    })
    .await;
}

#[tokio::test]
async fn sse_sends_history_then_live_events_and_resumes_after_last_event_id() {
    let app = TestApp::spawn().await;
    // No webhook_url: the stream alone follows the task.
    let task = app.submit_ok(&body()).await;
    app.status_event(task, 1, 0, processing()).await;
    app.status_event(task, 1, 1, progress(10)).await;
    app.status_event(task, 1, 2, progress(50)).await;
    at_progress(&app, task, 50).await;

    let mut sse = SseReader::open(app.port(), &app.key, task, None).await;
    let first = sse.next().await.unwrap();
    let second = sse.next().await.unwrap();
    assert_eq!(first.event, "progress");
    assert_eq!(first.data["progress_percentage"], 10);
    assert_eq!(first.data["task_id"], task.to_string());
    assert_eq!(first.data["status"], "processing");
    assert_eq!(first.data["webhook_type"], "video_generation_progress");
    assert_eq!(second.data["progress_percentage"], 50);
    assert!(first.id.starts_with("msg_") && first.id != second.id);

    // Live.
    app.status_event(task, 1, 3, progress(80)).await;
    let live = sse.next().await.unwrap();
    assert_eq!(live.data["progress_percentage"], 80);
    drop(sse);

    // While nobody listens: completion.
    app.status_event(
        task,
        1,
        4,
        StatusKind::Completed {
            video_key: format!("{task}.mp4"),
            generation_duration_seconds: 3.5,
            model: None,
        },
    )
    .await;
    app.wait_status(task, "completed").await;

    // Resume after the event seen last: exactly the rest, then the stream ends.
    let mut resumed = SseReader::open(app.port(), &app.key, task, Some(&second.id)).await;
    let rest = resumed.rest().await;
    let kinds: Vec<_> = rest.iter().map(|r| r.event.as_str()).collect();
    assert_eq!(kinds, ["progress", "completed"], "{rest:?}");
    assert_eq!(rest[0].id, live.id);
    assert_eq!(rest[1].data["status"], "completed");
    assert_eq!(rest[1].data["webhook_type"], "video_generation_completed");
    assert!(rest[1].data["video_url"]
        .as_str()
        .unwrap()
        .contains(&task.to_string()));

    // A terminal task: its whole history, and the stream ends at once.
    let all = SseReader::open(app.port(), &app.key, task, None)
        .await
        .rest()
        .await;
    assert_eq!(all.len(), 4);
    // Resuming after the terminal event: nothing, and it ends.
    let none = SseReader::open(app.port(), &app.key, task, Some(&rest[1].id))
        .await
        .rest()
        .await;
    assert!(none.is_empty(), "{none:?}");

    // Another key's task and an unknown Last-Event-ID are refused.
    let other = app.new_key("other").await;
    let r = reqwest::Client::new()
        .get(app.url(&format!("/v1/videos/generations/tasks/{task}/events")))
        .bearer_auth(&other.key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = reqwest::Client::new()
        .get(app.url(&format!("/v1/videos/generations/tasks/{task}/events")))
        .bearer_auth(&app.key)
        .header("Last-Event-ID", "msg_nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    app.stop().await;
}

#[tokio::test]
async fn stream_ids_are_the_webhook_ids_and_ignore_webhook_events() {
    let app = TestApp::spawn().await;
    let mut b = body();
    b["webhook_url"] = json!("https://example.com/hook");
    b["webhook_events"] = json!(["completed", "cancelled"]);
    let task = app.submit_ok(&b).await;
    app.status_event(task, 1, 0, processing()).await;
    app.status_event(task, 1, 1, progress(30)).await;
    at_progress(&app, task, 30).await;
    let (status, _) = app.delete(&format!("/v1/videos/generations/{task}")).await;
    assert_eq!(status, 204);
    let events = SseReader::open(app.port(), &app.key, task, None)
        .await
        .rest()
        .await;
    let kinds: Vec<_> = events.iter().map(|r| r.event.as_str()).collect();
    assert_eq!(kinds, ["progress", "cancelled"]);
    assert_eq!(
        events[1].data["error"],
        "Video generation was cancelled by user request"
    );
    // The webhook carried only the subscribed event, under the same id.
    let log = app.webhook_log(task).await;
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(log[0]["event"], "cancelled");
    assert_eq!(log[0]["webhook_id"], events[1].id.as_str());
    app.stop().await;
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

async fn ws_connect(port: u16, key: Option<&str>, protocols: Option<&str>) -> Result<Ws, u16> {
    let mut req = format!("ws://127.0.0.1:{port}/v1/stream")
        .into_client_request()
        .unwrap();
    if let Some(key) = key {
        req.headers_mut().insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {key}")).unwrap(),
        );
    }
    if let Some(p) = protocols {
        req.headers_mut()
            .insert("sec-websocket-protocol", HeaderValue::from_str(p).unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, response)) => {
            if protocols.is_some() {
                assert_eq!(
                    response.headers()["sec-websocket-protocol"],
                    "conduit.v1",
                    "the server selects conduit.v1 and never echoes the key"
                );
            }
            Ok(ws)
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            Err(response.status().as_u16())
        }
        Err(err) => panic!("WebSocket connect failed: {err}"),
    }
}

/// The next event frame, skipping pings.
async fn ws_next(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(TIMEOUT, ws.next())
            .await
            .expect("a frame within the timeout")
            .expect("socket open")
            .expect("frame");
        match msg {
            Message::Text(text) => return serde_json::from_str(&text).unwrap(),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

/// Asserts no event frame arrives within `wait`.
async fn ws_quiet(ws: &mut Ws, wait: Duration) {
    if let Ok(Some(Ok(Message::Text(text)))) = tokio::time::timeout(wait, ws.next()).await {
        panic!("unexpected event {text}");
    }
}

async fn ws_send(ws: &mut Ws, value: Value) {
    ws.send(Message::Text(value.to_string().into()))
        .await
        .unwrap();
}

#[tokio::test]
async fn websocket_subscribes_resumes_and_takes_the_key_as_a_subprotocol() {
    let app = TestApp::spawn().await;
    // A wrong or missing key: 401 before the upgrade.
    assert_eq!(ws_connect(app.port(), None, None).await.err(), Some(401));
    assert_eq!(
        ws_connect(
            app.port(),
            None,
            Some("conduit.v1, conduit.key.condt_wrongwrongwrongwrongwrong")
        )
        .await
        .err(),
        Some(401)
    );

    let a = app.submit_ok(&body()).await;
    let b = app.submit_ok(&body()).await;
    // An event from before the connection is not sent: live only.
    app.status_event(a, 1, 0, progress(5)).await;
    at_progress(&app, a, 5).await;

    let mut ws = ws_connect(app.port(), Some(&app.key), None).await.unwrap();
    app.status_event(a, 1, 1, progress(10)).await;
    let e1 = ws_next(&mut ws).await;
    assert_eq!(e1["type"], "progress");
    assert_eq!(e1["data"]["task_id"], a.to_string());
    assert_eq!(e1["data"]["progress_percentage"], 10);
    app.status_event(b, 1, 0, progress(20)).await;
    let e2 = ws_next(&mut ws).await;
    assert_eq!(e2["data"]["task_id"], b.to_string());

    // Narrowed to task a.
    ws_send(&mut ws, json!({"subscribe": [a]})).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    app.status_event(b, 1, 1, progress(30)).await;
    at_progress(&app, b, 30).await;
    app.status_event(a, 1, 2, progress(40)).await;
    let e3 = ws_next(&mut ws).await;
    assert_eq!(e3["data"]["task_id"], a.to_string());
    assert_eq!(e3["data"]["progress_percentage"], 40);
    ws.close(None).await.unwrap();

    // Missed while away.
    app.status_event(a, 1, 3, progress(60)).await;
    at_progress(&app, a, 60).await;
    app.status_event(b, 1, 2, progress(70)).await;
    at_progress(&app, b, 70).await;

    // A browser's way in: the key as a subprotocol. Resume after e3: exactly what
    // followed it, of every task, in order, then live.
    let protocols = format!("conduit.v1, conduit.key.{}", app.key);
    let mut ws = ws_connect(app.port(), None, Some(&protocols))
        .await
        .unwrap();
    ws_send(&mut ws, json!({"resume_after": e3["id"]})).await;
    let r1 = ws_next(&mut ws).await;
    let r2 = ws_next(&mut ws).await;
    assert_eq!(
        (
            r1["data"]["task_id"].as_str(),
            r1["data"]["progress_percentage"].as_i64()
        ),
        (Some(a.to_string().as_str()), Some(60))
    );
    assert_eq!(
        (
            r2["data"]["task_id"].as_str(),
            r2["data"]["progress_percentage"].as_i64()
        ),
        (Some(b.to_string().as_str()), Some(70))
    );
    app.status_event(
        a,
        1,
        4,
        StatusKind::Failed {
            error: "boom".into(),
        },
    )
    .await;
    let done = ws_next(&mut ws).await;
    assert_eq!(done["type"], "failed");
    assert_eq!(done["data"]["error"], "boom");
    ws_quiet(&mut ws, Duration::from_millis(500)).await;

    // Resume narrowed to task b: only b's events after e1.
    let mut ws2 = ws_connect(app.port(), Some(&app.key), None).await.unwrap();
    ws_send(
        &mut ws2,
        json!({"subscribe": [b], "resume_after": e1["id"]}),
    )
    .await;
    let percents: Vec<i64> = [
        ws_next(&mut ws2).await,
        ws_next(&mut ws2).await,
        ws_next(&mut ws2).await,
    ]
    .iter()
    .map(|e| e["data"]["progress_percentage"].as_i64().unwrap())
    .collect();
    assert_eq!(percents, [20, 30, 70]);
    ws_quiet(&mut ws2, Duration::from_millis(300)).await;

    // An unknown event id closes the connection with 4410.
    let mut ws3 = ws_connect(app.port(), Some(&app.key), None).await.unwrap();
    ws_send(&mut ws3, json!({"resume_after": "msg_unknown"})).await;
    match tokio::time::timeout(TIMEOUT, ws3.next()).await.unwrap() {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), 4410),
        other => panic!("expected a close, got {other:?}"),
    }
    app.stop().await;
}

#[tokio::test]
async fn a_client_of_a_second_api_process_sees_events_applied_by_the_first() {
    let app = TestApp::spawn().await;
    let second = start_api(app.settings.clone()).await;
    let task = app.submit_ok(&body()).await;
    let mut ws = ws_connect(second.port, Some(&app.key), None).await.unwrap();
    let mut sse = SseReader::open(second.port, &app.key, task, None).await;
    app.status_event(task, 1, 0, processing()).await;
    app.status_event(task, 1, 1, progress(25)).await;
    // The cancel is applied by the first process's ledger.
    at_progress(&app, task, 25).await;
    let (status, _) = app.delete(&format!("/v1/videos/generations/{task}")).await;
    assert_eq!(status, 204);
    let p = ws_next(&mut ws).await;
    let c = ws_next(&mut ws).await;
    assert_eq!(p["type"], "progress");
    assert_eq!(c["type"], "cancelled");
    let events = sse.rest().await;
    assert_eq!(
        events.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
        [p["id"].as_str().unwrap(), c["id"].as_str().unwrap()]
    );
    second.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn events_applied_at_once_by_two_processes_resume_with_no_gap_or_repeat() {
    let app = TestApp::spawn().await;
    // Both processes consume the status queue, so both ledgers apply events and both
    // sequencers number them.
    let second = start_api(app.settings.clone()).await;
    let mut tasks = Vec::new();
    for _ in 0..60 {
        tasks.push(app.submit_ok(&body()).await);
    }
    let mut live = ws_connect(second.port, Some(&app.key), None).await.unwrap();
    for task in &tasks {
        app.status_event(*task, 1, 1, progress(10)).await;
    }
    let mut frames = Vec::new();
    for _ in 0..tasks.len() {
        frames.push(ws_next(&mut live).await["id"].as_str().unwrap().to_owned());
    }
    ws_quiet(&mut live, Duration::from_millis(300)).await;
    let mut unique = frames.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), tasks.len(), "no event twice");
    assert_eq!(
        app.count("SELECT count(*) FROM stream_events WHERE position IS NULL")
            .await,
        0
    );

    // Resuming on the other process after the tenth: exactly the rest, in the same order.
    let mut resumed = ws_connect(app.port(), Some(&app.key), None).await.unwrap();
    ws_send(&mut resumed, json!({"resume_after": frames[9]})).await;
    let mut rest = Vec::new();
    for _ in 10..frames.len() {
        rest.push(
            ws_next(&mut resumed).await["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    assert_eq!(rest, frames[10..]);
    ws_quiet(&mut resumed, Duration::from_millis(300)).await;
    second.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn a_websocket_client_too_slow_to_read_is_closed_with_1008() {
    let app = TestApp::spawn().await;
    let task = app.submit_ok(&body()).await;
    // A client that reads nothing, with a small receive buffer so the server's
    // buffers fill after a few megabytes rather than many.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket
        .connect(format!("127.0.0.1:{}", app.port()).parse().unwrap())
        .await
        .unwrap();
    let mut req = format!("ws://127.0.0.1:{}/v1/stream", app.port())
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("x-api-key", HeaderValue::from_str(&app.key).unwrap());
    let (mut ws, _) = tokio_tungstenite::client_async(req, MaybeTlsStream::Plain(stream))
        .await
        .unwrap();
    let big = "x".repeat(16 * 1024);
    let slow_closed = || async {
        let r = app.http.get(app.url("/metrics")).send().await.ok()?;
        let metrics = r.text().await.ok()?;
        metrics
            .lines()
            .any(|l| {
                l.starts_with("conduit_api_stream_slow_disconnects_total{kind=\"websocket\"}")
                    && !l.ends_with(" 0")
            })
            .then_some(())
    };
    let mut seq = 0;
    let mut sent = 0;
    while slow_closed().await.is_none() {
        assert!(sent < 3000, "the slow client was never closed");
        for _ in 0..50 {
            seq += 1;
            app.status_event(
                task,
                1,
                seq,
                StatusKind::Progress {
                    percent: 50,
                    message: big.clone(),
                    eta_seconds: None,
                },
            )
            .await;
        }
        sent += 50;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Now read: what was buffered, then a close with 1008.
    let mut frames = 0;
    loop {
        match tokio::time::timeout(TIMEOUT, ws.next()).await.unwrap() {
            Some(Ok(Message::Text(_))) => frames += 1,
            Some(Ok(Message::Close(frame))) => {
                let frame = frame.expect("a close frame with a code");
                assert_eq!(frame.code, CloseCode::Policy);
                break;
            }
            Some(Ok(_)) => {}
            other => panic!("expected a close with 1008 after {frames} frames, got {other:?}"),
        }
    }
    assert!(frames < sent as usize);
    app.stop().await;
}
