//! Submissions from a RabbitMQ queue (cargo feature `amqp`).
//!
//! A message on `amqp.queue` carries what `POST /v1/messages` takes as its body: one message or
//! `{"messages": [...]}`. Its account is the one whose key is in the `api_key` header, or the
//! one the queue is bound to (`amqp.account`); its `message_id` property is its idempotency key.
//! For each delivery: authenticate, submit (validation, policy, the durable commit), publish
//! the API's answer to `reply_to` (else `amqp.reply_queue`) and wait for the broker's confirm,
//! and only then settle the delivery:
//! - stored, or refused by validation or policy (HTTP 2xx, 422): acknowledged;
//! - not a submission at all (not JSON, wrong shape, too large, no or an unknown key: HTTP 400,
//!   401, 413): rejected without requeue, so that a queue with a dead-letter exchange keeps it
//!   there and nothing delivers it again;
//! - the store cannot take it now (HTTP 503): back to the queue after a pause, unanswered.
//!
//! A delivery whose answer could not be published is returned to the queue: with a
//! `message_id` its next delivery answers the same again without storing twice.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use super::AmqpConfig;
use crate::api::auth::{Account, Scope};
use crate::api::error::{ApiError, ErrorEnvelope};
use crate::api::{AppState, SubmitOutcome, admit, checked_idempotency_key, submit_body};
use crate::metrics;
use crate::smpp::session::with_jitter;

/// The message header with the account's API key (unless the queue is bound to an account).
pub const API_KEY_HEADER: &str = "api_key";
/// The answer's header with the HTTP status `POST /v1/messages` would have answered.
pub const STATUS_HEADER: &str = "status_code";
/// The answer's header that is true when this is the first answer to a `message_id` again.
pub const REPLAYED_HEADER: &str = "idempotent_replayed";

const RECONNECT_MIN: Duration = Duration::from_millis(500);
const RECONNECT_MAX: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a submission the store could not take waits before it returns to the queue.
const RETRY_DELAY: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error("{0}")]
    Broker(#[from] lapin::Error),
    #[error("amqp.url: {0}")]
    Url(String),
    #[error("no answer from the broker within {CONNECT_TIMEOUT:?}")]
    Timeout,
    #[error("the broker canceled the consumer of queue `{0}` (was it deleted?)")]
    Canceled(String),
    #[error("the broker refused (nack) the answer to a submission")]
    AnswerRefused,
}

/// Parses `amqp.url` as the client connects with it. The URI parser takes the host from the
/// URL's domain, which an IP address is not: `amqp://10.0.0.5` would connect to `localhost`.
pub fn parse_url(text: &str) -> Result<AMQPUri, String> {
    let mut uri: AMQPUri = text.parse()?;
    let url = reqwest::Url::parse(text).map_err(|e| e.to_string())?;
    if url.domain().is_none()
        && let Some(host) = url.host_str()
    {
        uri.authority.host = host.trim_matches(['[', ']']).to_owned();
    }
    Ok(uri)
}

/// The consumer of `amqp.queue`: connects, consumes until shutdown, reconnects with backoff.
pub struct Intake {
    config: AmqpConfig,
    state: AppState,
}

/// One connection to the broker: submissions arrive on `consume`, answers leave on `replies`
/// (in confirm mode).
struct Link {
    connection: Connection,
    consume: Channel,
    consumer: Consumer,
    replies: Channel,
}

impl Intake {
    pub fn new(config: AmqpConfig, state: AppState) -> Intake {
        Intake { config, state }
    }

    /// Runs until `shutdown`: then it stops consuming, finishes the submissions it took (each
    /// committed, answered and settled), and closes the connection. What the broker had sent
    /// but the intake had not started returns to the queue when the channel closes.
    pub async fn run(self, shutdown: CancellationToken) {
        let intake = Arc::new(self);
        let mut backoff = RECONNECT_MIN;
        loop {
            let attempt = tokio::select! {
                link = intake.connect() => link,
                () = shutdown.cancelled() => return,
            };
            match attempt {
                Ok(link) => {
                    info!(queue = %intake.config.queue, "consuming submissions from the broker");
                    metrics::amqp_connected(true);
                    backoff = RECONNECT_MIN;
                    let lost = intake.clone().consume(link, &shutdown).await;
                    metrics::amqp_connected(false);
                    match lost {
                        None => {
                            info!("queue intake stopped");
                            return;
                        }
                        Some(error) => warn!(%error, "lost the broker; reconnecting"),
                    }
                }
                Err(error) => warn!(%error, retry_in = ?backoff, "cannot consume from the broker"),
            }
            tokio::select! {
                () = tokio::time::sleep(with_jitter(backoff)) => {}
                () = shutdown.cancelled() => return,
            }
            backoff = (backoff * 2).min(RECONNECT_MAX);
        }
    }

    async fn connect(&self) -> Result<Link, IntakeError> {
        let uri = parse_url(self.config.url.expose()).map_err(IntakeError::Url)?;
        let setup = async {
            let properties = ConnectionProperties::default().with_connection_name("smsgw".into());
            let connection = Connection::connect_uri(uri, properties).await?;
            ensure_queue(&connection, &self.config.queue).await?;
            ensure_queue(&connection, &self.config.reply_queue).await?;
            let replies = connection.create_channel().await?;
            replies
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            let consume = connection.create_channel().await?;
            // Validated to fit (1..=65535).
            let prefetch = u16::try_from(self.config.prefetch).unwrap_or(u16::MAX);
            consume
                .basic_qos(prefetch, BasicQosOptions::default())
                .await?;
            let consumer = consume
                .basic_consume(
                    self.config.queue.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            Ok::<_, lapin::Error>(Link {
                connection,
                consume,
                consumer,
                replies,
            })
        };
        tokio::time::timeout(CONNECT_TIMEOUT, setup)
            .await
            .map_err(|_| IntakeError::Timeout)?
            .map_err(IntakeError::from)
    }

    /// Hands each delivery to its own task (at most `prefetch` are unsettled, so at most that
    /// many run) until shutdown or until the link fails; then waits for those tasks. Returns
    /// why the link was lost, or None after a shutdown.
    async fn consume(
        self: Arc<Self>,
        link: Link,
        shutdown: &CancellationToken,
    ) -> Option<IntakeError> {
        let Link {
            connection,
            consume,
            mut consumer,
            replies,
        } = link;
        let in_flight = TaskTracker::new();
        let lost = loop {
            let next = tokio::select! {
                biased;
                () = shutdown.cancelled() => break None,
                next = consumer.next() => next,
            };
            match next {
                Some(Ok(delivery)) => {
                    let intake = self.clone();
                    let replies = replies.clone();
                    let stop = shutdown.clone();
                    in_flight.spawn(async move { intake.handle(delivery, &replies, &stop).await });
                }
                Some(Err(error)) => break Some(IntakeError::Broker(error)),
                None => break Some(IntakeError::Canceled(self.config.queue.clone())),
            }
        };
        if lost.is_none() {
            let _ = consume
                .basic_cancel(consumer.tag(), BasicCancelOptions::default())
                .await;
        }
        in_flight.close();
        in_flight.wait().await;
        let _ = consume.close(200, "smsgw stopping".into()).await;
        let _ = connection.close(200, "smsgw stopping".into()).await;
        lost
    }

    async fn handle(&self, delivery: Delivery, replies: &Channel, shutdown: &CancellationToken) {
        let answer = Answer::from(self.submit(&delivery).await);
        let settle = match answer.status {
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS => {
                tokio::select! {
                    () = tokio::time::sleep(RETRY_DELAY) => {}
                    () = shutdown.cancelled() => {}
                }
                Settle::Requeue
            }
            status => match self.reply(replies, &delivery.properties, &answer).await {
                Ok(()) if status.is_success() || status == StatusCode::UNPROCESSABLE_ENTITY => {
                    Settle::Ack
                }
                Ok(()) => Settle::Reject,
                Err(error) => {
                    warn!(%error, "could not publish the answer to a submission; it returns to the queue");
                    Settle::Requeue
                }
            },
        };
        debug!(
            status = answer.status.as_u16(),
            outcome = settle.as_str(),
            "queued submission settled"
        );
        settle.apply(&delivery).await;
    }

    /// What `POST /v1/messages` does with a request, the delivery being the request.
    async fn submit(&self, delivery: &Delivery) -> Result<SubmitOutcome, ApiError> {
        let account = self.account(&delivery.properties)?;
        let limit = self.state.http.max_body_bytes;
        if delivery.data.len() > limit {
            return Err(ApiError::body_too_large(limit));
        }
        let idempotency_key = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| checked_idempotency_key(id.as_str(), "message_id"))
            .transpose()?;
        if delivery.redelivered && idempotency_key.is_none() {
            warn!(
                queue = %self.config.queue,
                "a redelivered submission has no message_id: if its first delivery was committed, it is stored twice"
            );
        }
        submit_body(&self.state, &account, &delivery.data, idempotency_key).await
    }

    /// The account of the `api_key` header; on a queue bound to an account, that account
    /// (a key, if given anyway, must be one of its keys).
    fn account(&self, properties: &BasicProperties) -> Result<Arc<Account>, ApiError> {
        let live = self.state.live.load();
        let bound = self.config.account.as_deref();
        let found = match (api_key(properties), bound) {
            (Some(key), _) => live
                .accounts
                .authenticate_key(&key)
                .filter(|(account, _)| bound.is_none_or(|name| name == account.name))
                .map(|(account, key)| (account, Some(key))),
            (None, Some(name)) => live.accounts.find(name).cloned().map(|a| (a, None)),
            (None, None) => None,
        };
        if let Some((account, key)) = &found {
            // The same scope and rate limits as `POST /v1/messages`.
            admit(account, key.as_deref(), Scope::Submit).map_err(|refusal| refusal.error())?;
        }
        found.map(|(account, _)| account).ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                format!(
                    "missing or unknown API key; set the message header `{API_KEY_HEADER}` to \
                     the account's key (on a queue bound to an account, to one of its keys)"
                ),
            )
        })
    }

    /// Publishes the answer to the request's `reply_to`, or to `amqp.reply_queue` when it has
    /// none or it names no queue, and waits for the broker to confirm it.
    async fn reply(
        &self,
        channel: &Channel,
        request: &BasicProperties,
        answer: &Answer,
    ) -> Result<(), IntakeError> {
        let properties = answer.properties(request);
        let reply_to = request.reply_to().as_ref().map(ShortString::as_str);
        if let Some(queue) = reply_to.filter(|q| !q.is_empty()) {
            if publish(channel, queue, &answer.body, properties.clone()).await? {
                return Ok(());
            }
            warn!(reply_to = queue, reply_queue = %self.config.reply_queue,
                "reply_to names no queue; the answer goes to the reply queue");
        }
        let queue = &self.config.reply_queue;
        if !publish(channel, queue, &answer.body, properties).await? {
            error!(reply_queue = %queue, "the reply queue does not exist; an answer was dropped");
        }
        Ok(())
    }
}

/// Uses a queue as it is when it exists (an operator may have declared it with a dead-letter
/// exchange, or as a quorum queue); declares it durable when it does not.
async fn ensure_queue(connection: &Connection, name: &str) -> Result<(), lapin::Error> {
    let probe = connection.create_channel().await?;
    let passive = QueueDeclareOptions::default().passive();
    match probe
        .queue_declare(name.into(), passive, FieldTable::default())
        .await
    {
        Ok(_) => {
            let _ = probe.close(200, "ok".into()).await;
            return Ok(());
        }
        // The broker closes a channel on which a passive declare finds nothing.
        Err(error) if is_not_found(&error) => {}
        Err(error) => return Err(error),
    }
    let channel = connection.create_channel().await?;
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await?;
    info!(queue = name, "declared the queue (durable)");
    let _ = channel.close(200, "ok".into()).await;
    Ok(())
}

fn is_not_found(error: &lapin::Error) -> bool {
    matches!(error.kind(), lapin::ErrorKind::ProtocolError(e) if e.get_id() == 404)
}

/// Publishes persistently on the default exchange; false when no queue has that name (the
/// broker returns it).
async fn publish(
    channel: &Channel,
    queue: &str,
    body: &str,
    properties: BasicProperties,
) -> Result<bool, IntakeError> {
    let options = BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    };
    let confirmation = channel
        .basic_publish(
            "".into(),
            queue.into(),
            options,
            body.as_bytes(),
            properties,
        )
        .await?
        .await?;
    if confirmation.is_nack() {
        return Err(IntakeError::AnswerRefused);
    }
    Ok(confirmation.take_message().is_none())
}

/// The `api_key` header as text (a long or a short string).
fn api_key(properties: &BasicProperties) -> Option<String> {
    match properties.headers().as_ref()?.inner().get(API_KEY_HEADER)? {
        AMQPValue::LongString(key) => String::from_utf8(key.as_bytes().to_vec()).ok(),
        AMQPValue::ShortString(key) => Some(key.as_str().to_owned()),
        _ => None,
    }
}

/// The API's answer to a submission: the HTTP status and the JSON body.
struct Answer {
    status: StatusCode,
    body: String,
    replayed: bool,
}

impl From<Result<SubmitOutcome, ApiError>> for Answer {
    fn from(result: Result<SubmitOutcome, ApiError>) -> Answer {
        match result {
            Ok(outcome) => Answer {
                status: outcome.status,
                body: outcome.body,
                replayed: outcome.replayed,
            },
            Err(error) => Answer {
                status: error.status,
                body: serde_json::to_string(&ErrorEnvelope { error })
                    .unwrap_or_else(|_| "{}".into()),
                replayed: false,
            },
        }
    }
}

impl Answer {
    /// Persistent JSON with the request's correlation id (its message id when it has none),
    /// and the status in a header.
    fn properties(&self, request: &BasicProperties) -> BasicProperties {
        let mut headers = FieldTable::default();
        headers.insert(
            STATUS_HEADER.into(),
            AMQPValue::LongInt(i32::from(self.status.as_u16())),
        );
        headers.insert(REPLAYED_HEADER.into(), AMQPValue::Boolean(self.replayed));
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_app_id("smsgw".into())
            .with_headers(headers);
        match request
            .correlation_id()
            .clone()
            .or_else(|| request.message_id().clone())
        {
            Some(id) => properties.with_correlation_id(id),
            None => properties,
        }
    }
}

/// What becomes of a delivery once it is handled.
#[derive(Debug, Clone, Copy)]
enum Settle {
    /// Done with: stored or refused, and answered.
    Ack,
    /// Not a submission: answered, and dead-lettered (or dropped) by the broker.
    Reject,
    /// To be delivered again.
    Requeue,
}

impl Settle {
    fn as_str(self) -> &'static str {
        match self {
            Settle::Ack => "acked",
            Settle::Reject => "rejected",
            Settle::Requeue => "requeued",
        }
    }

    async fn apply(self, delivery: &Delivery) {
        let settled = match self {
            Settle::Ack => delivery.ack(BasicAckOptions::default()).await,
            Settle::Reject => delivery.reject(BasicRejectOptions { requeue: false }).await,
            Settle::Requeue => {
                let requeue = BasicNackOptions {
                    requeue: true,
                    multiple: false,
                };
                delivery.nack(requeue).await
            }
        };
        metrics::amqp_submission(self.as_str());
        if let Err(error) = settled {
            // The broker delivers it again; a message_id makes that a replay, not a copy.
            warn!(%error, outcome = self.as_str(), "could not settle a submission with the broker");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ip_address_in_the_url_is_the_host_connected_to() {
        let uri = parse_url("amqp://user:pass@10.1.2.3:5673/smsgw").unwrap();
        assert_eq!(uri.authority.host, "10.1.2.3");
        assert_eq!(uri.authority.port, 5673);
        assert_eq!(uri.authority.userinfo.username, "user");
        assert_eq!(uri.vhost, "smsgw");
        let uri = parse_url("amqps://[::1]/%2f").unwrap();
        assert_eq!(uri.authority.host, "::1");
        assert_eq!(uri.vhost, "/");
        let uri = parse_url("amqp://broker.example.net").unwrap();
        assert_eq!(uri.authority.host, "broker.example.net");
    }

    #[test]
    fn a_url_the_client_cannot_use_is_refused() {
        assert!(parse_url("amqp://host:notaport/").is_err());
        assert!(parse_url("amqp://host/?heartbeat=often").is_err());
    }
}
