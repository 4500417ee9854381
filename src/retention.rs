//! The retention purge (policy rule 5): message bodies, webhook payloads and inbound texts go
//! after `retention.body_days`, status history after `event_days`, canceled messages after
//! `canceled_days`, idempotency keys after `idempotency_hours`.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::RetentionConfig;
use crate::message::now_ms;
use crate::store::{Cutoffs, Purge, Store};

/// Rows of each kind removed per run at most, so that one run never holds the writer long; a
/// backlog is worked off over several runs.
pub const ROWS_PER_RUN: u32 = 50_000;

const DAY_MS: i64 = 24 * 3600 * 1000;

pub fn cutoffs(config: &RetentionConfig, now: i64) -> Cutoffs {
    Cutoffs {
        bodies_before: now - config.body_days as i64 * DAY_MS,
        events_before: now - config.event_days as i64 * DAY_MS,
        canceled_before: now - config.canceled_days as i64 * DAY_MS,
        idempotency_before: now - config.idempotency_hours as i64 * 3600 * 1000,
    }
}

/// Purges every `interval` until `shutdown`.
pub async fn run(store: Arc<dyn Store>, config: RetentionConfig, shutdown: CancellationToken) {
    loop {
        match store
            .purge(cutoffs(&config, now_ms()), ROWS_PER_RUN, false)
            .await
        {
            Ok(purge) => report(&purge),
            Err(e) => warn!(error = %e, "retention purge failed; it runs again later"),
        }
        tokio::select! {
            () = tokio::time::sleep(config.interval.max(Duration::from_secs(1))) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

fn report(purge: &Purge) {
    let kinds = [
        ("message_bodies", purge.message_bodies),
        ("inbound_bodies", purge.inbound_bodies),
        ("webhooks", purge.webhooks),
        ("events", purge.events),
        ("canceled_messages", purge.canceled_messages),
        ("idempotency_keys", purge.idempotency_keys),
    ];
    for (kind, count) in kinds {
        crate::metrics::purged(kind, count);
    }
    if kinds.iter().any(|(_, n)| *n > 0) {
        info!(?purge, "retention purge");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cutoffs_follow_the_configured_periods() {
        let config = RetentionConfig::default();
        let now = 100 * DAY_MS;
        let c = cutoffs(&config, now);
        assert_eq!(c.bodies_before, 70 * DAY_MS);
        assert_eq!(c.canceled_before, 70 * DAY_MS);
        assert_eq!(c.events_before, 70 * DAY_MS);
        assert_eq!(c.idempotency_before, 99 * DAY_MS);
    }
}
