-- The API's whole state: keys, tasks, the outbox, and the webhook delivery log.

CREATE TABLE api_keys (
    id             uuid PRIMARY KEY,
    name           text NOT NULL,
    -- SHA-256 of the key; the key itself is shown once and never stored.
    key_hash       bytea NOT NULL UNIQUE,
    key_prefix     text NOT NULL,
    webhook_secret text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    revoked_at     timestamptz
);

CREATE TABLE tasks (
    id                          uuid PRIMARY KEY,
    api_key_id                  uuid NOT NULL REFERENCES api_keys (id),
    attempt                     integer NOT NULL DEFAULT 1,
    status                      text NOT NULL
        CHECK (status IN ('pending', 'processing', 'completed', 'failed', 'cancelled')),
    progress                    smallint NOT NULL DEFAULT 0,
    message                     text,
    eta_seconds                 bigint,
    model                       text NOT NULL,
    provider                    text NOT NULL,
    upstream_model              text,
    prompt                      text NOT NULL,
    duration                    integer NOT NULL,
    width                       integer NOT NULL,
    height                      integer NOT NULL,
    fps                         integer NOT NULL,
    seed                        bigint,
    webhook_url                 text,
    webhook_headers             jsonb NOT NULL DEFAULT '{}'::jsonb,
    webhook_events              text[] NOT NULL,
    video_key                   text,
    generation_duration_seconds double precision,
    error                       text,
    created_at                  timestamptz NOT NULL,
    updated_at                  timestamptz NOT NULL,
    completed_at                timestamptz,
    -- Highest status-event sequence applied for the current attempt (-1: none yet).
    last_seq                    bigint NOT NULL DEFAULT -1
);

-- Newest-first listing of one key's tasks, optionally by status.
CREATE INDEX tasks_by_key ON tasks (api_key_id, created_at DESC, id DESC);
CREATE INDEX tasks_by_key_status ON tasks (api_key_id, status, created_at DESC, id DESC);

CREATE TABLE idempotency_keys (
    api_key_id   uuid NOT NULL REFERENCES api_keys (id),
    key          text NOT NULL,
    request_hash bytea NOT NULL,
    task_id      uuid NOT NULL,
    created_at   timestamptz NOT NULL,
    PRIMARY KEY (api_key_id, key)
);

-- Messages committed with the state change that caused them, published by the relay.
CREATE TABLE outbox (
    id         bigserial PRIMARY KEY,
    -- 'queue' (the namespace's direct exchange, by route) or 'control' (the fanout).
    target     text NOT NULL CHECK (target IN ('queue', 'control')),
    route      text NOT NULL,
    body       bytea NOT NULL,
    task_id    uuid,
    message_id text,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE webhook_events (
    webhook_id      text PRIMARY KEY,
    task_id         uuid NOT NULL REFERENCES tasks (id),
    attempt         integer NOT NULL,
    event           text NOT NULL,
    status          text NOT NULL CHECK (status IN ('pending', 'delivered', 'failed', 'dropped')),
    body            text NOT NULL,
    url             text NOT NULL,
    headers         jsonb NOT NULL,
    occurred_at     timestamptz NOT NULL,
    next_attempt_at timestamptz,
    -- Time of the attempt whose outcome set `status`, so a late outcome never undoes a newer one.
    last_attempt_at timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_events_by_task ON webhook_events (task_id, created_at);

CREATE TABLE webhook_attempts (
    webhook_id   text NOT NULL,
    attempt      integer NOT NULL,
    attempted_at timestamptz NOT NULL,
    status_code  integer,
    error        text,
    duration_ms  bigint NOT NULL,
    PRIMARY KEY (webhook_id, attempt, attempted_at)
);

CREATE TABLE settings (
    key   text PRIMARY KEY,
    value text NOT NULL
);
