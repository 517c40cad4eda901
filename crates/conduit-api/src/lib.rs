//! `conduit-api` owns the public HTTP API and the single source of truth about tasks:
//! API keys, request validation, the PostgreSQL schema and its migrations, the
//! transactional outbox and its relay to RabbitMQ, the task ledger that applies the
//! generators' status events and creates webhook events, the webhook delivery log, and
//! the signed, expiring video URLs. No other service talks to PostgreSQL.

pub mod auth;
pub mod db;
pub mod domain;
pub mod error;
pub mod keys;
pub mod ledger;
pub mod metrics;
pub mod openapi;
pub mod outbox;
pub mod routes;
pub mod state;
pub mod submits;
pub mod tasks;
pub mod videos;
pub mod webhooks;

mod startup;

pub use startup::App;
