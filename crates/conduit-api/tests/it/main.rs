//! Integration tests of conduit-api against the machine's real PostgreSQL and RabbitMQ.
//! Every test runs its own API process on its own AMQP namespace and database.

// Test helpers panic on purpose when the system under test misbehaves.
#![allow(clippy::unwrap_used)]

mod helpers;

mod auth;
mod batching;
mod cancel;
mod cli;
mod delivery_options;
mod errors;
mod idempotency;
mod ledger;
mod listing;
mod openapi;
mod outbox;
mod stream;
mod submit;
mod validation;
mod videos;
mod webhooks;
