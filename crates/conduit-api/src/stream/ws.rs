//! `GET /v1/stream`: a WebSocket carrying every event of the calling key's tasks as text
//! frames `{"id","type","data"}`. Live events only, until the client narrows them with
//! `{"subscribe":[task ids]}` or replays with `{"resume_after":"<event id>"}`.
//!
//! A browser cannot set headers on a WebSocket, so besides the usual headers the key may
//! come as the subprotocol `conduit.key.<key>` offered beside `conduit.v1`; the server
//! selects `conduit.v1` and never echoes the key. A wrong or missing key is a 401 before
//! the upgrade. Each connection is one small task on the HTTP worker that accepted it
//! (no thread, no unbounded buffer): a client too slow for its live events is closed
//! with 1008 and resumes with its last event id.

use std::{sync::Arc, time::Duration};

use actix_web::{http::header, web, HttpRequest, HttpResponse};
use actix_ws::{CloseCode, CloseReason, Message, MessageStream, Session};
use serde::{Deserialize, Serialize};
use tracing::{debug, Instrument};
use utoipa::ToSchema;
use uuid::Uuid;

use super::{Follow, Follower, Wake};
use crate::{
    auth::presented_key,
    error::ApiError,
    ledger::{LedgerError, StreamEvent, RESUME_WINDOW},
    state::AppState,
};

/// The subprotocol the server speaks (and selects).
pub(crate) const PROTOCOL: &str = "conduit.v1";
/// Prefix of the subprotocol that carries the key.
const KEY_PROTOCOL: &str = "conduit.key.";
const PING_EVERY: Duration = Duration::from_secs(20);
/// A client that answered no ping for this long is gone.
const SILENT_LIMIT: Duration = Duration::from_secs(70);
/// Longest a frame may wait for the client to take it before the client counts as
/// too slow.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// Most task ids one `subscribe` may name.
const MAX_SUBSCRIBE: usize = 1000;
/// Largest message a client may send.
const MAX_CLIENT_FRAME: usize = 64 * 1024;
/// Close code for a `resume_after` that names no event of the key within the window.
const CLOSE_UNKNOWN_EVENT: u16 = 4410;

/// The WebSocket text frame of one event.
pub(crate) fn frame(event: &StreamEvent) -> String {
    // An event id is `msg_` and hex: nothing in it needs escaping.
    format!(
        r#"{{"id":"{}","type":"{}","data":{}}}"#,
        event.event_id,
        event.event.as_str(),
        event.body
    )
}

/// What a client may send.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientMessage {
    subscribe: Option<Vec<Uuid>>,
    resume_after: Option<String>,
}

/// A frame the server sends on `GET /v1/stream`: one event.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct StreamFrame {
    /// The event id: the SSE `id:` and the webhook's `webhook-id`.
    id: String,
    /// `progress`, `completed`, `failed` or `cancelled`.
    #[serde(rename = "type")]
    kind: String,
    /// The exact webhook payload.
    #[schema(value_type = Object)]
    data: serde_json::Value,
}

/// A message a client may send on `GET /v1/stream`; both keys may come together.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct StreamRequest {
    /// Only these tasks from now on; an empty list follows every task again.
    #[serde(skip_serializing_if = "Option::is_none")]
    subscribe: Option<Vec<Uuid>>,
    /// Replay every followed event after this event id (up to 24 h back) before the
    /// live ones.
    #[serde(skip_serializing_if = "Option::is_none")]
    resume_after: Option<String>,
}

/// The key offered as a subprotocol, when `conduit.v1` is offered too.
fn protocol_key(req: &HttpRequest) -> (bool, Option<String>) {
    let mut speaks = false;
    let mut key = None;
    for value in req.headers().get_all(header::SEC_WEBSOCKET_PROTOCOL) {
        let Ok(value) = value.to_str() else { continue };
        for offered in value.split(',').map(str::trim) {
            if offered == PROTOCOL {
                speaks = true;
            } else if let Some(k) = offered.strip_prefix(KEY_PROTOCOL) {
                key = Some(k.to_owned());
            }
        }
    }
    (speaks, key)
}

/// Every event of the caller's tasks over a WebSocket.
///
/// Text frames `{"id":"<event id>","type":"progress|completed|failed|cancelled","data":{...webhook payload...}}`;
/// a new connection gets live events only. Send `{"subscribe":["<task_id>",...]}` to narrow
/// it to those tasks (an empty list follows every task again) and
/// `{"resume_after":"<event id>"}` to replay what came after that event (up to 24 h back)
/// before the live ones. Authenticate with the usual headers or, from a browser, with the
/// subprotocols `conduit.v1` and `conduit.key.<key>` (the server selects `conduit.v1`).
/// The server pings every 20 s; a client too slow to read is closed with 1008; a
/// `resume_after` naming no event of the key within 24 h is closed with 4410; a message
/// that is not one of the above is closed with 1007.
#[utoipa::path(
    get,
    path = "/v1/stream",
    tag = "stream",
    params(
        ("Sec-WebSocket-Protocol" = Option<String>, Header, description = "`conduit.v1, conduit.key.<key>` for clients that cannot set Authorization"),
    ),
    responses(
        (status = 101, description = "Switching to the WebSocket protocol"),
        (status = 400, description = "Not a WebSocket handshake", body = crate::error::ErrorBody),
        (status = 401, description = "Missing or wrong key, before the upgrade", body = crate::error::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
#[tracing::instrument(name = "stream", skip_all)]
pub(crate) async fn stream(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let (speaks, offered_key) = protocol_key(&req);
    let key = match presented_key(&req) {
        Some(key) => key.to_owned(),
        None => offered_key.ok_or(ApiError::Unauthorized)?,
    };
    let active = state
        .key_cache
        .resolve(&state.pool, &key)
        .await?
        .ok_or(ApiError::Unauthorized)?;
    let (mut response, session, messages) = actix_ws::handle(&req, body).map_err(|err| {
        ApiError::Field(crate::error::FieldError::invalid(
            "upgrade",
            format!("Not a WebSocket handshake: {err}"),
        ))
    })?;
    if speaks {
        response.headers_mut().insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            header::HeaderValue::from_static(PROTOCOL),
        );
    }
    let app = state.into_inner();
    let mut follower = Follower::new(&app.stream, app.ledger.clone(), active.id, Follow::All, 0);
    // Live only: start at the head, read after registering and before the handshake
    // completes, so every event numbered after the client sees the upgrade reaches it.
    follower.cursor = follower.head().await?;
    let span = tracing::info_span!("websocket", key_id = %active.id);
    actix_web::rt::spawn(
        async move {
            let metrics = app.stream.metrics.clone();
            let gauge = metrics.connections.with_label_values(&["websocket"]);
            gauge.inc();
            let mut conn = Connection {
                app,
                session,
                follower,
            };
            let close = conn.serve(messages.max_frame_size(MAX_CLIENT_FRAME)).await;
            if matches!(&close, Ok(Some(reason)) if reason.code == CloseCode::Policy) {
                metrics
                    .slow_disconnects
                    .with_label_values(&["websocket"])
                    .inc();
            }
            let reason = match close {
                Ok(reason) => reason,
                Err(err) => {
                    debug!(error = %format!("{:#}", anyhow::Error::from(err)), "stream ended by an error");
                    Some(CloseReason {
                        code: CloseCode::Error,
                        description: Some("internal error; reconnect and resume".into()),
                    })
                }
            };
            if let Some(reason) = reason {
                // A client that reads nothing cannot take the close frame either.
                let _ = tokio::time::timeout(Duration::from_secs(10), conn.session.close(Some(reason)))
                    .await;
            }
            gauge.dec();
        }
        .instrument(span),
    );
    Ok(response)
}

fn close(code: CloseCode, description: &str) -> Option<CloseReason> {
    Some(CloseReason {
        code,
        description: Some(description.to_owned()),
    })
}

struct Connection {
    app: Arc<AppState>,
    session: Session,
    follower: Follower,
}

/// Why sending stopped.
enum Stop {
    /// The client is gone: nothing to close.
    Gone,
    Slow,
}

impl Connection {
    /// Sends `events` in order. Live events give up as soon as the hub finds the
    /// client too slow; history (read from the database) only on the send timeout.
    async fn send(&mut self, events: &[Arc<StreamEvent>], source: &str) -> Result<(), Stop> {
        let slow = (source == "live").then(|| self.follower.slow());
        for event in events {
            let sending = tokio::time::timeout(SEND_TIMEOUT, self.session.text(frame(event)));
            let sent = match &slow {
                Some(slow) => tokio::select! {
                    sent = sending => sent,
                    () = slow.cancelled() => return Err(Stop::Slow),
                },
                None => sending.await,
            };
            match sent {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(Stop::Gone),
                Err(_) => return Err(Stop::Slow),
            }
        }
        self.app
            .stream
            .metrics
            .events_sent
            .with_label_values(&["websocket", source])
            .inc_by(events.len() as u64);
        Ok(())
    }

    /// Sends the history from the cursor to the stream's head (and whatever came meanwhile
    /// if the connection had to register again).
    async fn catch_up(&mut self) -> Result<Result<(), Stop>, LedgerError> {
        loop {
            let head = self.follower.head().await?;
            loop {
                let page = self.follower.history_page(head).await?;
                if page.is_empty() {
                    break;
                }
                if let Err(stop) = self.send(&page, "history").await {
                    return Ok(Err(stop));
                }
            }
            if !self.follower.renew_if_slow() {
                return Ok(Ok(()));
            }
        }
    }

    /// Runs the connection; the close to send when it ends (none if the client left).
    async fn serve(
        &mut self,
        mut messages: MessageStream,
    ) -> Result<Option<CloseReason>, LedgerError> {
        let mut ping =
            tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
        let mut heard = tokio::time::Instant::now();
        loop {
            let stop = tokio::select! {
                wake = self.follower.next() => match wake? {
                    Wake::Events(events) => self.send(&events, "live").await.err(),
                    Wake::Slow => Some(Stop::Slow),
                    Wake::CatchUp => self.catch_up().await?.err(),
                },
                message = messages.recv() => {
                    heard = tokio::time::Instant::now();
                    match message {
                        None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return Ok(None),
                        Some(Ok(Message::Ping(bytes))) => {
                            if self.session.pong(&bytes).await.is_err() {
                                return Ok(None);
                            }
                            None
                        }
                        Some(Ok(Message::Text(text))) => match serde_json::from_str::<ClientMessage>(&text) {
                            Err(err) => {
                                return Ok(close(CloseCode::Invalid, &format!(
                                    "expected {{\"subscribe\":[task ids]}} or {{\"resume_after\":\"event id\"}}: {err}"
                                )))
                            }
                            Ok(message) => match self.obey(message).await? {
                                Ok(stop) => stop,
                                Err(reason) => return Ok(reason),
                            },
                        },
                        Some(Ok(Message::Binary(_))) => {
                            return Ok(close(CloseCode::Unsupported, "send JSON text frames"))
                        }
                        Some(Ok(_)) => None,
                    }
                },
                _ = ping.tick() => {
                    if heard.elapsed() > SILENT_LIMIT {
                        return Ok(close(CloseCode::Away, "no answer to pings"));
                    }
                    if self.session.ping(b"").await.is_err() {
                        return Ok(None);
                    }
                    None
                }
            };
            match stop {
                None => {}
                Some(Stop::Gone) => return Ok(None),
                Some(Stop::Slow) => return Ok(close(
                    CloseCode::Policy,
                    "too slow to read the stream; reconnect and resume_after your last event id",
                )),
            }
        }
    }

    /// Applies a client's `subscribe` and `resume_after`: `Err` with the close to send
    /// for a request that cannot be served.
    async fn obey(
        &mut self,
        message: ClientMessage,
    ) -> Result<Result<Option<Stop>, Option<CloseReason>>, LedgerError> {
        if let Some(tasks) = message.subscribe {
            if tasks.len() > MAX_SUBSCRIBE {
                return Ok(Err(close(
                    CloseCode::Size,
                    &format!("subscribe names at most {MAX_SUBSCRIBE} tasks"),
                )));
            }
            self.follower.follow = if tasks.is_empty() {
                Follow::All
            } else {
                Follow::Tasks(tasks)
            };
        }
        if let Some(after) = message.resume_after {
            let Some(event) = self
                .follower
                .ledger()
                .stream_event(self.follower.key_id, &after, None, Some(RESUME_WINDOW))
                .await?
            else {
                return Ok(Err(Some(CloseReason {
                    code: CloseCode::Other(CLOSE_UNKNOWN_EVENT),
                    description: Some(
                        "resume_after names no event of this key within the last 24 h".into(),
                    ),
                })));
            };
            self.follower.cursor = event.position;
            return Ok(Ok(self.catch_up().await?.err()));
        }
        Ok(Ok(None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use conduit_core::payload::WebhookEvent;

    #[test]
    fn a_frame_wraps_the_payload_unchanged() {
        let event = StreamEvent {
            v: 1,
            event_id: "msg_abc".into(),
            api_key_id: Uuid::nil(),
            position: 3,
            task_id: Uuid::nil(),
            attempt: 1,
            event: WebhookEvent::Progress,
            body: r#"{"task_id":"x","progress_percentage":5}"#.into(),
        };
        let parsed: serde_json::Value = serde_json::from_str(&frame(&event)).unwrap();
        assert_eq!(parsed["id"], "msg_abc");
        assert_eq!(parsed["type"], "progress");
        assert_eq!(parsed["data"]["progress_percentage"], 5);
    }
}
