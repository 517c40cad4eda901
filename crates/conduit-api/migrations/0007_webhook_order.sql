-- One webhook per task in flight (ledger/webhooks.rs): an event recorded while another
-- of its task is pending waits as `held` and is released when that one settles; held
-- progress superseded by a newer event is `skipped` and never sent.
ALTER TABLE webhook_events DROP CONSTRAINT IF EXISTS webhook_events_status_check;
ALTER TABLE webhook_events ADD CONSTRAINT webhook_events_status_check
    CHECK (status IN ('pending', 'delivered', 'failed', 'dropped', 'held', 'skipped'));
