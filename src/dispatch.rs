//! The dispatcher: claims due messages from the store, sends each through a carrier, and turns
//! the carrier's answers into the message's next status. [`decide`] is the one place where an
//! SMPP outcome becomes a status or a retry time.

use std::sync::Arc;
use std::time::Duration;

use rusmpp::types::EmptyOrFullCOctetString;
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use crate::config::{MessagesConfig, Schedule, UnknownOutcome};
use crate::encoding;
use crate::message::{Sender, Status, now_ms};
use crate::metrics;
use crate::router::{Facts, NoRoute, Router};
use crate::smpp::status::{StatusClass, classify, describe};
use crate::smpp::{Carrier, SubmitOutcome, submit_pdus, validity_period};
use crate::store::{AcceptedPart, AttemptResult, Claimed, Next, Store, StoreError};

/// Most messages claimed at once.
const MAX_CLAIM: usize = 512;
/// How long a message waits when no carrier of its route can take it.
const NO_CARRIER_DELAY_MS: i64 = 2_000;
/// How long a throttled message waits when its bind could not resend it in time; the link
/// itself slows down too (`smpp::flow`).
const THROTTLED_DELAY_MS: i64 = 1_000;
/// Longest idle sleep: the store is asked again at least this often.
const IDLE_POLL: Duration = Duration::from_secs(5);
/// How often waiting messages are checked for the end of their validity.
const EXPIRY_SWEEP: Duration = Duration::from_secs(1);
/// How often to look for a bind when none is up.
const NO_CARRIER_POLL: Duration = Duration::from_millis(200);
/// First and longest wait before storing an attempt's result again.
const RECORD_RETRY_MIN: Duration = Duration::from_millis(200);
const RECORD_RETRY_MAX: Duration = Duration::from_secs(5);

pub struct Dispatcher {
    pub store: Arc<dyn Store>,
    pub router: Arc<Router>,
    pub config: MessagesConfig,
    pub lease: Duration,
}

impl Dispatcher {
    /// Runs until `shutdown`, then waits for the messages in flight to get their outcome.
    pub async fn run(self, shutdown: CancellationToken) {
        let this = Arc::new(self);
        let mut in_flight = JoinSet::new();
        let signals = this.store.signals().clone();
        let mut next_release = Instant::now() + this.lease / 2;
        let mut next_expiry = Instant::now();
        while !shutdown.is_cancelled() {
            if Instant::now() >= next_release {
                this.release_expired_claims().await;
                next_release = Instant::now() + this.lease / 2;
            }
            if Instant::now() >= next_expiry {
                if let Err(e) = this.store.expire_overdue().await {
                    warn!(error = %e, "expiring overdue messages failed");
                }
                next_expiry = Instant::now() + EXPIRY_SWEEP;
            }
            // With no bind up, claiming would only bounce messages back to the queue.
            let room = if this.router.any_usable() {
                this.config.max_in_flight.saturating_sub(in_flight.len())
            } else {
                0
            };
            let mut wait = IDLE_POLL;
            if worth_claiming(room, in_flight.len(), this.config.max_in_flight) {
                let lease_until = now_ms() + this.lease.as_millis() as i64;
                match this.store.claim_due(room.min(MAX_CLAIM), lease_until).await {
                    Ok(claimed) if !claimed.is_empty() => {
                        for message in claimed {
                            in_flight.spawn(this.clone().send(message, shutdown.clone()));
                        }
                        continue;
                    }
                    Ok(_) => wait = this.until_next_due().await,
                    Err(e) => error!(error = %e, "claiming due messages failed"),
                }
            } else if !this.router.any_usable() {
                wait = NO_CARRIER_POLL;
            }
            tokio::select! {
                () = signals.queue.notified() => {}
                () = sleep(wait) => {}
                Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
                () = shutdown.cancelled() => {}
            }
            while in_flight.try_join_next().is_some() {}
        }
        while in_flight.join_next().await.is_some() {}
    }

    /// Returns to the queue messages whose lease ended without a recorded outcome (an attempt
    /// whose result could not be stored).
    async fn release_expired_claims(&self) {
        match self.store.release_claims(false).await {
            Ok(0) => {}
            Ok(n) => warn!(
                messages = n,
                "leases ended without an outcome; queued again"
            ),
            Err(e) => warn!(error = %e, "releasing expired claims failed"),
        }
    }

    async fn until_next_due(&self) -> Duration {
        match self.store.next_due().await {
            Ok(Some(due)) => {
                Duration::from_millis((due - now_ms()).clamp(0, IDLE_POLL.as_millis() as i64) as u64)
            }
            Ok(None) => IDLE_POLL,
            Err(e) => {
                warn!(error = %e, "reading the next due time failed");
                IDLE_POLL
            }
        }
    }

    /// One attempt at one message; records its result.
    async fn send(self: Arc<Self>, message: Claimed, shutdown: CancellationToken) {
        let result = self.attempt(&message).await;
        debug!(id = %message.id, next = ?result.next, "attempt done");
        self.record(result, &shutdown).await;
    }

    /// Stores an attempt's result, trying again while the store refuses it (a full disk): the
    /// carrier may have accepted the message, and a result never stored sends it again when its
    /// lease ends. Gives up at shutdown or after half the lease; the lease then returns the
    /// message to the queue (`release_expired_claims`), and parts the carrier accepted may be
    /// sent again.
    async fn record(&self, result: AttemptResult, shutdown: &CancellationToken) {
        let give_up = Instant::now() + self.lease / 2;
        let mut delay = RECORD_RETRY_MIN;
        loop {
            let error = match self.store.record_attempts(vec![result.clone()]).await {
                Ok(()) => return,
                Err(error) => error,
            };
            let closed = matches!(error, StoreError::Closed);
            if closed || shutdown.is_cancelled() || Instant::now() + delay > give_up {
                error!(id = %result.id, %error, "recording an attempt failed; its lease will queue it again");
                return;
            }
            if delay == RECORD_RETRY_MIN {
                warn!(id = %result.id, %error, "recording an attempt failed; trying again");
            }
            tokio::select! {
                () = sleep(delay) => {}
                () = shutdown.cancelled() => {}
            }
            delay = (delay * 2).min(RECORD_RETRY_MAX);
        }
    }

    async fn attempt(&self, message: &Claimed) -> AttemptResult {
        let now = now_ms();
        let result = |carrier: Option<String>, accepted, next, note| AttemptResult {
            id: message.id,
            carrier,
            accepted,
            next,
            note,
        };
        if now >= message.expires_at {
            let next = Next::Finish {
                status: Status::Expired,
                detail: "validity period ended before it could be sent".into(),
                error_code: None,
            };
            return result(None, Vec::new(), next, None);
        }
        let facts = Facts {
            recipient: &message.recipient,
            sender: &message.sender,
            account: &message.account,
            category: message.category,
        };
        let plan = match self.router.plan(&facts) {
            Ok(plan) => plan,
            // Accepted under routes that a reload has since changed: it waits for a route.
            Err(NoRoute) => {
                let detail = "no route matches it any more (the routes were reloaded); waiting";
                let next = retry_or_expire(message, now + NO_CARRIER_DELAY_MS, detail.into());
                return result(None, Vec::new(), next, None);
            }
        };
        let usable: Vec<&str> = plan.usable().collect();
        if usable.is_empty() {
            let next = retry_or_expire(message, now + NO_CARRIER_DELAY_MS, plan.unavailable());
            return result(None, Vec::new(), next, None);
        }
        // Carriers of the route passed over before the first usable one, for the history.
        let mut notes: Vec<String> = plan
            .candidates
            .iter()
            .take_while(|c| c.carrier != usable[0])
            .map(|c| format!("{} skipped: {}", c.carrier, c.state.describe()))
            .collect();
        let table = self.router.table();
        for (i, name) in usable.iter().enumerate() {
            let Some(carrier) = self.router.find(name) else {
                continue;
            };
            let outcomes = self.submit_parts(carrier, message).await;
            if let Some(next_name) = usable.get(i + 1)
                && let Some(reason) = failover_reason(&outcomes, |s| table.fails_over(name, s))
            {
                metrics::failover(name, next_name);
                notes.push(format!("{name} {reason}: failed over to {next_name}"));
                continue;
            }
            let (accepted, next) = decide(
                message,
                &outcomes,
                now_ms(),
                &self.config.retry_schedule,
                self.config.on_unknown_outcome,
            );
            let note =
                (!notes.is_empty()).then(|| format!("route {}: {}", plan.rule, notes.join("; ")));
            return result(Some(name.to_string()), accepted, next, note);
        }
        // Only when the carriers of the plan stopped between planning and sending.
        let next = retry_or_expire(message, now_ms() + NO_CARRIER_DELAY_MS, plan.unavailable());
        result(None, Vec::new(), next, None)
    }

    /// Submits the parts of the message not accepted before to one carrier, concurrently.
    async fn submit_parts(
        &self,
        carrier: &Carrier,
        message: &Claimed,
    ) -> Vec<(u32, SubmitOutcome)> {
        let (encoding, parts) = encoding::split(&message.body, message.id.concat_reference());
        let sender = Sender::from_stored(&message.sender);
        let format = carrier.config().multipart;
        // Parts accepted in an earlier attempt are not sent again.
        let (numbered, mut pdus): (Vec<u32>, Vec<_>) =
            submit_pdus(&message.recipient, &sender, encoding, format, parts)
                .into_iter()
                .filter(|(n, _)| !message.accepted_parts.contains(n))
                .unzip();
        let validity = validity_period(
            carrier.config().validity_period,
            message.expires_at,
            now_ms(),
        );
        if let Some(validity) = validity.and_then(|v| v.parse::<EmptyOrFullCOctetString<17>>().ok())
        {
            for pdu in &mut pdus {
                pdu.validity_period = validity.clone();
            }
        }
        let high = message.priority > 0;
        let outcomes =
            futures::future::join_all(pdus.into_iter().map(|pdu| carrier.submit(pdu, high))).await;
        let outcomes: Vec<(u32, SubmitOutcome)> = numbered.into_iter().zip(outcomes).collect();
        for (_, outcome) in &outcomes {
            metrics::submit(&carrier.name, outcome_label(outcome));
        }
        outcomes
    }
}

/// Whether a claim now is worth its cost. A claim costs the store's writer about as much as a
/// few dozen claimed rows whatever its size, so with many messages in flight the dispatcher
/// waits until an eighth of `max_in_flight` is free instead of claiming each freed slot; with
/// few in flight (a quiet queue, or a small limit) it claims at once, for latency.
fn worth_claiming(room: usize, in_flight: usize, max_in_flight: usize) -> bool {
    let chunk = (max_in_flight / 8).clamp(1, MAX_CLAIM);
    room > 0 && (room >= chunk || in_flight < chunk)
}

/// Why the next carrier should have the message, if it should: nothing of this attempt was
/// accepted, and every part was either never written or refused with a status that `fails_over`
/// names. A part written and unanswered may have gone out, so it never fails over.
fn failover_reason(
    outcomes: &[(u32, SubmitOutcome)],
    fails_over: impl Fn(u32) -> bool,
) -> Option<String> {
    let mut reason = None;
    for (_, outcome) in outcomes {
        match outcome {
            SubmitOutcome::NotSent => {
                reason.get_or_insert_with(|| "took nothing in time".to_owned());
            }
            SubmitOutcome::Rejected { status } if fails_over(*status) => {
                reason = Some(format!("refused {}", describe(*status)));
            }
            _ => return None,
        }
    }
    reason
}

fn outcome_label(outcome: &SubmitOutcome) -> &'static str {
    match outcome {
        SubmitOutcome::Accepted { .. } => "accepted",
        SubmitOutcome::Rejected { status } => match classify(*status) {
            StatusClass::Throttled => "throttled",
            StatusClass::Permanent => "rejected_permanent",
            StatusClass::Temporary | StatusClass::Session => "rejected_temporary",
        },
        SubmitOutcome::Unknown { .. } => "unknown",
        SubmitOutcome::NotSent => "not_sent",
        // Only a query_sm is answered so; counted here for completeness.
        SubmitOutcome::Queried { .. } => "queried",
    }
}

/// Turns the outcomes of one attempt's parts into the parts accepted and what comes next.
/// The worst outcome wins: a permanent refusal fails the message; an unknown one follows the
/// configured policy; anything temporary schedules a retry, while the validity lasts.
pub fn decide(
    message: &Claimed,
    outcomes: &[(u32, SubmitOutcome)],
    now: i64,
    schedule: &Schedule,
    on_unknown: UnknownOutcome,
) -> (Vec<AcceptedPart>, Next) {
    let accepted = outcomes
        .iter()
        .filter_map(|(part, outcome)| match outcome {
            SubmitOutcome::Accepted { message_id } => Some(AcceptedPart {
                part: *part,
                carrier_message_id: message_id.clone(),
            }),
            _ => None,
        })
        .collect();
    let rejected = outcomes.iter().find_map(|(_, o)| match o {
        SubmitOutcome::Rejected { status } => Some(*status),
        _ => None,
    });
    if let Some(status) = rejected
        && classify(status) == StatusClass::Permanent
    {
        let next = Next::Finish {
            status: Status::Failed,
            detail: format!("refused by the carrier: {}", describe(status)),
            error_code: Some(format!("{status:#04x}")),
        };
        return (accepted, next);
    }
    let unknown = outcomes.iter().find_map(|(_, o)| match o {
        SubmitOutcome::Unknown { reason } => Some(reason.clone()),
        _ => None,
    });
    if let Some(reason) = unknown {
        let next = match on_unknown {
            UnknownOutcome::Resubmit => retry_or_expire(
                message,
                now,
                format!("{reason}; resubmitting (a duplicate is possible)"),
            ),
            UnknownOutcome::MarkUnknown => Next::Finish {
                status: Status::Unknown,
                detail: reason,
                error_code: None,
            },
        };
        return (accepted, next);
    }
    if let Some(status) = rejected {
        let delay = match classify(status) {
            StatusClass::Throttled => THROTTLED_DELAY_MS,
            _ => schedule.delay_after(message.attempt).as_millis() as i64,
        };
        let detail = format!("temporary refusal: {}; retrying", describe(status));
        return (accepted, retry_or_expire(message, now + delay, detail));
    }
    if outcomes
        .iter()
        .any(|(_, o)| matches!(o, SubmitOutcome::NotSent))
    {
        return (
            accepted,
            retry_or_expire(message, now, "not sent: bind closing".into()),
        );
    }
    (accepted, Next::Sent)
}

fn retry_or_expire(message: &Claimed, at: i64, detail: String) -> Next {
    if at >= message.expires_at {
        Next::Finish {
            status: Status::Expired,
            detail: format!("validity period ends before the next attempt ({detail})"),
            error_code: None,
        }
    } else {
        Next::Retry { at, detail }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoding::Encoding;
    use crate::message::MessageId;

    fn claimed(attempt: u32, expires_at: i64) -> Claimed {
        Claimed {
            id: MessageId::new(),
            account: "a".into(),
            recipient: "+46701234567".into(),
            sender: "iP1".into(),
            body: "hi".into(),
            category: crate::message::Category::Transactional,
            priority: 0,
            encoding: Encoding::Gsm7,
            segments: 2,
            attempt,
            expires_at,
            accepted_parts: vec![],
        }
    }

    fn accepted(id: &str) -> SubmitOutcome {
        SubmitOutcome::Accepted {
            message_id: id.into(),
        }
    }

    const NOW: i64 = 1_000_000;

    fn run(
        outcomes: &[(u32, SubmitOutcome)],
        on_unknown: UnknownOutcome,
    ) -> (Vec<AcceptedPart>, Next) {
        let schedule = Schedule::from_secs(&[5, 30]);
        decide(
            &claimed(1, NOW + 3_600_000),
            outcomes,
            NOW,
            &schedule,
            on_unknown,
        )
    }

    #[test]
    fn all_parts_accepted_is_sent() {
        let (parts, next) = run(
            &[(1, accepted("a")), (2, accepted("b"))],
            UnknownOutcome::Resubmit,
        );
        assert_eq!(next, Next::Sent);
        assert_eq!(parts.len(), 2);
    }

    #[test]
    fn a_permanent_refusal_fails_the_message() {
        let (_, next) = run(
            &[
                (1, accepted("a")),
                (2, SubmitOutcome::Rejected { status: 0x0B }),
            ],
            UnknownOutcome::Resubmit,
        );
        assert!(
            matches!(next, Next::Finish { status: Status::Failed, ref error_code, .. } if error_code.as_deref() == Some("0x0b"))
        );
    }

    #[test]
    fn throttled_submit_is_rescheduled_not_failed() {
        let (parts, next) = run(
            &[
                (1, accepted("a")),
                (2, SubmitOutcome::Rejected { status: 0x58 }),
            ],
            UnknownOutcome::Resubmit,
        );
        assert_eq!(parts.len(), 1, "the accepted part is kept");
        assert!(matches!(next, Next::Retry { at, .. } if at == NOW + THROTTLED_DELAY_MS));
    }

    #[test]
    fn temporary_errors_follow_the_retry_schedule() {
        let (_, next) = run(
            &[(1, SubmitOutcome::Rejected { status: 0x14 })],
            UnknownOutcome::Resubmit,
        );
        assert!(matches!(next, Next::Retry { at, .. } if at == NOW + 5_000));
        let schedule = Schedule::from_secs(&[5, 30]);
        let (_, later) = decide(
            &claimed(7, NOW + 3_600_000),
            &[(1, SubmitOutcome::Rejected { status: 0x14 })],
            NOW,
            &schedule,
            UnknownOutcome::Resubmit,
        );
        assert!(
            matches!(later, Next::Retry { at, .. } if at == NOW + 30_000),
            "the last delay repeats"
        );
    }

    #[test]
    fn a_retry_past_the_validity_expires_the_message() {
        let schedule = Schedule::from_secs(&[60]);
        let (_, next) = decide(
            &claimed(1, NOW + 1_000),
            &[(1, SubmitOutcome::Rejected { status: 0x14 })],
            NOW,
            &schedule,
            UnknownOutcome::Resubmit,
        );
        assert!(matches!(
            next,
            Next::Finish {
                status: Status::Expired,
                ..
            }
        ));
    }

    #[test]
    fn unknown_outcomes_follow_the_configured_policy() {
        let lost = [(
            1,
            SubmitOutcome::Unknown {
                reason: "link lost".into(),
            },
        )];
        let (_, resubmit) = run(&lost, UnknownOutcome::Resubmit);
        assert!(
            matches!(resubmit, Next::Retry { at, ref detail } if at == NOW && detail.contains("duplicate"))
        );
        let (_, mark) = run(&lost, UnknownOutcome::MarkUnknown);
        assert!(matches!(
            mark,
            Next::Finish {
                status: Status::Unknown,
                ..
            }
        ));
    }

    #[test]
    fn only_unsent_or_listed_refusals_fail_over() {
        let throttled = SubmitOutcome::Rejected { status: 0x58 };
        let listed = |s: u32| s == 0x58;
        assert_eq!(
            failover_reason(
                &[(1, throttled.clone()), (2, SubmitOutcome::NotSent)],
                listed
            )
            .as_deref(),
            Some("refused 0x58 ESME_RTHROTTLED")
        );
        assert!(failover_reason(&[(1, SubmitOutcome::NotSent)], listed).is_some());
        assert_eq!(failover_reason(&[(1, throttled.clone())], |_| false), None);
        let lost = SubmitOutcome::Unknown {
            reason: "link lost".into(),
        };
        assert_eq!(
            failover_reason(&[(1, throttled.clone()), (2, lost)], listed),
            None
        );
        assert_eq!(
            failover_reason(&[(1, throttled), (2, accepted("a"))], listed),
            None
        );
    }

    #[test]
    fn claims_wait_for_a_chunk_of_room_only_when_many_are_in_flight() {
        assert!(worth_claiming(2048, 0, 2048), "an idle dispatcher claims");
        assert!(worth_claiming(3, 100, 2048), "few in flight: claim at once");
        assert!(
            !worth_claiming(3, 2045, 2048),
            "one freed slot of many waits"
        );
        assert!(worth_claiming(256, 1792, 2048), "an eighth free is a chunk");
        assert!(!worth_claiming(0, 2048, 2048));
        assert!(worth_claiming(1, 3, 4), "a small limit claims each slot");
    }

    #[test]
    fn not_sent_parts_are_retried_at_once() {
        let (_, next) = run(&[(1, SubmitOutcome::NotSent)], UnknownOutcome::MarkUnknown);
        assert!(matches!(next, Next::Retry { at, .. } if at == NOW));
    }
}
