//! Every metric the gateway exports, in one place (served at `/metrics` for Prometheus).
//!
//! Labels stay bounded: carrier, account (both from configuration), status, reason, outcome.
//! Never a phone number or a message id.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{LazyLock, OnceLock, PoisonError, RwLock};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder once and returns its handle. The recorder is global,
/// so a second gateway in the same process (tests) shares it.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Suffix("_seconds".into()),
                    &[
                        0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                        60.0, 300.0, 1800.0,
                    ],
                )
                .unwrap_or_else(|_| PrometheusBuilder::new());
            match builder.install_recorder() {
                Ok(handle) => handle,
                // Another recorder is installed (an embedding program): render an empty one.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            }
        })
        .clone()
}

/// The handles of one metric on the per-message path, registered once per label set and kept.
/// The `metrics` macros copy every label into a new key, hash it and look it up in the
/// registry at each call (about ten times a message: 6% of the API threads' time and 2% of the
/// SQLite writer's). Label sets are bounded (accounts and carriers come from the
/// configuration; the other labels are constants), so nothing here grows with traffic.
struct Handles<K, H> {
    by_label: LazyLock<RwLock<ByLabel<K, H>>>,
}

/// A metric's handles by its configured label (account, carrier), then by its other label.
type ByLabel<K, H> = HashMap<Box<str>, HashMap<K, H>>;

impl<K: Hash + Eq + Copy, H: Clone> Handles<K, H> {
    const fn new() -> Self {
        Handles {
            by_label: LazyLock::new(Default::default),
        }
    }

    /// Runs `record` on the handle for (`label`, `key`), registering it with `register` the
    /// first time. Before the recorder is installed a handle would record nowhere for good,
    /// so none is kept.
    fn with(&self, label: &str, key: K, register: impl FnOnce() -> H, record: impl FnOnce(&H)) {
        if HANDLE.get().is_none() {
            return record(&register());
        }
        let known = self.by_label.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(handle) = known.get(label).and_then(|handles| handles.get(&key)) {
            return record(handle);
        }
        drop(known);
        let handle = register();
        record(&handle);
        self.by_label
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(label.into())
            .or_default()
            .insert(key, handle);
    }
}

/// Histograms are drained by upkeep; without it they grow without bound.
pub async fn upkeep(handle: PrometheusHandle, shutdown: tokio_util::sync::CancellationToken) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(5)) => handle.run_upkeep(),
            () = shutdown.cancelled() => return,
        }
    }
}

/// A message accepted by the API (stored, whatever the policy decided).
pub fn accepted(account: &str, count: usize) {
    static ACCEPTED: Handles<(), Counter> = Handles::new();
    ACCEPTED.with(
        account,
        (),
        || counter!("smsgw_messages_accepted_total", "account" => account.to_owned()),
        |c| c.increment(count as u64),
    );
}

/// A submission refused before it was stored, by its error code.
pub fn rejected(account: &str, code: &'static str) {
    counter!("smsgw_messages_rejected_total", "account" => account.to_owned(), "reason" => code)
        .increment(1);
}

/// A submission taken from the RabbitMQ queue, by how it was settled: acked (stored or
/// refused, and answered), rejected (not a submission: answered and dead-lettered), requeued.
pub fn amqp_submission(outcome: &'static str) {
    counter!("smsgw_amqp_submissions_total", "outcome" => outcome).increment(1);
}

/// 1 while the queue intake is connected to its broker and consuming.
pub fn amqp_connected(up: bool) {
    gauge!("smsgw_amqp_connected").set(if up { 1.0 } else { 0.0 });
}

/// Every status a message enters (refusals by policy included), per account.
pub fn status_change(account: &str, status: &'static str) {
    static STATUS: Handles<&'static str, Counter> = Handles::new();
    STATUS.with(
        account,
        status,
        || counter!("smsgw_message_status_total", "account" => account.to_owned(), "status" => status),
        |c| c.increment(1),
    );
}

/// One submit_sm and what became of it: accepted, rejected, throttled, unknown, not_sent.
pub fn submit(carrier: &str, outcome: &'static str) {
    static SUBMITS: Handles<&'static str, Counter> = Handles::new();
    SUBMITS.with(
        carrier,
        outcome,
        || counter!("smsgw_submits_total", "carrier" => carrier.to_owned(), "outcome" => outcome),
        |c| c.increment(1),
    );
}

/// A message sent on to the next carrier of its route: `from` could not take it.
pub fn failover(from: &str, to: &str) {
    counter!("smsgw_failovers_total", "from" => from.to_owned(), "to" => to.to_owned())
        .increment(1);
}

/// A carrier's rate in force (changed by a reload), per bind.
pub fn rate_per_second(carrier: &str, rate: u32) {
    gauge!("smsgw_carrier_rate_per_second", "carrier" => carrier.to_owned()).set(f64::from(rate));
}

pub fn submit_latency(carrier: &str, elapsed: Duration) {
    static LATENCY: Handles<(), Histogram> = Handles::new();
    LATENCY.with(
        carrier,
        (),
        || histogram!("smsgw_submit_response_seconds", "carrier" => carrier.to_owned()),
        |h| h.record(elapsed.as_secs_f64()),
    );
}

pub fn window_in_flight(carrier: &str, bind: usize, in_flight: usize) {
    static IN_FLIGHT: Handles<usize, Gauge> = Handles::new();
    IN_FLIGHT.with(
        carrier,
        bind,
        || {
            gauge!("smsgw_window_in_flight", "carrier" => carrier.to_owned(), "bind" => bind.to_string())
        },
        |g| g.set(in_flight as f64),
    );
}

pub fn binds_up(carrier: &str, up: usize) {
    gauge!("smsgw_binds_up", "carrier" => carrier.to_owned()).set(up as f64);
}

/// 1 when a bind of the carrier was refused for its credentials and stopped: alert on it.
pub fn bind_credentials_refused(carrier: &str, refused: bool) {
    gauge!("smsgw_bind_credentials_refused", "carrier" => carrier.to_owned()).set(if refused {
        1.0
    } else {
        0.0
    });
}

/// A link lost or a bind failed, by a short reason.
pub fn reconnect(carrier: &str, reason: &'static str) {
    counter!("smsgw_reconnects_total", "carrier" => carrier.to_owned(), "reason" => reason)
        .increment(1);
}

/// The link's effective rate in segments per second: the configured rate (every bind's
/// together), lowered while the carrier throttles or reports congestion.
pub fn link_rate(carrier: &str, per_second: f64) {
    gauge!("smsgw_link_rate_effective", "carrier" => carrier.to_owned()).set(per_second);
}

pub fn throttled(carrier: &str) {
    counter!("smsgw_throttled_total", "carrier" => carrier.to_owned()).increment(1);
}

/// A receipt, by its state; `matched` false when it waits for its submit_sm_resp (or never
/// finds one).
pub fn receipt(carrier: &str, state: &'static str, matched: bool) {
    static RECEIPTS: Handles<&'static str, Counter> = Handles::new();
    RECEIPTS.with(
        carrier,
        state,
        || counter!("smsgw_receipts_total", "carrier" => carrier.to_owned(), "state" => state),
        |c| c.increment(1),
    );
    if !matched {
        counter!("smsgw_receipts_unmatched_total", "carrier" => carrier.to_owned()).increment(1);
    }
}

/// Parked receipts given up after `unmatched_after`, and unreadable ones.
pub fn receipt_given_up(carrier: &str, reason: &'static str, count: usize) {
    counter!("smsgw_receipts_given_up_total", "carrier" => carrier.to_owned(), "reason" => reason)
        .increment(count as u64);
}

/// query_sm answers: `final` (applied as the receipt), `pending`, `refused`, `unanswered`.
pub fn receipt_query(carrier: &str, result: &'static str) {
    counter!("smsgw_receipt_queries_total", "carrier" => carrier.to_owned(), "result" => result)
        .increment(1);
}

/// Time from the carrier accepting a part to its final receipt.
pub fn receipt_latency(carrier: &str, elapsed_ms: i64) {
    static LATENCY: Handles<(), Histogram> = Handles::new();
    LATENCY.with(
        carrier,
        (),
        || histogram!("smsgw_receipt_latency_seconds", "carrier" => carrier.to_owned()),
        |h| h.record(elapsed_ms.max(0) as f64 / 1000.0),
    );
}

pub fn inbound(carrier: &str) {
    counter!("smsgw_inbound_total", "carrier" => carrier.to_owned()).increment(1);
}

/// Webhooks posted (`count` in one request): delivered, failed (to be retried) or given_up.
pub fn webhooks(result: &'static str, count: usize) {
    static ATTEMPTS: Handles<&'static str, Counter> = Handles::new();
    ATTEMPTS.with(
        "",
        result,
        || counter!("smsgw_webhook_attempts_total", "result" => result),
        |c| c.increment(count as u64),
    );
}

/// How long the most overdue waiting message has been due: a queue that drains keeps this
/// near 0, and a message scheduled for later does not count until it is due.
pub fn overdue_ms(earliest_due: Option<i64>, now: i64) -> i64 {
    earliest_due.map_or(0, |due| (now - due).max(0))
}

/// Queue and outbox, sampled periodically.
pub fn backlog(queued: i64, overdue_ms: i64, webhooks: i64) {
    gauge!("smsgw_queue_depth").set(queued as f64);
    gauge!("smsgw_queue_oldest_age_seconds").set(overdue_ms.max(0) as f64 / 1000.0);
    gauge!("smsgw_webhook_backlog").set(webhooks as f64);
}

/// An opt-out change: action opt_out or opt_in, by source.
pub fn opt_out(action: &'static str, source: &'static str) {
    counter!("smsgw_opt_out_events_total", "action" => action, "source" => source).increment(1);
}

/// Rows removed by the retention purge, by kind.
pub fn purged(kind: &'static str, count: u64) {
    counter!("smsgw_purged_total", "kind" => kind).increment(count);
}

pub fn number_change(kind: &'static str) {
    counter!("smsgw_number_changes_total", "kind" => kind).increment(1);
}

/// An API request refused by a rate limit (`limit`: `account` or `key`).
pub fn rate_limited(account: &str, limit: &'static str) {
    counter!("smsgw_http_rate_limited_total", "account" => account.to_owned(), "limit" => limit)
        .increment(1);
}

/// A connection closed by the server on `listener` (`api`, `admin` or `metrics`): `reason`
/// is `too_many_connections` (refused at accept), `header_timeout` (the header did not arrive
/// in time, e.g. slowloris) or `tls_handshake` (failed or too slow).
pub fn http_connection_closed(listener: &'static str, reason: &'static str) {
    counter!("smsgw_http_connections_closed_total", "listener" => listener, "reason" => reason)
        .increment(1);
}

/// Connections open now on `listener`.
pub fn http_connections(listener: &'static str, open: usize) {
    gauge!("smsgw_http_connections", "listener" => listener).set(open as f64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_recorder_renders_what_was_counted_and_installs_once() {
        let handle = install();
        submit("metrics-test", "accepted");
        window_in_flight("metrics-test", 0, 3);
        let text = install().render();
        assert!(
            text.contains("smsgw_submits_total{carrier=\"metrics-test\",outcome=\"accepted\"}"),
            "{text}"
        );
        assert!(text.contains("smsgw_window_in_flight"));
        drop(handle);
    }

    /// A kept handle records into its own label set, however often and in whatever order the
    /// label sets come.
    #[test]
    fn kept_handles_count_each_label_set_apart() {
        install();
        for (account, status) in [
            ("kept-a", "queued"),
            ("kept-b", "queued"),
            ("kept-a", "queued"),
            ("kept-a", "sent"),
        ] {
            status_change(account, status);
        }
        window_in_flight("kept-c", 0, 5);
        window_in_flight("kept-c", 1, 7);
        window_in_flight("kept-c", 0, 2);
        let text = install().render();
        for line in [
            "smsgw_message_status_total{account=\"kept-a\",status=\"queued\"} 2",
            "smsgw_message_status_total{account=\"kept-b\",status=\"queued\"} 1",
            "smsgw_message_status_total{account=\"kept-a\",status=\"sent\"} 1",
            "smsgw_window_in_flight{carrier=\"kept-c\",bind=\"0\"} 2",
            "smsgw_window_in_flight{carrier=\"kept-c\",bind=\"1\"} 7",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }
}
