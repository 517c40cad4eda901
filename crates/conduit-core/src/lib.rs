//! `conduit-core` owns the vocabulary the three Conduit services share: typed
//! configuration, tracing set-up, the versioned messages that cross RabbitMQ, the exact
//! webhook payloads of the public contract, the broker topology under a namespace, and
//! the publish (with confirms) and consume (manual ack, bounded concurrency) helpers.
//! It never talks to PostgreSQL and never makes outbound HTTP calls: those belong to the
//! services that own them.

pub mod broker;
pub mod config;
pub mod health;
pub mod messages;
pub mod netguard;
pub mod ops;
pub mod payload;
pub mod storage;
pub mod telemetry;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod time;
pub mod tls;
pub mod topology;
pub mod video_links;

pub use broker::{Broker, ConsumeLimits, Disposition, Incoming, Outgoing, Source, Target};
pub use config::{Secret, Service, Settings};
pub use topology::Topology;
