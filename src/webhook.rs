//! Webhook delivery from the durable outbox: signed, retried with backoff, never lost on a
//! restart (a claimed webhook is leased; a crash returns it when the lease ends).
//!
//! Every request carries `X-Smsgw-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256>` over
//! `"<t>.<body>"` with the account's webhook secret. Receivers check the signature and reject
//! old timestamps, which stops replays ([`verify`]).

pub mod egress;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use tokio::sync::{Semaphore, mpsc};
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
    pub fn new(config: &WebhooksConfig) -> Egress {
        let operator_reach = Reach::with_internal(config.internal_networks());
        Egress {
            public: Egress::client(config, Reach::public()),
            operator: Egress::client(config, operator_reach.clone()),
            public_reach: Reach::public(),
            operator_reach,
        }
    }

    fn client(config: &WebhooksConfig, reach: Reach) -> reqwest::Client {
        reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(5)))
            // A redirect or a proxy (HTTP_PROXY from the environment) would take the post to
            // an address the resolver never judged.
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .dns_resolver(Guarded::system(reach))
            .build()
            .unwrap_or_default()
    }
}

impl WebhookSender {
    /// Posts webhooks until `shutdown`; posts in flight then finish (bounded by the timeout).
    ///
    /// Most webhooks are handed over by the store as it commits them (see
    /// [`crate::store::Handoff`]); the outbox is claimed from only when rows may wait there:
    /// at start, when the store wrote one unleased (no room here), or one is due again.
    /// A post holds its permit only for the HTTP exchange; its result goes to a recorder that
    /// stores many results in one operation, so slow commits do not throttle the posting.
    pub async fn run(self, shutdown: CancellationToken) {
        let this = Arc::new(self);
        let concurrency = this.config.concurrency;
        let permits = Arc::new(Semaphore::new(concurrency));
        let mut posts = JoinSet::new();
        let (results, outcomes) = mpsc::channel(concurrency * 4);
        let signals = this.store.signals().clone();
        let recorder = tokio::spawn(record_results(this.store.clone(), outcomes));
        // Claims are made in large batches (each is a trip through the store's writer, which is
        // busy under load) and posted as permits free up; the lease covers the wait.
        // An account that batches takes that many more webhooks per permit.
        let largest_batch = this.live.load().webhook_batches.values().copied().max();
        let claim_size = (concurrency * CLAIM_FACTOR * largest_batch.unwrap_or(1)).min(MOST_HELD);
        let lease_ms = this.config.timeout.as_millis() as i64 * (CLAIM_FACTOR as i64 + 2) + 30_000;
        signals.handoff.open(claim_size);
        let mut outbox_may_hold = true;
        let mut next_look = Instant::now();
        while !shutdown.is_cancelled() {
            let mut jobs = signals.handoff.take();
            if Instant::now() >= next_look {
                outbox_may_hold = true;
            }
            if outbox_may_hold && worth_claiming(permits.available_permits(), concurrency) {
                let claimed = this.claim(claim_size, lease_ms).await;
                outbox_may_hold = claimed.len() == claim_size;
                if !outbox_may_hold {
                    next_look = Instant::now() + this.until_next_due().await;
                }
                jobs.extend(claimed);
            }
            if !jobs.is_empty() {
                let mut requests = {
                    let live = this.live.load();
                    requests(jobs, |account| {
                        live.webhook_batches.get(account).map_or(1, |n| *n)
                    })
                }
                .into_iter();
                let mut unposted = Vec::new();
                for request in requests.by_ref() {
                    let permit = tokio::select! {
                        permit = permits.clone().acquire_owned() => permit.ok(),
                        () = shutdown.cancelled() => None,
                    };
                    let Some(permit) = permit else {
                        unposted.push(request);
                        break;
                    };
                    let this = this.clone();
                    let results = results.clone();
                    posts.spawn(async move {
                        let outcomes = this.deliver(request).await;
                        drop(permit);
                        let handed = outcomes
                            .iter()
                            .filter(|(job, _)| job.copy == WebhookCopy::Event);
                        this.store.signals().handoff.give_back(handed.count());
                        for outcome in outcomes {
                            let _ = results.send(outcome).await;
                        }
                    });
                }
                for request in unposted.into_iter().chain(requests) {
                    for job in request.jobs {
                        let _ = results.send((job, WebhookResult::Unposted)).await;
                    }
                }
                while posts.try_join_next().is_some() {}
                continue;
            }
            // Wait for work: handed jobs, a row written to the outbox, the next due one, or a
            // finished post (room to claim). No polling meanwhile.
            tokio::select! {
                () = signals.webhooks.notified() => outbox_may_hold = true,
                () = signals.handoff.handed.notified() => {}
                () = sleep_until(next_look), if !outbox_may_hold => outbox_may_hold = true,
                Some(_) = posts.join_next(), if !posts.is_empty() => {}
                () = shutdown.cancelled() => {}
            }
            while posts.try_join_next().is_some() {}
        }
        // Handed and not posted: back to the outbox for the next start.
        for job in signals.handoff.close() {
            let _ = results.send((job, WebhookResult::Unposted)).await;
        }
        while posts.join_next().await.is_some() {}
        drop(results);
        let _ = recorder.await;
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

/// Whether to claim now: a claim costs the store's writer about as much as a few dozen rows, so
/// the sender waits for a quarter of its permits to be free rather than claim per free permit.
fn worth_claiming(free_permits: usize, concurrency: usize) -> bool {
    free_permits > 0 && free_permits >= concurrency.div_ceil(4)
}

/// One webhook request: a single event, or (for an account with `webhook_batch` above 1) a
/// JSON array of events to the same URL.
struct Request {
    jobs: Vec<WebhookJob>,
    array: bool,
}

impl Request {
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
        WebhookResult::Unposted => None,
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

    #[test]
    fn a_malformed_header_is_refused() {
        assert_eq!(
            verify("s", "v1=zz", "{}", 0, 300),
            Err(VerifyError::Malformed)
        );
    }
}
