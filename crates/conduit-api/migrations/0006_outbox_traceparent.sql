-- The W3C trace context of the request or event that wrote the row, so the relay's
-- publish (and the consumer after it) continues that trace. NULL while tracing is off.
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS traceparent text;
