//! `GET /v1/videos/generations/tasks/{task_id}/events`: one task's events as
//! Server-Sent Events: its history, then live events, ending after the terminal event.

use std::{sync::Arc, time::Duration};

use actix_web::{http::header, web, HttpRequest, HttpResponse};
use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::{debug, Instrument};
use uuid::Uuid;

use super::{Follow, Follower, Wake};
use crate::{
    auth::Caller,
    error::{ApiError, FieldError},
    ledger::{LedgerError, StreamEvent, Terminal},
    state::AppState,
};

/// A comment at least this often keeps proxies from closing an idle stream.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Longest a frame may wait for the client to take it before the client counts as
/// too slow and the stream ends.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// The SSE record of one event: `id:`, `event:` and `data:` (the webhook payload).
pub(crate) fn record(event: &StreamEvent) -> Bytes {
    Bytes::from(format!(
        "id: {}\nevent: {}\ndata: {}\n\n",
        event.event_id,
        event.event.as_str(),
        event.body
    ))
}

/// Stream a task's events (Server-Sent Events).
///
/// First every event of the task that already happened, then live ones; the stream ends
/// after the terminal event (at once for a task that is already terminal). Each event
/// carries `id:` (its event id, the webhook's `webhook-id`), `event:` (`progress`,
/// `completed`, `failed`, `cancelled`) and `data:` (the exact webhook payload JSON).
/// `Last-Event-ID` resumes after that event. A comment line comes at least every 15 s.
#[utoipa::path(
    get,
    path = "/v1/videos/generations/tasks/{task_id}/events",
    tag = "stream",
    params(
        ("task_id" = String, Path, description = "Task id (UUID)"),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id of the task"),
    ),
    responses(
        (status = 200, description = "`text/event-stream`: `id:`, `event:` and `data:` (the webhook payload JSON) per event", content_type = "text/event-stream", body = String),
        (status = 400, description = "`Last-Event-ID` names no event of this task", body = crate::error::ErrorBody),
        (status = 401, body = crate::error::ErrorBody),
        (status = 404, description = "Unknown task, another key's task, or not a UUID", body = crate::error::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
#[tracing::instrument(name = "task_events", skip_all, fields(task_id = %path))]
pub(crate) async fn task_events(
    req: HttpRequest,
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let task_id = Uuid::parse_str(&path).map_err(|_| ApiError::not_found_task())?;
    state
        .ledger
        .get(caller.key_id, task_id)
        .await?
        .ok_or_else(ApiError::not_found_task)?;
    let last_event_id = req
        .headers()
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty());
    let cursor = match last_event_id {
        None => 0,
        Some(id) => {
            state
                .ledger
                .stream_event(caller.key_id, id, Some(task_id), None)
                .await?
                .ok_or_else(|| {
                    ApiError::Field(FieldError::invalid(
                        "Last-Event-ID",
                        "Last-Event-ID names no event of this task",
                    ))
                })?
                .position
        }
    };
    // Registered before anything is read, so nothing committed from here on is missed.
    let follower = Follower::new(
        &state.stream,
        state.ledger.clone(),
        caller.key_id,
        Follow::Tasks(vec![task_id]),
        cursor,
    );
    let (tx, mut rx) = mpsc::channel::<Bytes>(8);
    let span = tracing::info_span!("sse", task_id = %task_id);
    let app = state.into_inner();
    actix_web::rt::spawn(
        async move {
            let metrics = app.stream.metrics.clone();
            let gauge = metrics.connections.with_label_values(&["sse"]);
            gauge.inc();
            match serve(app, follower, task_id, &tx).await {
                Ok(Ended::Slow) => {
                    metrics
                        .slow_disconnects
                        .with_label_values(&["sse"])
                        .inc();
                    debug!("stream client too slow; ended its stream");
                }
                Ok(_) => {}
                Err(err) => {
                    debug!(error = %format!("{:#}", anyhow::Error::from(err)), "stream ended by an error")
                }
            }
            gauge.dec();
        }
        .instrument(span),
    );
    let body = futures::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|next| next.map(Ok::<_, std::convert::Infallible>))
    });
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(body))
}

enum Ended {
    Done,
    Slow,
    Gone,
}

/// Sends `bytes` unless the client went away or is too slow.
async fn send(tx: &mpsc::Sender<Bytes>, bytes: Bytes) -> Result<(), Ended> {
    match tokio::time::timeout(SEND_TIMEOUT, tx.send(bytes)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(Ended::Gone),
        Err(_) => Err(Ended::Slow),
    }
}

async fn serve(
    app: Arc<AppState>,
    mut follower: Follower,
    task_id: Uuid,
    tx: &mpsc::Sender<Bytes>,
) -> Result<Ended, LedgerError> {
    let sent = |source: &str, n: usize| {
        app.stream
            .metrics
            .events_sent
            .with_label_values(&["sse", source])
            .inc_by(n as u64);
    };
    if let Err(ended) = send(tx, Bytes::from_static(b": stream of task events\n\n")).await {
        return Ok(ended);
    }
    let mut catching_up = true;
    let mut keep_alive =
        tokio::time::interval_at(tokio::time::Instant::now() + KEEP_ALIVE, KEEP_ALIVE);
    loop {
        if catching_up {
            catching_up = false;
            let head = follower.head().await?;
            loop {
                let page = follower.history_page(head).await?;
                if page.is_empty() {
                    break;
                }
                sent("history", page.len());
                for event in &page {
                    if let Err(ended) = send(tx, record(event)).await {
                        return Ok(ended);
                    }
                }
            }
            if follower.renew_if_slow() {
                catching_up = true;
                continue;
            }
            if finished(&follower, task_id).await? {
                return Ok(Ended::Done);
            }
        }
        let wake = tokio::select! {
            wake = follower.next() => wake?,
            _ = keep_alive.tick() => {
                if let Err(ended) = send(tx, Bytes::from_static(b": keep-alive\n\n")).await {
                    return Ok(ended);
                }
                continue;
            }
            () = tx.closed() => return Ok(Ended::Gone),
        };
        match wake {
            Wake::Events(events) => {
                sent("live", events.len());
                let mut terminal = false;
                for event in &events {
                    if let Err(ended) = send(tx, record(event)).await {
                        return Ok(ended);
                    }
                    terminal |= event.event.is_terminal();
                }
                if terminal && finished(&follower, task_id).await? {
                    return Ok(Ended::Done);
                }
            }
            Wake::Slow => return Ok(Ended::Slow),
            Wake::CatchUp => catching_up = true,
        }
    }
}

/// True once the task is terminal and its terminal event of the current attempt has
/// been handled (sent now, or before the `Last-Event-ID`). A terminal event committed
/// but not numbered yet is still to come live; a terminal task with no recorded
/// terminal event (older than the stream) is finished at once.
async fn finished(follower: &Follower, task_id: Uuid) -> Result<bool, LedgerError> {
    let ledger = follower.ledger();
    let Some(task) = ledger.get(follower.key_id, task_id).await? else {
        return Ok(true);
    };
    if !task.status.is_terminal() {
        return Ok(false);
    }
    Ok(
        match ledger
            .stream_terminal_position(task_id, task.attempt)
            .await?
        {
            Terminal::At(position) => position <= follower.cursor,
            Terminal::Unnumbered => false,
            Terminal::Unrecorded => true,
        },
    )
}
