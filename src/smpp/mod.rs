//! SMPP towards the carriers: a [`Carrier`] is a queue shared by its binds, each bind a task
//! (`session`) that keeps its window full within its rate.

pub mod codec;
pub mod session;
pub mod status;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use rusmpp::pdus::SubmitSm;
use rusmpp::types::{COctetString, OctetString};
use rusmpp::values::{DataCoding, EsmClass, Npi, RegisteredDelivery, Ton};
use std::time::Duration;

use tokio::sync::{Mutex, mpsc, oneshot};
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::CarrierConfig;
use crate::encoding::Encoding;
use crate::message::Sender;
pub use session::{CarrierHealth, DeliverHandler, SubmitJob, SubmitOutcome};

/// A carrier: the queue its binds take submits from, and their health.
pub struct Carrier {
    pub name: String,
    config: Arc<CarrierConfig>,
    jobs: mpsc::Sender<SubmitJob>,
    pub health: Arc<CarrierHealth>,
    /// How long a segment may wait for a bind to take it.
    queue_wait: Duration,
    /// After which an answer can no longer come: taken, written, timed out, and drained.
    answer_limit: Duration,
}

impl Carrier {
    /// Starts the carrier's binds on `tracker`; they run until `shutdown`.
    pub fn start(
        config: CarrierConfig,
        address: String,
        deliver: DeliverHandler,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Carrier {
        let config = Arc::new(config);
        // Enough queued to refill every window at once, and no more: the rest waits in the store.
        let (jobs, rx) = mpsc::channel(config.binds * config.window);
        let rx = Arc::new(Mutex::new(rx));
        let health = Arc::new(CarrierHealth::default());
        // Series exist from the start, so "no bind ever came up" is visible too.
        crate::metrics::binds_up(&config.name, 0);
        crate::metrics::bind_credentials_refused(&config.name, false);
        for index in 0..config.binds {
            tracker.spawn(session::run(session::Bind {
                carrier: config.clone(),
                address: address.clone(),
                index,
                jobs: rx.clone(),
                deliver: deliver.clone(),
                health: health.clone(),
                shutdown: shutdown.clone(),
            }));
        }
        Carrier {
            name: config.name.clone(),
            config: config.clone(),
            jobs,
            health,
            queue_wait: config.response_timeout,
            answer_limit: config.response_timeout * 2
                + config.drain_timeout
                + Duration::from_secs(5),
        }
    }

    pub fn is_bound(&self) -> bool {
        self.health.bound.load(Ordering::SeqCst) > 0
    }

    /// Bound and not paused: the router may send it messages.
    pub fn is_usable(&self) -> bool {
        self.is_bound() && !self.health.paused.load(Ordering::SeqCst)
    }

    pub fn config(&self) -> &CarrierConfig {
        &self.config
    }

    /// Submits one segment and waits for its outcome, for a bounded time: a segment no bind
    /// takes in time comes back `NotSent`.
    pub async fn submit(&self, pdu: SubmitSm) -> SubmitOutcome {
        let (reply, outcome) = oneshot::channel();
        let job = SubmitJob {
            pdu,
            reply,
            not_after: Instant::now() + self.queue_wait,
        };
        match timeout(self.queue_wait, self.jobs.send(job)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => return SubmitOutcome::NotSent,
        }
        match timeout(self.answer_limit, outcome).await {
            Ok(Ok(outcome)) => outcome,
            // Dropped unanswered: the queue was closed with the job still in it.
            Ok(Err(_)) => SubmitOutcome::NotSent,
            Err(_) => SubmitOutcome::Unknown {
                reason: format!("no outcome within {:?}", self.answer_limit),
            },
        }
    }
}

/// The submit_sm for each segment of a message. Numbers go out as international digits
/// (TON 1, NPI 1); alphanumeric senders as TON 5, short codes as TON 3 (DOMAIN.md §5).
pub fn submit_pdus(
    recipient_e164: &str,
    sender: &Sender,
    encoding: Encoding,
    parts: Vec<Vec<u8>>,
) -> Vec<SubmitSm> {
    let multipart = parts.len() > 1;
    let (source_ton, source_npi) = match sender {
        Sender::Alphanumeric(_) => (Ton::Alphanumeric, Npi::Unknown),
        Sender::Numeric(digits) if digits.len() <= 8 => (Ton::NetworkSpecific, Npi::Unknown),
        Sender::Numeric(_) => (Ton::International, Npi::Isdn),
    };
    let source: COctetString<1, 21> = sender.as_str().parse().unwrap_or_default();
    let destination: COctetString<1, 21> = recipient_e164
        .trim_start_matches('+')
        .parse()
        .unwrap_or_default();
    // rusmpp's EsmClass::default() is 0x08; always build it from the byte (CRATES.md pitfall 1).
    let esm_class = EsmClass::from(if multipart { 0x40u8 } else { 0x00u8 });
    parts
        .into_iter()
        .map(|part| {
            SubmitSm::builder()
                .source_addr_ton(source_ton)
                .source_addr_npi(source_npi)
                .source_addr(source.clone())
                .dest_addr_ton(Ton::International)
                .dest_addr_npi(Npi::Isdn)
                .destination_addr(destination.clone())
                .esm_class(esm_class)
                .registered_delivery(RegisteredDelivery::from(0x01u8))
                .data_coding(DataCoding::from(encoding.data_coding()))
                .short_message(OctetString::from_vec(part).unwrap_or_default())
                .build()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn esm_class_is_zero_for_one_part_and_udhi_for_several() {
        let one = submit_pdus(
            "+46701234567",
            &Sender::Alphanumeric("iP1".into()),
            Encoding::Gsm7,
            vec![b"hi".to_vec()],
        );
        assert_eq!(u8::from(one[0].esm_class), 0x00);
        assert_eq!(one[0].destination_addr.as_str(), "46701234567");
        assert_eq!(one[0].source_addr_ton, Ton::Alphanumeric);
        let two = submit_pdus(
            "+46701234567",
            &Sender::Numeric("46700000000".into()),
            Encoding::Ucs2,
            vec![vec![0; 10], vec![0; 10]],
        );
        assert!(two.iter().all(|p| u8::from(p.esm_class) == 0x40));
        assert_eq!(u8::from(two[0].data_coding), 0x08);
        assert_eq!(two[0].source_addr_ton, Ton::International);
    }
}
