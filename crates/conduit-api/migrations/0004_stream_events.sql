-- The real-time stream (SSE and WebSocket): every event a webhook would carry, for every
-- task, whether or not the task has a webhook_url or subscribes to the event. The id is
-- the webhook's `webhook-id` when the event is also sent as a webhook.
--
-- The transaction that applies an event inserts its row with no `position`; only `seq`,
-- handed out at insert, orders rows waiting for one. The stream sequencer (any API
-- process, one at a time: it holds the `stream_head` row until it commits) numbers the
-- committed rows that have none, oldest `seq` first, continuing from `stream_head`, and
-- commits the numbers together with the new head and the rows' outbox messages. So
-- positions are dense across all keys and become visible in order: a reader that sees
-- position N knows every position up to N is committed, and "after this event" means
-- exactly "position > N", with no gaps or repeats. An event transaction never waits for
-- another key's or the same key's other events.
CREATE TABLE stream_head (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    position  bigint NOT NULL
);
INSERT INTO stream_head (position) VALUES (0);

CREATE TABLE stream_events (
    seq         bigserial NOT NULL,
    event_id    text PRIMARY KEY,
    api_key_id  uuid NOT NULL,
    position    bigint,
    task_id     uuid NOT NULL,
    attempt     integer NOT NULL,
    event       text NOT NULL,
    body        text NOT NULL,
    occurred_at timestamptz NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX stream_events_position ON stream_events (position);
CREATE INDEX stream_events_by_key ON stream_events (api_key_id, position);
CREATE INDEX stream_events_by_task ON stream_events (task_id, position);
-- What the sequencer still has to number.
CREATE INDEX stream_events_unsequenced ON stream_events (seq) WHERE position IS NULL;
-- Progress older than the resume window is forgotten; terminal events stay, so a task's
-- event stream always ends with its outcome.
CREATE INDEX stream_events_progress_age ON stream_events (created_at) WHERE event = 'progress';

-- The outbox also carries sequenced events to the stream fanout.
ALTER TABLE outbox DROP CONSTRAINT IF EXISTS outbox_target_check;
ALTER TABLE outbox ADD CONSTRAINT outbox_target_check
    CHECK (target IN ('queue', 'control', 'stream'));
