//! What every handler and background task of one API process shares.

use std::sync::Arc;

use conduit_core::{config::Settings, storage::VideoStore, Broker};
use deadpool_postgres::Pool;
use tokio::sync::Notify;

use crate::{
    auth::KeyCache, domain::ModelCatalog, metrics::Metrics, submits::SubmitQueue,
    videos::VideoLinks,
};

pub struct AppState {
    pub settings: Settings,
    pub pool: Pool,
    pub broker: Broker,
    pub models: ModelCatalog,
    pub key_cache: KeyCache,
    pub store: VideoStore,
    pub links: VideoLinks,
    pub metrics: Metrics,
    /// Hands submits to the group-commit writer.
    pub submits: SubmitQueue,
    /// Wakes the outbox relay right after a commit wrote outbox rows.
    pub outbox_ready: Arc<Notify>,
}

impl AppState {
    pub fn wake_relay(&self) {
        self.outbox_ready.notify_one();
    }
}
