//! `conduit-api` owns the public HTTP API and the single source of truth about tasks:
//! API keys, request validation, the PostgreSQL schema and its migrations, the task
//! ledger (every task transition, the transactional outbox and its relay to RabbitMQ,
//! the webhook delivery log), and the signed, expiring video URLs. No other service
//! talks to PostgreSQL.
//!
//! Layers, top to bottom: HTTP (`routes`, `auth`, `error`, `videos`, `openapi`, with
//! `domain` parsing requests) and the broker consumers (`consumers`) call the
//! [`ledger`]; the ledger talks to the database (`db`). Nothing below imports anything
//! above it.

pub mod db;
pub mod keys;
pub mod openapi;

mod auth;
mod consumers;
mod domain;
mod error;
mod ledger;
mod links;
mod metrics;
mod routes;
mod startup;
mod state;
mod stream;
mod videos;
mod webhook_options;

pub use startup::App;
