-- The real-time stream (SSE and WebSocket): every event a webhook would carry, for every
-- task, whether or not the task has a webhook_url or subscribes to the event. The id is
-- the webhook's `webhook-id` when the event is also sent as a webhook.
--
-- `position` numbers one API key's events densely in commit order: the ledger takes the
-- next number from `stream_positions` (a row lock held until its transaction commits), so
-- position N+1 is committed only after N is, and a rolled-back transaction gives its
-- number back. A reader that saw position N therefore knows every event up to N exists,
-- and "after this event" means exactly "position > N": resume has no gaps or repeats.
CREATE TABLE stream_positions (
    api_key_id uuid PRIMARY KEY,
    position   bigint NOT NULL
);

CREATE TABLE stream_events (
    event_id    text PRIMARY KEY,
    api_key_id  uuid NOT NULL,
    position    bigint NOT NULL,
    task_id     uuid NOT NULL,
    attempt     integer NOT NULL,
    event       text NOT NULL,
    body        text NOT NULL,
    occurred_at timestamptz NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX stream_events_by_key ON stream_events (api_key_id, position);
CREATE INDEX stream_events_by_task ON stream_events (task_id, position);
-- Progress older than the resume window is forgotten; terminal events stay, so a task's
-- event stream always ends with its outcome.
CREATE INDEX stream_events_progress_age ON stream_events (created_at) WHERE event = 'progress';

-- The outbox also carries committed events to the stream fanout.
ALTER TABLE outbox DROP CONSTRAINT IF EXISTS outbox_target_check;
ALTER TABLE outbox ADD CONSTRAINT outbox_target_check
    CHECK (target IN ('queue', 'control', 'stream'));
