//! What every handler of one API process shares.

use std::sync::Arc;

use conduit_core::{config::Settings, Broker};
use deadpool_postgres::Pool;

use crate::{
    domain::ModelCatalog, keys::KeyCache, ledger::TaskLedger, links::VideoLinks, metrics::Metrics,
    stream::StreamHub,
};

pub(crate) struct AppState {
    pub(crate) settings: Settings,
    /// Every read and write of task state goes through the ledger.
    pub(crate) ledger: Arc<TaskLedger>,
    /// For API keys only (the ledger owns the task tables).
    pub(crate) pool: Pool,
    pub(crate) broker: Broker,
    pub(crate) models: ModelCatalog,
    pub(crate) key_cache: KeyCache,
    pub(crate) links: VideoLinks,
    pub(crate) metrics: Metrics,
    /// This process's live events for its stream connections.
    pub(crate) stream: Arc<StreamHub>,
}
