//! Leaderboard service (placeholder until the ranking and store land).
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::hub::Hub;
use crate::metrics::Metrics;

pub struct Boards;

impl Boards {
    pub async fn open(
        _cfg: &Config,
        _hub: Arc<Hub>,
        _m: Arc<Metrics>,
        _s: CancellationToken,
    ) -> anyhow::Result<Arc<Boards>> {
        Ok(Arc::new(Boards))
    }
    pub async fn close(&self) {}
}
