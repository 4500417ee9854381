//! SMPP towards the carriers: a [`Carrier`] is a queue shared by its binds, each bind a task
//! (`session`) that keeps its window full within its rate.

pub mod codec;
pub mod flow;
pub mod multipart;
pub mod ownership;
pub mod query;
pub mod session;
pub mod status;
pub mod tls;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use rusmpp::Pdu;
use rusmpp::pdus::SubmitSm;
use std::time::Duration;

use tokio::sync::{Mutex, mpsc, oneshot, watch};
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{BindType, CarrierConfig, ValidityPeriod};
use flow::{LinkFlow, Quotas, unix_now};
pub use multipart::submit_pdus;
pub use session::{CarrierHealth, DeliverHandler, Role, SubmitJob, SubmitOutcome};
use tls::{Tls, TlsError};

/// The limits of each bind that a reload may change while it stays bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// submit_sm per second, counted in segments.
    pub rate_per_second: u32,
    /// Most submit_sm awaiting their response.
    pub window: usize,
}

impl Limits {
    pub fn of(config: &CarrierConfig) -> Limits {
        Limits {
            rate_per_second: config.rate_per_second,
            window: config.window,
        }
    }
}

/// The carrier's segments waiting for a bind, in two lanes: a bind takes a high-priority
/// segment before any normal one, and each lane has its own room, so a full bulk lane never
/// holds a high-priority segment back.
pub struct JobQueue {
    lanes: Mutex<(mpsc::Receiver<SubmitJob>, mpsc::Receiver<SubmitJob>)>,
}

impl JobQueue {
    /// The next segment, high priority first; `None` once the carrier is gone.
    pub async fn next(&self) -> Option<SubmitJob> {
        let mut lanes = self.lanes.lock().await;
        let (high, normal) = &mut *lanes;
        tokio::select! {
            biased;
            Some(job) = high.recv() => Some(job),
            job = normal.recv() => job,
        }
    }

    /// The next segment if one waits now and no other bind is taking one.
    pub fn try_next(&self) -> Option<SubmitJob> {
        let mut lanes = self.lanes.try_lock().ok()?;
        let (high, normal) = &mut *lanes;
        high.try_recv().or_else(|_| normal.try_recv()).ok()
    }

    /// With no bind left, nothing would take the queued segments: they go back unsent.
    pub async fn return_all(&self) {
        let mut lanes = self.lanes.lock().await;
        let (high, normal) = &mut *lanes;
        for lane in [high, normal] {
            while let Ok(job) = lane.try_recv() {
                let _ = job.reply.send(SubmitOutcome::NotSent);
            }
        }
    }
}

/// A carrier: the queue its binds take submits from, and their health.
pub struct Carrier {
    pub name: String,
    config: Arc<CarrierConfig>,
    high: mpsc::Sender<SubmitJob>,
    normal: mpsc::Sender<SubmitJob>,
    limits: watch::Sender<Limits>,
    pub health: Arc<CarrierHealth>,
    /// The link's effective rate and quotas.
    pub flow: Arc<LinkFlow>,
    /// How long a segment may wait for a bind to take it.
    queue_wait: Duration,
    /// After which an answer can no longer come: taken, written, timed out, and drained.
    answer_limit: Duration,
}

impl Carrier {
    /// Starts the carrier's binds on `tracker`; they run until `shutdown`. Fails only if the
    /// carrier's TLS files cannot be loaded.
    pub fn start(
        config: CarrierConfig,
        address: String,
        deliver: DeliverHandler,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<Carrier, TlsError> {
        Carrier::start_owned(config, address, deliver, tracker, shutdown, None)
    }

    /// [`Carrier::start`]; with `owner`, each bind runs only while this instance holds it
    /// (several instances sharing the carrier's binds).
    pub fn start_owned(
        config: CarrierConfig,
        address: String,
        deliver: DeliverHandler,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
        owner: Option<Arc<dyn ownership::LinkOwnership>>,
    ) -> Result<Carrier, TlsError> {
        let tls = match &config.tls {
            Some(tls) => Some(Tls::new(tls, &address)?),
            None => None,
        };
        let config = Arc::new(config);
        // Enough queued to refill every window at once, and no more: the rest waits in the store.
        let (normal, normal_rx) = mpsc::channel(config.binds * config.window);
        let (high, high_rx) = mpsc::channel(config.binds * config.window);
        let jobs = Arc::new(JobQueue {
            lanes: Mutex::new((high_rx, normal_rx)),
        });
        let (limits, limits_rx) = watch::channel(Limits::of(&config));
        let health = Arc::new(CarrierHealth::default());
        let quotas = Quotas::new(
            config.quota_per_minute,
            config.quota_per_hour,
            config.quota_per_day,
        );
        // The link's rate is every bind's together.
        let link_rate = config.rate_per_second.saturating_mul(config.binds as u32);
        let flow = Arc::new(LinkFlow::new(link_rate, quotas));
        // Series exist from the start, so "no bind ever came up" is visible too.
        crate::metrics::binds_up(&config.name, 0);
        crate::metrics::bind_credentials_refused(&config.name, false);
        crate::metrics::rate_per_second(&config.name, config.rate_per_second);
        crate::metrics::link_rate(&config.name, flow.effective_rate());
        let roles: &[Role] = match config.bind_type {
            BindType::Transceiver => &[Role::Transceiver],
            BindType::Pair => &[Role::Transmitter, Role::Receiver],
        };
        let holds = config.binds * roles.len();
        for index in 0..config.binds {
            for (position, &role) in roles.iter().enumerate() {
                let (name, hold_index) = (config.name.clone(), index * roles.len() + position);
                let (config, address, jobs) = (config.clone(), address.clone(), jobs.clone());
                let (limits_rx, deliver, health) =
                    (limits_rx.clone(), deliver.clone(), health.clone());
                let (tls, flow) = (tls.clone(), flow.clone());
                let bind = move |shutdown| session::Bind {
                    carrier: config.clone(),
                    address: address.clone(),
                    index,
                    role,
                    tls: tls.clone(),
                    jobs: jobs.clone(),
                    limits: limits_rx.clone(),
                    deliver: deliver.clone(),
                    health: health.clone(),
                    flow: flow.clone(),
                    shutdown,
                };
                match &owner {
                    None => tracker.spawn(session::run(bind(shutdown.clone()))),
                    // Each session of a pair is held on its own: a receiver may run in another
                    // instance than its transmitter (receipts match through the shared store).
                    Some(owner) => tracker.spawn(ownership::run_owned(
                        owner.clone(),
                        name,
                        hold_index,
                        holds,
                        shutdown.clone(),
                        bind,
                    )),
                };
            }
        }
        Ok(Carrier {
            name: config.name.clone(),
            config: config.clone(),
            high,
            normal,
            limits,
            health,
            flow,
            queue_wait: config.response_timeout,
            answer_limit: config.response_timeout * 2
                + config.drain_timeout
                + Duration::from_secs(5),
        })
    }

    pub fn is_bound(&self) -> bool {
        self.health.bound.load(Ordering::SeqCst) > 0
    }

    /// Bound, not paused, and within its quotas: the router may send it messages. A carrier
    /// whose quota is used up leaves its messages waiting in the store.
    pub fn is_usable(&self) -> bool {
        self.is_bound()
            && !self.health.paused.load(Ordering::SeqCst)
            && !self.flow.quota_exhausted(unix_now())
    }

    /// The configuration it started with; [`Carrier::limits`] has the rate and window in force.
    pub fn config(&self) -> &CarrierConfig {
        &self.config
    }

    pub fn limits(&self) -> Limits {
        *self.limits.borrow()
    }

    /// Changes every bind's rate and window at once; the binds stay up.
    pub fn set_limits(&self, limits: Limits) {
        crate::metrics::rate_per_second(&self.name, limits.rate_per_second);
        let link_rate = limits
            .rate_per_second
            .saturating_mul(self.config.binds as u32);
        self.flow.set_configured_rate(link_rate);
        self.limits.send_if_modified(|current| {
            let changed = *current != limits;
            *current = limits;
            changed
        });
    }

    /// Submits one segment and waits for its outcome, for a bounded time: a segment no bind
    /// takes in time comes back `NotSent`. A `high` one goes in the lane binds empty first.
    pub async fn submit(&self, pdu: SubmitSm, high: bool) -> SubmitOutcome {
        self.send(pdu.into(), high).await
    }

    /// Sends one request (submit_sm, query_sm) on a bind, within the bounds of `submit`.
    async fn send(&self, pdu: Pdu, high: bool) -> SubmitOutcome {
        let (reply, outcome) = oneshot::channel();
        let now = Instant::now();
        let job = SubmitJob {
            pdu,
            reply,
            not_after: now + self.queue_wait,
            answer_by: now + self.queue_wait + self.answer_limit,
        };
        let lane = if high { &self.high } else { &self.normal };
        match timeout(self.queue_wait, lane.send(job)).await {
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

/// The `validity_period` of submit_sm for a message valid until `expires_at` (ms) when sent at
/// `now`, in the SMPP time format (DOMAIN.md §2.4); None leaves the carrier's default.
pub fn validity_period(mode: ValidityPeriod, expires_at: i64, now: i64) -> Option<String> {
    let left_secs = ((expires_at - now) / 1000).max(1);
    match mode {
        ValidityPeriod::None => None,
        // Amounts of years, months, days, hours, minutes, seconds; tenths and offset zero.
        ValidityPeriod::Relative => {
            let days = (left_secs / 86_400).min(99);
            let hours = left_secs % 86_400 / 3600;
            let minutes = left_secs % 3600 / 60;
            let seconds = left_secs % 60;
            Some(format!(
                "0000{days:02}{hours:02}{minutes:02}{seconds:02}000R"
            ))
        }
        // UTC, as Kannel writes it: tenths 0, offset 00, `+`.
        ValidityPeriod::Absolute => {
            let end = time::OffsetDateTime::from_unix_timestamp(expires_at / 1000).ok()?;
            Some(format!(
                "{:02}{:02}{:02}{:02}{:02}{:02}000+",
                end.year() % 100,
                u8::from(end.month()),
                end.day(),
                end.hour(),
                end.minute(),
                end.second()
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validity_is_written_in_the_smpp_time_format() {
        let now = 1_740_839_400_000; // 2025-03-01 14:30:00 UTC
        let two_hours = now + 2 * 3600 * 1000;
        assert_eq!(validity_period(ValidityPeriod::None, two_hours, now), None);
        assert_eq!(
            validity_period(ValidityPeriod::Relative, two_hours, now).as_deref(),
            Some("000000020000000R")
        );
        let long = now + (86_400 + 3661) * 1000;
        assert_eq!(
            validity_period(ValidityPeriod::Relative, long, now).as_deref(),
            Some("000001010101000R")
        );
        assert_eq!(
            validity_period(ValidityPeriod::Absolute, now, now - 5000).as_deref(),
            Some("250301143000000+")
        );
    }
}
