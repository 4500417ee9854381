//! One SMPP bind: a task that owns its socket and everything in flight on it.
//!
//! The task connects, binds as a transceiver, then loops over one `select!`: frames from the
//! carrier, submit jobs from the carrier's queue (taken only while the window has room and the
//! rate limiter allows), deliver_sm acknowledgements once their receipts are stored, and a timer
//! for response deadlines and enquire_link. A sequence number is registered before its PDU is
//! written. When the link is lost, every submit in flight gets [`SubmitOutcome::Unknown`]: it may
//! or may not have reached the carrier, and the dispatcher applies the configured policy.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use futures::stream::FuturesOrdered;
use futures::{FutureExt, SinkExt, StreamExt, future::BoxFuture};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use rand::Rng;
use rusmpp::pdus::{BindTransceiver, DeliverSm, DeliverSmResp};
use rusmpp::types::COctetString;
use rusmpp::values::{InterfaceVersion, Npi, Ton};
use rusmpp::{Command, CommandStatus, Pdu};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, watch};
use tokio::time::{Instant, sleep, timeout};
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::codec::{Frame, FrameCodec};
use super::status::{self, ESME_RTHROTTLED};
use super::{JobQueue, Limits};
use crate::config::CarrierConfig;
use crate::metrics;

/// Largest PDU we accept from a carrier; a submit_sm or deliver_sm is well under 1 KiB.
const MAX_PDU_LENGTH: usize = 4096;
/// How long the link pauses after ESME_RTHROTTLED (Kannel pauses about one second).
const THROTTLE_PAUSE: Duration = Duration::from_secs(1);
/// How often deadlines are checked.
const TICK: Duration = Duration::from_millis(100);
const DELIVER_SM: u32 = 0x0000_0005;

/// One segment to submit (or a query_sm), and where its outcome goes.
pub struct SubmitJob {
    pub pdu: Pdu,
    pub reply: oneshot::Sender<SubmitOutcome>,
    /// A job still queued at this time is answered `NotSent`: its message goes back to the
    /// store (and may take another carrier) instead of waiting on a dead link.
    pub not_after: Instant,
}

/// What became of one submit_sm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitOutcome {
    /// The carrier accepted it; its receipts will carry this id.
    Accepted { message_id: String },
    /// The carrier answered with an error status.
    Rejected { status: u32 },
    /// Written, but never answered: it may or may not have reached the carrier.
    Unknown { reason: String },
    /// Never written (the bind was closing): safe to send again.
    NotSent,
    /// The answer to a query_sm (never to a submit_sm): message_state and error_code.
    Queried { message_state: u8, error_code: u8 },
}

/// Handles a deliver_sm (receipt or inbound SMS) and says which command_status to answer
/// with; it returns only once what must be kept is stored.
pub type DeliverHandler = Arc<dyn Fn(DeliverSm) -> BoxFuture<'static, u32> + Send + Sync>;

/// What the rest of the gateway can see of a carrier's binds.
#[derive(Debug, Default)]
pub struct CarrierHealth {
    pub bound: AtomicUsize,
    /// A bind was refused for its credentials and has stopped.
    pub credentials_refused: AtomicBool,
    /// Paused by an operator: bound, but the router sends it nothing new.
    pub paused: AtomicBool,
}

/// Everything one bind task needs.
pub struct Bind {
    pub carrier: Arc<CarrierConfig>,
    pub address: String,
    pub index: usize,
    pub jobs: Arc<JobQueue>,
    /// Rate and window; a reload changes them while the bind stays up.
    pub limits: watch::Receiver<Limits>,
    pub deliver: DeliverHandler,
    pub health: Arc<CarrierHealth>,
    pub shutdown: CancellationToken,
}

#[derive(Debug, thiserror::Error)]
enum BindError {
    #[error("connect failed: {0}")]
    Connect(std::io::Error),
    #[error("timed out")]
    Timeout,
    #[error("bind refused with {}", status::describe(*.0))]
    Refused(u32),
    #[error("link closed during bind")]
    Closed,
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// Why a bound session ended.
enum SessionEnd {
    Shutdown,
    Lost(String),
}

type Link = Framed<TcpStream, FrameCodec>;

/// Runs one bind until shutdown: bind, serve, and reconnect with exponential backoff and jitter.
pub async fn run(bind: Bind) {
    let carrier = &bind.carrier;
    let mut backoff = carrier.reconnect_min;
    loop {
        if bind.shutdown.is_cancelled() {
            return;
        }
        match connect_and_bind(&bind).await {
            Ok(link) => {
                backoff = carrier.reconnect_min;
                let up = bind.health.bound.fetch_add(1, Ordering::SeqCst) + 1;
                metrics::binds_up(&carrier.name, up);
                info!(carrier = %carrier.name, bind = bind.index, "bound");
                let end = Session::new(&bind).serve(link).await;
                let up = bind.health.bound.fetch_sub(1, Ordering::SeqCst) - 1;
                metrics::binds_up(&carrier.name, up);
                metrics::window_in_flight(&carrier.name, bind.index, 0);
                if up == 0 {
                    bind.jobs.return_all().await;
                }
                match end {
                    SessionEnd::Shutdown => {
                        info!(carrier = %carrier.name, bind = bind.index, "unbound for shutdown");
                        return;
                    }
                    SessionEnd::Lost(reason) => {
                        metrics::reconnect(&carrier.name, "link_lost");
                        warn!(carrier = %carrier.name, bind = bind.index, %reason, "link lost")
                    }
                }
            }
            Err(BindError::Refused(code)) if status::is_credential_failure(code) => {
                error!(
                    carrier = %carrier.name,
                    bind = bind.index,
                    status = %status::describe(code),
                    "bind refused for its credentials; this bind stops until the configuration is fixed"
                );
                bind.health
                    .credentials_refused
                    .store(true, Ordering::SeqCst);
                metrics::bind_credentials_refused(&carrier.name, true);
                return;
            }
            Err(e) => {
                metrics::reconnect(&carrier.name, "bind_failed");
                warn!(carrier = %carrier.name, bind = bind.index, error = %e, "bind failed")
            }
        }
        let delay = with_jitter(backoff);
        backoff = (backoff * 2).min(carrier.reconnect_max);
        tokio::select! {
            () = sleep(delay) => {}
            () = bind.shutdown.cancelled() => return,
        }
    }
}

/// A limiter of `rate` segments per second with a burst of a tenth of a second: a full-rate
/// burst at connect can trip carrier throttles.
fn limiter(rate: u32) -> DefaultDirectRateLimiter {
    let per_second = NonZeroU32::new(rate).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new((rate / 10).max(1)).unwrap_or(NonZeroU32::MIN);
    RateLimiter::direct(Quota::per_second(per_second).allow_burst(burst))
}

/// Up to a quarter less than `delay`, so that binds dropped together do not return together.
pub(crate) fn with_jitter(delay: Duration) -> Duration {
    let factor = rand::rng().random_range(0.75..=1.0);
    delay.mul_f64(factor)
}

async fn connect_and_bind(bind: &Bind) -> Result<Link, BindError> {
    let carrier = &bind.carrier;
    let stream = timeout(carrier.connect_timeout, TcpStream::connect(&bind.address))
        .await
        .map_err(|_| BindError::Timeout)?
        .map_err(BindError::Connect)?;
    stream.set_nodelay(true)?;
    let mut link = Framed::new(stream, FrameCodec::new(MAX_PDU_LENGTH));
    let request = BindTransceiver::builder()
        .system_id(c_octets(&carrier.system_id))
        .password(c_octets(carrier.password.expose()))
        .system_type(c_octets(&carrier.system_type))
        .interface_version(InterfaceVersion::Smpp3_4)
        .addr_ton(Ton::Unknown)
        .addr_npi(Npi::Unknown)
        .build();
    link.send(Command::new(CommandStatus::EsmeRok, 1, request))
        .await?;
    let answer = timeout(carrier.response_timeout, async {
        while let Some(frame) = link.next().await {
            match frame {
                Ok(Frame::Command(cmd)) if cmd.sequence_number() == 1 => return Ok(cmd),
                Ok(_) => continue,
                Err(e) => return Err(BindError::Io(std::io::Error::other(e.to_string()))),
            }
        }
        Err(BindError::Closed)
    })
    .await
    .map_err(|_| BindError::Timeout)??;
    let code = u32::from(answer.status());
    match answer.pdu() {
        Some(Pdu::BindTransceiverResp(_)) if code == status::ESME_ROK => Ok(link),
        _ if code == status::ESME_RALYBND => Ok(link),
        _ => Err(BindError::Refused(if code == 0 {
            status::ESME_RBINDFAIL
        } else {
            code
        })),
    }
}

/// A C-string field from configuration; validation bounds the lengths, so this only fails on
/// a NUL byte, which becomes an empty field.
fn c_octets<const MIN: usize, const MAX: usize>(value: &str) -> COctetString<MIN, MAX> {
    value.parse().unwrap_or_default()
}

struct Pending {
    reply: oneshot::Sender<SubmitOutcome>,
    sent_at: Instant,
    deadline: Instant,
}

struct Session<'a> {
    bind: &'a Bind,
    limits: watch::Receiver<Limits>,
    window: usize,
    rate: u32,
    limiter: DefaultDirectRateLimiter,
    pending: HashMap<u32, Pending>,
    next_sequence: u32,
    /// A job taken from the queue, waiting for the rate limiter.
    ready: Option<SubmitJob>,
    throttled_until: Option<Instant>,
    enquire_link: Option<(u32, Instant)>,
    last_enquire: Instant,
    draining: Option<Instant>,
    acks: FuturesOrdered<BoxFuture<'static, (u32, u32)>>,
}

impl<'a> Session<'a> {
    fn new(bind: &'a Bind) -> Session<'a> {
        let mut limits = bind.limits.clone();
        let Limits {
            rate_per_second,
            window,
        } = *limits.borrow_and_update();
        Session {
            bind,
            limits,
            window,
            rate: rate_per_second,
            limiter: limiter(rate_per_second),
            pending: HashMap::new(),
            next_sequence: 1,
            ready: None,
            throttled_until: None,
            enquire_link: None,
            last_enquire: Instant::now(),
            draining: None,
            acks: FuturesOrdered::new(),
        }
    }

    fn sequence(&mut self) -> u32 {
        // SMPP sequence numbers run 1..=0x7FFFFFFF (3.4 §5.1.4); the bind request used 1.
        self.next_sequence = if self.next_sequence >= 0x7FFF_FFFF {
            2
        } else {
            self.next_sequence + 1
        };
        self.next_sequence
    }

    fn window_open(&self) -> bool {
        self.draining.is_none()
            && self.pending.len() < self.window
            && self.throttled_until.is_none_or(|t| t <= Instant::now())
    }

    async fn serve(mut self, mut link: Link) -> SessionEnd {
        let mut tick = tokio::time::interval(TICK);
        let jobs = self.bind.jobs.clone();
        let end = loop {
            let can_take = self.ready.is_none() && self.window_open();
            let can_send = self.ready.is_some() && self.window_open();
            tokio::select! {
                biased;
                () = self.bind.shutdown.cancelled(), if self.draining.is_none() => {
                    self.draining = Some(Instant::now() + self.bind.carrier.drain_timeout);
                    if let Some(job) = self.ready.take() {
                        let _ = job.reply.send(SubmitOutcome::NotSent);
                    }
                }
                // Acknowledgements and timers come before new frames, so that a busy carrier
                // cannot starve them.
                Some((sequence, code)) = self.acks.next(), if !self.acks.is_empty() => {
                    let resp = Command::new(CommandStatus::from(code), sequence, DeliverSmResp::default());
                    if let Err(e) = link.send(resp).await {
                        break SessionEnd::Lost(format!("write failed: {e}"));
                    }
                }
                _ = tick.tick() => {
                    if let Err(end) = self.on_tick(&mut link).await {
                        break end;
                    }
                }
                frame = link.next() => match frame {
                    Some(Ok(frame)) => {
                        if let Err(end) = self.on_frame(&mut link, frame).await {
                            break end;
                        }
                    }
                    Some(Err(e)) => break SessionEnd::Lost(format!("unreadable stream: {e}")),
                    None => break SessionEnd::Lost("closed by the carrier".into()),
                },
                () = self.limiter.until_ready(), if can_send => {
                    if let Some(job) = self.ready.take()
                        && let Err(e) = self.submit(&mut link, job).await
                    {
                        break SessionEnd::Lost(format!("write failed: {e}"));
                    }
                }
                job = jobs.next(), if can_take => match job {
                    Some(job) if job.not_after <= Instant::now() => {
                        let _ = job.reply.send(SubmitOutcome::NotSent);
                    }
                    Some(job) => self.ready = Some(job),
                    None => self.draining = self.draining.or(Some(Instant::now())),
                },
            }
        };
        self.fail_in_flight(&end);
        end
    }

    async fn submit(&mut self, link: &mut Link, job: SubmitJob) -> std::io::Result<()> {
        let sequence = self.sequence();
        let sent_at = Instant::now();
        self.pending.insert(
            sequence,
            Pending {
                reply: job.reply,
                sent_at,
                deadline: sent_at + self.bind.carrier.response_timeout,
            },
        );
        metrics::window_in_flight(&self.bind.carrier.name, self.bind.index, self.pending.len());
        link.send(Command::new(CommandStatus::EsmeRok, sequence, job.pdu))
            .await
    }

    async fn on_frame(&mut self, link: &mut Link, frame: Frame) -> Result<(), SessionEnd> {
        let lost = |e: std::io::Error| SessionEnd::Lost(format!("write failed: {e}"));
        let command = match frame {
            Frame::Command(command) => command,
            Frame::Undecodable {
                command_id,
                sequence_number,
                error,
            } => {
                warn!(carrier = %self.bind.carrier.name, command_id = format!("{command_id:#010x}"), %error, "undecodable PDU");
                if command_id & 0x8000_0000 != 0 {
                    // An unreadable answer to one of ours: its outcome is unknown.
                    self.answer(
                        sequence_number,
                        SubmitOutcome::Unknown {
                            reason: format!("unreadable response: {error}"),
                        },
                    );
                } else if command_id == DELIVER_SM {
                    // A well-framed deliver_sm with a bad body gets its own response (SMPP 3.4
                    // §2.8), "permanent error", so that the carrier does not resend it for ever.
                    let status = CommandStatus::from(status::ESME_RX_P_APPN);
                    let resp = Command::new(status, sequence_number, DeliverSmResp::default());
                    link.send(resp).await.map_err(lost)?;
                } else {
                    let nack = Command::new(
                        CommandStatus::EsmeRunknownerr,
                        sequence_number,
                        Pdu::GenericNack,
                    );
                    link.send(nack).await.map_err(lost)?;
                }
                return Ok(());
            }
        };
        let sequence = command.sequence_number();
        let code = u32::from(command.status());
        match command.pdu() {
            Some(Pdu::SubmitSmResp(resp)) => {
                let outcome = if code == status::ESME_ROK {
                    SubmitOutcome::Accepted {
                        message_id: resp.message_id().as_str().to_owned(),
                    }
                } else {
                    SubmitOutcome::Rejected { status: code }
                };
                self.answer(sequence, outcome);
            }
            Some(Pdu::QuerySmResp(resp)) => {
                self.answer(sequence, super::query::outcome(code, resp));
            }
            None if matches!(
                command.id(),
                rusmpp::CommandId::SubmitSmResp | rusmpp::CommandId::QuerySmResp
            ) =>
            {
                // An error response with no body (the SMPP 3.4 rule).
                self.answer(sequence, SubmitOutcome::Rejected { status: code });
            }
            Some(Pdu::GenericNack) => {
                self.answer(sequence, SubmitOutcome::Rejected { status: code });
            }
            Some(Pdu::DeliverSm(deliver)) => {
                let handler = self.bind.deliver.clone();
                let deliver = deliver.clone();
                self.acks
                    .push_back(async move { (sequence, handler(deliver).await) }.boxed());
            }
            Some(Pdu::EnquireLink) => {
                link.send(Command::new(
                    CommandStatus::EsmeRok,
                    sequence,
                    Pdu::EnquireLinkResp,
                ))
                .await
                .map_err(lost)?;
            }
            Some(Pdu::EnquireLinkResp) => {
                if self.enquire_link.is_some_and(|(s, _)| s == sequence) {
                    self.enquire_link = None;
                }
            }
            Some(Pdu::Unbind) => {
                let _ = link
                    .send(Command::new(
                        CommandStatus::EsmeRok,
                        sequence,
                        Pdu::UnbindResp,
                    ))
                    .await;
                return Err(SessionEnd::Lost("the carrier unbound".into()));
            }
            Some(Pdu::UnbindResp) if self.draining.is_some() => {
                return Err(SessionEnd::Shutdown);
            }
            Some(Pdu::AlertNotification(_)) => {}
            _ if command.id().is_response() => {
                debug!(carrier = %self.bind.carrier.name, id = ?command.id(), "ignored response");
            }
            _ => {
                let nack = Command::new(CommandStatus::EsmeRinvcmdid, sequence, Pdu::GenericNack);
                link.send(nack).await.map_err(lost)?;
            }
        }
        Ok(())
    }

    fn answer(&mut self, sequence: u32, outcome: SubmitOutcome) {
        let Some(pending) = self.pending.remove(&sequence) else {
            debug!(carrier = %self.bind.carrier.name, sequence, "response to nothing in flight");
            return;
        };
        let carrier = &self.bind.carrier.name;
        metrics::submit_latency(carrier, pending.sent_at.elapsed());
        metrics::window_in_flight(carrier, self.bind.index, self.pending.len());
        if outcome
            == (SubmitOutcome::Rejected {
                status: ESME_RTHROTTLED,
            })
        {
            metrics::throttled(carrier);
            self.throttled_until = Some(Instant::now() + THROTTLE_PAUSE);
        }
        let _ = pending.reply.send(outcome);
    }

    /// Takes a reloaded rate and window; a new rate gets a new limiter.
    fn follow_limits(&mut self) {
        if !self.limits.has_changed().unwrap_or(false) {
            return;
        }
        let limits = *self.limits.borrow_and_update();
        if limits.rate_per_second != self.rate {
            self.rate = limits.rate_per_second;
            self.limiter = limiter(self.rate);
        }
        self.window = limits.window;
        info!(carrier = %self.bind.carrier.name, bind = self.bind.index, rate = self.rate, window = self.window, "limits reloaded");
    }

    async fn on_tick(&mut self, link: &mut Link) -> Result<(), SessionEnd> {
        self.follow_limits();
        let now = Instant::now();
        if self.throttled_until.is_some_and(|t| t <= now) {
            self.throttled_until = None;
        }
        if self.pending.values().any(|p| p.deadline <= now) {
            return Err(SessionEnd::Lost(format!(
                "no submit_sm_resp within {:?}",
                self.bind.carrier.response_timeout
            )));
        }
        if let Some((_, deadline)) = self.enquire_link
            && deadline <= now
        {
            return Err(SessionEnd::Lost("enquire_link unanswered".into()));
        }
        if let Some(deadline) = self.draining {
            if self.pending.is_empty() && self.acks.is_empty() || deadline <= now {
                return Err(self.unbind(link).await);
            }
            return Ok(());
        }
        if now.duration_since(self.last_enquire) >= self.bind.carrier.enquire_link_interval {
            self.last_enquire = now;
            let sequence = self.sequence();
            self.enquire_link = Some((sequence, now + self.bind.carrier.response_timeout));
            link.send(Command::new(
                CommandStatus::EsmeRok,
                sequence,
                Pdu::EnquireLink,
            ))
            .await
            .map_err(|e| SessionEnd::Lost(format!("write failed: {e}")))?;
        }
        Ok(())
    }

    /// Sends unbind and waits briefly for unbind_resp; the session is over either way.
    async fn unbind(&mut self, link: &mut Link) -> SessionEnd {
        let sequence = self.sequence();
        if link
            .send(Command::new(CommandStatus::EsmeRok, sequence, Pdu::Unbind))
            .await
            .is_err()
        {
            return SessionEnd::Shutdown;
        }
        let _ = timeout(Duration::from_secs(2), async {
            while let Some(Ok(frame)) = link.next().await {
                let Frame::Command(command) = frame else {
                    continue;
                };
                let code = u32::from(command.status());
                match command.pdu() {
                    _ if command.sequence_number() == sequence => break,
                    // Answers to what is still in flight decide whether a message went out:
                    // they are not thrown away.
                    Some(Pdu::SubmitSmResp(resp)) if code == status::ESME_ROK => {
                        let message_id = resp.message_id().as_str().to_owned();
                        let outcome = SubmitOutcome::Accepted { message_id };
                        self.answer(command.sequence_number(), outcome);
                    }
                    Some(Pdu::SubmitSmResp(_) | Pdu::GenericNack) | None => {
                        let outcome = SubmitOutcome::Rejected { status: code };
                        self.answer(command.sequence_number(), outcome);
                    }
                    _ => {}
                }
            }
        })
        .await;
        SessionEnd::Shutdown
    }

    fn fail_in_flight(&mut self, end: &SessionEnd) {
        let reason = match end {
            SessionEnd::Shutdown => {
                "bind closed at shutdown before the carrier answered".to_owned()
            }
            SessionEnd::Lost(reason) => format!("link lost before the carrier answered: {reason}"),
        };
        for (_, pending) in self.pending.drain() {
            let _ = pending.reply.send(SubmitOutcome::Unknown {
                reason: reason.clone(),
            });
        }
        if let Some(job) = self.ready.take() {
            let _ = job.reply.send(SubmitOutcome::NotSent);
        }
    }
}
