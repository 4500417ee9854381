//! Webhook delivery from the durable outbox: signed, retried with backoff, never lost on a
//! restart (a claimed webhook is leased; a crash returns it when the lease ends).
//!
//! Every request carries `X-Smsgw-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256>` over
//! `"<t>.<body>"` with the account's webhook secret. Receivers check the signature and reject
//! old timestamps, which stops replays ([`verify`]).

pub mod egress;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::config::WebhooksConfig;
use crate::message::now_ms;
use crate::metrics;
use crate::store::{Store, WebhookCopy, WebhookJob, WebhookResult};
use crate::webhook::egress::{Guarded, Reach, Refused};

pub const SIGNATURE_HEADER: &str = "x-smsgw-signature";
/// Webhooks claimed at once, per unit of concurrency.
const CLAIM_FACTOR: usize = 8;
/// Most webhooks claimed at once, and handed at once: bounds the sender's memory (~400 bytes
/// a webhook) and the writer's time on one claim.
const MOST_HELD: usize = 32_768;
/// Most results stored in one operation.
const RESULTS_PER_COMMIT: usize = 512;
const IDLE_POLL: Duration = Duration::from_secs(5);
/// Longest a claimed webhook is put back for because its account's receiver is behind: a
/// receiver that recovers gets it again within this.
const MOST_DEFERRED: Duration = Duration::from_secs(60);

pub struct WebhookSender {
    pub store: Arc<dyn Store>,
    /// Webhook secrets and URLs per account, among the reloadable settings.
    pub live: crate::reload::Live,
    pub config: WebhooksConfig,
    pub egress: Egress,
}

/// The HTTP clients webhooks are posted with, each connecting only where its [`Reach`] permits.
pub struct Egress {
    /// For URLs an account gave (`callback_url`): public addresses only.
    public: reqwest::Client,
    /// For the URL the operator configured as an account's `webhook_url`: public addresses and
    /// `webhooks.allow_internal`.
    operator: reqwest::Client,
    public_reach: Reach,
    operator_reach: Reach,
}

impl Egress {
    /// Fails only if the TLS backend cannot start: a client without the guard is no fallback.
    pub fn new(config: &WebhooksConfig) -> Result<Egress, reqwest::Error> {
        let operator_reach = Reach::with_internal(config.internal_networks());
        Ok(Egress {
            public: Egress::client(config, Reach::public())?,
            operator: Egress::client(config, operator_reach.clone())?,
            public_reach: Reach::public(),
            operator_reach,
        })
    }

    fn client(config: &WebhooksConfig, reach: Reach) -> Result<reqwest::Client, reqwest::Error> {
        reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(5)))
            // A redirect or a proxy (HTTP_PROXY from the environment) would take the post to
            // an address the resolver never judged.
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .dns_resolver(Guarded::system(reach))
            .build()
    }
}

impl WebhookSender {
    /// Posts webhooks until `shutdown`; posts in flight then finish (bounded by the timeout).
    ///
    /// Most webhooks are handed over by the store as it commits them (see
    /// [`crate::store::Handoff`]); the outbox is claimed from only when rows may wait there:
    /// at start, when the store wrote one unleased (no room here), or one is due again.
    ///
    /// Each account has a [`Lane`]: its webhooks wait there and it posts at most
    /// `webhooks.concurrency` at once, so an account whose receiver is slow or dead holds up
    /// only its own webhooks. A post holds its place in the lane only for the HTTP exchange;
    /// its result goes to a recorder that stores many results in one operation, so slow
    /// commits do not throttle the posting.
    pub async fn run(self, shutdown: CancellationToken) {
        let this = Arc::new(self);
        let concurrency = this.config.concurrency;
        let mut lanes: HashMap<String, Lane> = HashMap::new();
        let mut posts = JoinSet::new();
        let (finished, mut done) = mpsc::unbounded_channel::<(String, Duration)>();
        let (results, outcomes) = mpsc::channel(concurrency * 4);
        let signals = this.store.signals().clone();
        let recorder = tokio::spawn(record_results(this.store.clone(), outcomes));
        // Claims are made in large batches (each is a trip through the store's writer, which is
        // busy under load) and posted as lanes free up; the lease covers the wait.
        // An account that batches takes that many more webhooks per post.
        let largest_batch = this.live.load().webhook_batches.values().copied().max();
        let claim_size = (concurrency * CLAIM_FACTOR * largest_batch.unwrap_or(1)).min(MOST_HELD);
        let lease_ms = this.config.timeout.as_millis() as i64 * (CLAIM_FACTOR as i64 + 2) + 30_000;
        // A claimed webhook is kept only if its lane should post it within this, well inside
        // its lease (CLAIM_FACTOR rounds of posts that each take the whole timeout).
        let hold_for = this.config.timeout * CLAIM_FACTOR as u32;
        signals.handoff.open(claim_size);
        let mut outbox_may_hold = true;
        let mut next_look = Instant::now();
        while !shutdown.is_cancelled() {
            while let Ok((account, took)) = done.try_recv() {
                if let Some(lane) = lanes.get_mut(&account) {
                    lane.finished(took);
                }
            }
            while posts.try_join_next().is_some() {}
            let handed = signals.handoff.take();
            if Instant::now() >= next_look {
                outbox_may_hold = true;
            }
            let mut claimed = Vec::new();
            if outbox_may_hold && this.worth_claiming(&lanes) {
                let held: usize = lanes.values().map(|lane| lane.held).sum();
                let room = claim_size.min(MOST_HELD.saturating_sub(held));
                if room > 0 {
                    claimed = this.claim(room, lease_ms).await;
                    outbox_may_hold = claimed.len() == room;
                    if !outbox_may_hold {
                        next_look = Instant::now() + this.until_next_due().await;
                    }
                }
            }
            let took_any = !handed.is_empty() || !claimed.is_empty();
            if took_any {
                let deferred = {
                    let live = this.live.load();
                    let batch = |account: &str| live.webhook_batches.get(account).map_or(1, |n| *n);
                    let behind = Behind {
                        concurrency,
                        hold_for,
                        timeout: this.config.timeout,
                        now: now_ms(),
                    };
                    behind.queue(
                        &mut lanes,
                        requests(handed, batch),
                        requests(claimed, batch),
                    )
                };
                if !deferred.is_empty() {
                    debug!(
                        webhooks = deferred.len(),
                        "webhooks put back: their accounts' receivers are behind"
                    );
                }
                for outcome in deferred {
                    let _ = results.send(outcome).await;
                }
            }
            for (account, lane) in lanes.iter_mut() {
                while let Some(request) = lane.next(concurrency) {
                    let this = this.clone();
                    let results = results.clone();
                    let finished = finished.clone();
                    let account = account.clone();
                    posts.spawn(async move {
                        let started = Instant::now();
                        let outcomes = this.deliver(request).await;
                        let _ = finished.send((account, started.elapsed()));
                        let handed = outcomes
                            .iter()
                            .filter(|(job, _)| job.copy == WebhookCopy::Event);
                        this.store.signals().handoff.give_back(handed.count());
                        for outcome in outcomes {
                            let _ = results.send(outcome).await;
                        }
                    });
                }
            }
            if took_any {
                continue;
            }
            // Wait for work: handed jobs, a row written to the outbox, the next due one, or a
            // finished post that makes room for a waiting request or a claim. No polling
            // meanwhile, and a post that finishes with nothing to follow it costs no round.
            let notified = signals.webhooks.notified();
            let handed = signals.handoff.handed.notified();
            let look = sleep_until(next_look);
            let stop = shutdown.cancelled();
            tokio::pin!(notified, handed, look, stop);
            loop {
                tokio::select! {
                    () = &mut notified => {
                        outbox_may_hold = true;
                        break;
                    }
                    () = &mut handed => break,
                    () = &mut look, if !outbox_may_hold => {
                        outbox_may_hold = true;
                        break;
                    }
                    Some((account, took)) = done.recv() => {
                        if let Some(lane) = lanes.get_mut(&account) {
                            lane.finished(took);
                            if !lane.waiting.is_empty() || outbox_may_hold {
                                break;
                            }
                        }
                    }
                    () = &mut stop => break,
                }
            }
        }
        // Waiting, or handed and not taken: back to the outbox for the next start.
        let waiting = lanes
            .into_values()
            .flat_map(|lane| lane.waiting)
            .flat_map(|request| request.jobs);
        for job in waiting.chain(signals.handoff.close()) {
            let _ = results.send((job, WebhookResult::Unposted)).await;
        }
        while posts.join_next().await.is_some() {}
        drop(results);
        let _ = recorder.await;
    }

    /// Whether a claim may bring webhooks that can be posted now (see [`worth_claiming`]).
    fn worth_claiming(&self, lanes: &HashMap<String, Lane>) -> bool {
        let live = self.live.load();
        worth_claiming(lanes, live.webhook_secrets.keys(), self.config.concurrency)
    }

    async fn claim(&self, limit: usize, lease_ms: i64) -> Vec<WebhookJob> {
        self.store
            .claim_webhooks(limit, now_ms() + lease_ms)
            .await
            .unwrap_or_else(|e| {
                warn!(error = %e, "claiming webhooks failed");
                Vec::new()
            })
    }

    async fn until_next_due(&self) -> Duration {
        match self.store.next_webhook_due().await {
            Ok(Some(due)) => Duration::from_millis(
                (due - now_ms()).clamp(10, IDLE_POLL.as_millis() as i64) as u64,
            ),
            _ => IDLE_POLL,
        }
    }

    /// Posts one request and says what to record of each of its webhooks: delivered, retry
    /// at, or give up.
    async fn deliver(&self, request: Request) -> Vec<(WebhookJob, WebhookResult)> {
        let posted = self.post(&request).await.map_err(|e| e.to_string());
        let results: Vec<(WebhookJob, WebhookResult)> = request
            .jobs
            .into_iter()
            .map(|job| {
                let outcome = self.outcome(&job, &posted);
                (job, outcome)
            })
            .collect();
        count_attempts(&results);
        results
    }

    fn outcome(&self, job: &WebhookJob, posted: &Result<(), String>) -> WebhookResult {
        match posted {
            Ok(()) => WebhookResult::Delivered,
            Err(error) => {
                let error = error.clone();
                let now = now_ms();
                let delay = self.config.retry_schedule.delay_after(job.attempts);
                let at = now + delay.as_millis() as i64;
                debug!(webhook = job.id, attempts = job.attempts, %error, "webhook failed");
                if at - job.created_at > self.config.give_up_after.as_millis() as i64 {
                    WebhookResult::GiveUp { error }
                } else {
                    WebhookResult::RetryAt { at, error }
                }
            }
        }
    }

    async fn post(&self, request: &Request) -> Result<(), PostError> {
        let Some(first) = request.jobs.first() else {
            return Ok(());
        };
        let url = reqwest::Url::parse(&first.url).map_err(|_| PostError::Url)?;
        let (secret, operators) = {
            let live = self.live.load();
            let secret = live.webhook_secrets.get(&first.account).cloned();
            let operators = live.webhook_urls.get(&first.account) == Some(&first.url);
            (secret.unwrap_or_default(), operators)
        };
        let (client, reach) = if operators {
            (&self.egress.operator, &self.egress.operator_reach)
        } else {
            (&self.egress.public, &self.egress.public_reach)
        };
        // The client resolves names through the guard; a literal address it never resolves.
        reach.check_url(&url)?;
        let body = request.body();
        let timestamp = now_ms() / 1000;
        let response = client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(
                SIGNATURE_HEADER,
                signature_header(&secret, timestamp, &body),
            )
            .body(body)
            .send()
            .await
            .map_err(PostError::from)?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(PostError::Status(response.status()))
        }
    }
}

/// Why a post failed, as stored with the webhook and logged: never with the URL, whose query
/// often carries a receiver's token.
#[derive(Debug, thiserror::Error)]
enum PostError {
    #[error("not sent: {0}")]
    Refused(#[from] Refused),
    #[error("the URL is not valid")]
    Url,
    #[error("request failed: {0}")]
    Request(String),
    #[error("answered {0}")]
    Status(reqwest::StatusCode),
}

impl From<reqwest::Error> for PostError {
    fn from(error: reqwest::Error) -> PostError {
        let error = error.without_url();
        let mut text = error.to_string();
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            if let Some(refused) = cause.downcast_ref::<Refused>() {
                return PostError::Refused(refused.clone());
            }
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        PostError::Request(text)
    }
}

/// One account's webhooks in this sender: the requests waiting, and its posts in flight.
struct Lane {
    waiting: VecDeque<Request>,
    /// Webhooks in `waiting`.
    held: usize,
    in_flight: usize,
    /// How long the account's posts took lately (a moving average), from which the wait of
    /// a new request is told: a dead receiver's posts take the whole timeout. A receiver that
    /// dies while its lane holds many claimed webhooks may make some outwait their lease; they
    /// are then claimed and posted again (webhooks are at least once).
    pace: Duration,
}

impl Lane {
    /// The lane of `request`'s account. A new one expects the worst of a receiver it has not
    /// seen answer yet: posts that take the whole `timeout`.
    fn of<'a>(
        lanes: &'a mut HashMap<String, Lane>,
        request: &Request,
        timeout: Duration,
    ) -> &'a mut Lane {
        lanes
            .entry(request.account().to_owned())
            .or_insert_with(|| Lane {
                waiting: VecDeque::new(),
                held: 0,
                in_flight: 0,
                pace: timeout,
            })
    }

    fn push(&mut self, request: Request) {
        self.held += request.jobs.len();
        self.waiting.push_back(request);
    }

    /// The next request to post, if the lane has room for one more post.
    fn next(&mut self, concurrency: usize) -> Option<Request> {
        if self.in_flight >= concurrency {
            return None;
        }
        let request = self.waiting.pop_front()?;
        self.held -= request.jobs.len();
        self.in_flight += 1;
        Some(request)
    }

    fn finished(&mut self, took: Duration) {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.pace = (self.pace * 7 + took) / 8;
    }

    /// About how long until a request put behind the waiting ones and `ahead` more is posted.
    fn wait(&self, concurrency: usize, ahead: usize) -> Duration {
        let rounds = (self.waiting.len() + ahead) / concurrency + 1;
        self.pace * rounds.min(u32::MAX as usize) as u32
    }
}

/// Whether a claim may bring webhooks that can be posted now. A claim costs the store's writer
/// about as much as a few dozen rows, so the sender claims when some account that signs
/// webhooks (`accounts`) has nothing waiting and a quarter of its posts free (an account with
/// no lane yet has all of them), rather than whenever one post is free. An account whose
/// receiver is slow or dead has none free, and does not stop the claims the others need.
fn worth_claiming<'a>(
    lanes: &HashMap<String, Lane>,
    mut accounts: impl Iterator<Item = &'a String>,
    concurrency: usize,
) -> bool {
    let quarter = concurrency.div_ceil(4);
    let idle = |lane: &Lane| {
        lane.waiting.is_empty() && concurrency.saturating_sub(lane.in_flight) >= quarter
    };
    lanes.values().all(idle) || accounts.any(|account| lanes.get(account).is_none_or(idle))
}

/// What decides how long an account's lane may hold claimed webhooks.
struct Behind {
    concurrency: usize,
    /// A claimed webhook must be posted within this, well inside its lease.
    hold_for: Duration,
    /// The post timeout: what a new lane expects a post to take.
    timeout: Duration,
    now: i64,
}

impl Behind {
    /// Puts requests in their accounts' lanes: every handed one (they have no lease, and the
    /// store hands no more than the sender has room for), and each claimed one whose lane
    /// should post it within `hold_for`. The other claimed ones are returned deferred: back to
    /// the outbox until about when their lane would reach them (at most [`MOST_DEFERRED`]),
    /// so that other accounts' webhooks come first in the next claims.
    fn queue(
        &self,
        lanes: &mut HashMap<String, Lane>,
        handed: Vec<Request>,
        claimed: Vec<Request>,
    ) -> Vec<(WebhookJob, WebhookResult)> {
        for request in handed {
            Lane::of(lanes, &request, self.timeout).push(request);
        }
        let mut deferred = Vec::new();
        let mut put_back: HashMap<String, usize> = HashMap::new();
        for request in claimed {
            let lane = Lane::of(lanes, &request, self.timeout);
            if lane.wait(self.concurrency, 0) <= self.hold_for {
                lane.push(request);
                continue;
            }
            let ahead = put_back.entry(request.account().to_owned()).or_default();
            let wait = lane.wait(self.concurrency, *ahead).min(MOST_DEFERRED);
            *ahead += 1;
            let at = self.now + wait.as_millis() as i64;
            deferred.extend(
                request
                    .jobs
                    .into_iter()
                    .map(|job| (job, WebhookResult::Deferred { at })),
            );
        }
        deferred
    }
}

/// One webhook request: a single event, or (for an account with `webhook_batch` above 1) a
/// JSON array of events to the same URL.
struct Request {
    jobs: Vec<WebhookJob>,
    array: bool,
}

impl Request {
    fn account(&self) -> &str {
        self.jobs.first().map_or("", |job| job.account.as_str())
    }

    fn body(&self) -> String {
        match self.jobs.as_slice() {
            [job] if !self.array => job.payload.clone(),
            jobs => {
                let events: Vec<&str> = jobs.iter().map(|job| job.payload.as_str()).collect();
                format!("[{}]", events.join(","))
            }
        }
    }
}

/// Groups jobs into requests: per account and URL, up to the account's batch size each, in
/// the order the jobs came (so a message's events keep their order within a request).
fn requests(jobs: Vec<WebhookJob>, batch_size: impl Fn(&str) -> usize) -> Vec<Request> {
    let mut requests: Vec<Request> = Vec::new();
    let mut open: HashMap<(String, String), usize> = HashMap::new();
    for job in jobs {
        let size = batch_size(&job.account);
        if size <= 1 {
            requests.push(Request {
                jobs: vec![job],
                array: false,
            });
            continue;
        }
        let key = (job.account.clone(), job.url.clone());
        match open.get(&key) {
            Some(&i) if requests[i].jobs.len() < size => requests[i].jobs.push(job),
            _ => {
                open.insert(key, requests.len());
                requests.push(Request {
                    jobs: vec![job],
                    array: true,
                });
            }
        }
    }
    requests
}

/// Stores post results as they come, in batches. A result that cannot be stored leaves its
/// webhook to be posted again (at-least-once): a claimed one when its lease ends, a handed one
/// at the next start. A webhook that is waiting again wakes the sender's next look at the
/// outbox.
async fn record_results(
    store: Arc<dyn Store>,
    mut outcomes: mpsc::Receiver<(WebhookJob, WebhookResult)>,
) {
    let mut batch = Vec::with_capacity(RESULTS_PER_COMMIT);
    while let Some(first) = outcomes.recv().await {
        batch.push(first);
        while batch.len() < RESULTS_PER_COMMIT {
            match outcomes.try_recv() {
                Ok(outcome) => batch.push(outcome),
                Err(_) => break,
            }
        }
        let count = batch.len();
        let waiting_again = batch.iter().any(|(_, result)| {
            !matches!(
                result,
                WebhookResult::Delivered | WebhookResult::GiveUp { .. }
            )
        });
        match store.webhook_results(std::mem::take(&mut batch)).await {
            Ok(()) if waiting_again => store.signals().webhooks.notify_one(),
            Ok(()) => {}
            Err(e) => {
                warn!(webhooks = count, error = %e, "recording webhook results failed; they will be sent again");
            }
        }
    }
}

/// The signature header value for `body` sent at `timestamp` (Unix seconds).
pub fn signature_header(secret: &str, timestamp: i64, body: &str) -> String {
    format!("t={timestamp},v1={}", sign(secret, timestamp, body))
}

fn sign(secret: &str, timestamp: i64, body: &str) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("the signature header is malformed")]
    Malformed,
    #[error("the signature does not match")]
    Mismatch,
    #[error("the timestamp is outside the tolerance (a replay?)")]
    Stale,
}

/// Checks a webhook as a receiver should: the HMAC matches (in constant time) and the
/// timestamp is within `tolerance_secs` of `now_secs`.
pub fn verify(
    secret: &str,
    header: &str,
    body: &str,
    now_secs: i64,
    tolerance_secs: i64,
) -> Result<(), VerifyError> {
    let mut timestamp = None;
    let mut given = None;
    for field in header.split(',') {
        match field.trim().split_once('=') {
            Some(("t", t)) => timestamp = t.parse::<i64>().ok(),
            Some(("v1", v)) => given = hex::decode(v).ok(),
            _ => {}
        }
    }
    let (Some(timestamp), Some(given)) = (timestamp, given) else {
        return Err(VerifyError::Malformed);
    };
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    mac.verify_slice(&given)
        .map_err(|_| VerifyError::Mismatch)?;
    if (now_secs - timestamp).abs() > tolerance_secs {
        return Err(VerifyError::Stale);
    }
    Ok(())
}

/// Counts a post's webhooks by result: one metric update per result, not per webhook.
fn count_attempts(results: &[(WebhookJob, WebhookResult)]) {
    for label in ["delivered", "failed", "given_up"] {
        let count = results
            .iter()
            .filter(|(_, result)| attempt_label(result) == Some(label))
            .count();
        if count > 0 {
            metrics::webhooks(label, count);
        }
    }
}

/// The `result` label of `smsgw_webhook_attempts_total`; none for a webhook never posted.
fn attempt_label(result: &WebhookResult) -> Option<&'static str> {
    match result {
        WebhookResult::Delivered => Some("delivered"),
        WebhookResult::RetryAt { .. } => Some("failed"),
        WebhookResult::GiveUp { .. } => Some("given_up"),
        WebhookResult::Unposted | WebhookResult::Deferred { .. } => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_body_verifies_and_a_changed_one_does_not() {
        let header = signature_header("s3cret", 1_700_000_000, "{\"a\":1}");
        assert_eq!(
            verify("s3cret", &header, "{\"a\":1}", 1_700_000_010, 300),
            Ok(())
        );
        assert_eq!(
            verify("s3cret", &header, "{\"a\":2}", 1_700_000_010, 300),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(
            verify("other", &header, "{\"a\":1}", 1_700_000_010, 300),
            Err(VerifyError::Mismatch)
        );
    }

    #[test]
    fn an_old_signature_is_a_replay() {
        let header = signature_header("s3cret", 1_700_000_000, "{}");
        assert_eq!(
            verify("s3cret", &header, "{}", 1_700_001_000, 300),
            Err(VerifyError::Stale)
        );
        // Within the tolerance either way it passes; a timestamp far ahead is refused too.
        assert_eq!(verify("s3cret", &header, "{}", 1_700_000_300, 300), Ok(()));
        assert_eq!(
            verify("s3cret", &header, "{}", 1_699_999_000, 300),
            Err(VerifyError::Stale)
        );
        // A replayer who puts a fresh timestamp on the old signature breaks the signature.
        let refreshed = header.replace("t=1700000000", "t=1700001000");
        assert_eq!(
            verify("s3cret", &refreshed, "{}", 1_700_001_000, 300),
            Err(VerifyError::Mismatch)
        );
    }

    fn job(id: i64, account: &str, url: &str) -> WebhookJob {
        WebhookJob {
            id,
            copy: WebhookCopy::Outbox,
            account: account.into(),
            url: url.into(),
            payload: format!("{{\"id\":{id}}}"),
            attempts: 1,
            created_at: 0,
        }
    }

    fn ids(requests: &[Request]) -> Vec<Vec<i64>> {
        requests
            .iter()
            .map(|r| r.jobs.iter().map(|j| j.id).collect())
            .collect()
    }

    #[test]
    fn requests_group_an_accounts_events_per_url_up_to_its_batch_size() {
        let jobs = vec![
            job(1, "a", "http://x/"),
            job(2, "b", "http://y/"),
            job(3, "a", "http://x/"),
            job(4, "a", "http://other/"),
            job(5, "a", "http://x/"),
            job(6, "b", "http://y/"),
            job(7, "a", "http://x/"),
        ];
        let grouped = requests(jobs, |account| if account == "a" { 3 } else { 1 });
        assert_eq!(
            ids(&grouped),
            [vec![1, 3, 5], vec![2], vec![4], vec![6], vec![7]]
        );
        // A batching account always gets an array, even of one event; others get the object.
        assert_eq!(grouped[0].body(), r#"[{"id":1},{"id":3},{"id":5}]"#);
        assert_eq!(grouped[2].body(), r#"[{"id":4}]"#);
        assert_eq!(grouped[1].body(), r#"{"id":2}"#);
        let array: serde_json::Value = serde_json::from_str(&grouped[0].body()).unwrap();
        assert_eq!(array.as_array().map(Vec::len), Some(3));
    }

    fn single(jobs: Vec<WebhookJob>) -> Vec<Request> {
        requests(jobs, |_| 1)
    }

    #[test]
    fn a_lane_posts_at_most_its_concurrency_at_once() {
        let mut lanes = HashMap::new();
        let behind = Behind {
            concurrency: 2,
            hold_for: Duration::from_secs(20),
            timeout: Duration::from_secs(5),
            now: 0,
        };
        let handed = (1..=5).map(|id| job(id, "a", "http://a/")).collect();
        assert!(
            behind
                .queue(&mut lanes, single(handed), Vec::new())
                .is_empty()
        );
        let lane = lanes.get_mut("a").unwrap();
        assert_eq!(lane.next(2).map(|r| r.jobs[0].id), Some(1));
        assert_eq!(lane.next(2).map(|r| r.jobs[0].id), Some(2));
        assert!(lane.next(2).is_none(), "two in flight: the third waits");
        lane.finished(Duration::from_millis(10));
        assert_eq!(lane.next(2).map(|r| r.jobs[0].id), Some(3));
        assert_eq!((lane.in_flight, lane.held), (2, 2));
    }

    #[test]
    fn claimed_webhooks_a_dead_lane_would_hold_past_their_lease_go_back_spread_out() {
        let mut lanes = HashMap::new();
        let behind = Behind {
            concurrency: 2,
            // Four rounds of posts that take the whole timeout.
            hold_for: Duration::from_secs(20),
            timeout: Duration::from_secs(5),
            now: 1_000_000,
        };
        let a: Vec<WebhookJob> = (1..=12).map(|id| job(id, "a", "http://a/")).collect();
        let b = vec![job(100, "b", "http://b/")];
        let claimed = single(a.into_iter().chain(b).collect());
        let deferred = behind.queue(&mut lanes, Vec::new(), claimed);
        // A new lane expects posts of the whole timeout: 8 waiting are 4 rounds, the rest
        // would wait longer and go back, due about when the lane would reach them.
        assert_eq!(lanes["a"].waiting.len(), 8);
        let due: Vec<(i64, i64)> = deferred
            .iter()
            .map(|(job, result)| match result {
                WebhookResult::Deferred { at } => (job.id, at - 1_000_000),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(due, [(9, 25_000), (10, 25_000), (11, 30_000), (12, 30_000)]);
        // Another account's webhook is not behind anyone.
        assert_eq!(lanes["b"].waiting.len(), 1);
        // Handed webhooks have no lease and are never put back.
        let handed = single((20..=23).map(|id| job(id, "a", "http://a/")).collect());
        assert!(behind.queue(&mut lanes, handed, Vec::new()).is_empty());
        assert_eq!(lanes["a"].waiting.len(), 12);
    }

    #[test]
    fn a_lane_that_answers_quickly_holds_what_it_is_given() {
        let mut lanes = HashMap::new();
        let behind = Behind {
            concurrency: 2,
            hold_for: Duration::from_secs(20),
            timeout: Duration::from_secs(5),
            now: 0,
        };
        behind.queue(
            &mut lanes,
            single(vec![job(1, "a", "http://a/")]),
            Vec::new(),
        );
        let lane = lanes.get_mut("a").unwrap();
        for _ in 0..40 {
            lane.in_flight += 1;
            lane.finished(Duration::from_millis(5));
        }
        assert!(lane.pace < Duration::from_millis(100), "{:?}", lane.pace);
        let claimed = single((2..=500).map(|id| job(id, "a", "http://a/")).collect());
        assert!(behind.queue(&mut lanes, Vec::new(), claimed).is_empty());
        assert_eq!(lanes["a"].held, 500);
    }

    #[test]
    fn a_busy_or_dead_account_does_not_stop_the_claims_others_wait_for() {
        let accounts = ["a".to_owned(), "b".to_owned()];
        let mut lanes = HashMap::new();
        assert!(worth_claiming(&lanes, accounts.iter(), 4), "nothing held");
        let behind = Behind {
            concurrency: 4,
            hold_for: Duration::from_secs(20),
            timeout: Duration::from_secs(5),
            now: 0,
        };
        let handed = single((1..=6).map(|id| job(id, "a", "http://a/")).collect());
        behind.queue(&mut lanes, handed, Vec::new());
        let lane = lanes.get_mut("a").unwrap();
        while lane.next(4).is_some() {}
        // a posts all it may and has more waiting; b has nothing here: a claim may bring b's.
        assert!(worth_claiming(&lanes, accounts.iter(), 4));
        // With a alone, a claim would only bring more of a's: wait until its posts free up.
        assert!(!worth_claiming(&lanes, accounts[..1].iter(), 4));
        let lane = lanes.get_mut("a").unwrap();
        while lane.next(4).is_some() {}
        for _ in 0..4 {
            lane.finished(Duration::from_millis(1));
            while lane.next(4).is_some() {}
        }
        assert!(worth_claiming(&lanes, accounts[..1].iter(), 4));
    }

    #[test]
    fn a_malformed_header_is_refused() {
        assert_eq!(
            verify("s", "v1=zz", "{}", 0, 300),
            Err(VerifyError::Malformed)
        );
    }
}
