-- Per-task webhook delivery options and signing-secret rotation.

-- A task's own retry schedule (`webhook_retry`, in its `0s,30s,5m` form) and batch
-- settings (`webhook_batch`, {"max_events","max_wait_ms"}); NULL: the operator's schedule,
-- one POST per event.
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS webhook_retry text;
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS webhook_batch jsonb;

-- The secret a key had before its latest rotation, signed with beside the new one until
-- the overlap ends.
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS previous_webhook_secret text;
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS previous_secret_expires_at timestamptz;
