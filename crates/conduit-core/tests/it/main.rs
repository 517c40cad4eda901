//! Integration tests of the broker promises against the real RabbitMQ at
//! 127.0.0.1:5672. Every test works in its own namespace, removed again when the test
//! ends (even when it fails), so tests run in parallel without seeing each other.

mod coalesced_acks;
mod confirms_and_acks;
mod isolation;
mod recovery;
mod shutdown;
mod support;
mod unreachable;
mod wait_queues;
