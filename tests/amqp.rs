//! Submissions through RabbitMQ: the real daemon consuming from the RabbitMQ on 127.0.0.1:5672
//! (or `SMSGW_TEST_AMQP_URL`), sending to the SMSC simulator, answering on reply queues.
//! Every test uses queues of its own. Without a reachable broker these tests fail under
//! `CI=true` and are skipped (with a note on stderr) elsewhere.
#![cfg(feature = "amqp")]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::{Value, json};
use sqlx::Connection as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use common::*;

const WAIT: Duration = Duration::from_secs(30);

fn broker_url() -> String {
    std::env::var("SMSGW_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A queue name no other test (or earlier run) uses.
fn unique(what: &str) -> String {
    format!("smsgw-test.{what}.{}", uuid::Uuid::now_v7())
}

/// The test's own connection to the broker: it plays the application.
struct Broker {
    connection: Connection,
    channel: Channel,
}

impl Broker {
    /// None (after a note) when no broker answers outside CI; under `CI=true` that fails.
    async fn connect() -> Option<Broker> {
        let url = broker_url();
        let connection = match Connection::connect(&url, ConnectionProperties::default()).await {
            Ok(connection) => connection,
            Err(error) if std::env::var("CI").is_ok_and(|ci| ci == "true") => {
                panic!("RabbitMQ is not reachable at {url} ({error}); CI must run it")
            }
            Err(error) => {
                eprintln!("SKIPPED: RabbitMQ is not reachable at {url} ({error})");
                return None;
            }
        };
        let channel = connection.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        Some(Broker {
            connection,
            channel,
        })
    }

    /// Declares a durable queue that the broker removes ten minutes after its last use, so
    /// that a failed test leaves nothing behind for long.
    async fn declare(&self, queue: &str, mut arguments: FieldTable) {
        arguments.insert("x-expires".into(), AMQPValue::LongInt(600_000));
        self.channel
            .queue_declare(queue.into(), QueueDeclareOptions::durable(), arguments)
            .await
            .unwrap();
    }

    /// (ready messages, consumers) of a queue; None while it does not exist.
    async fn counts(&self, queue: &str) -> Option<(u32, u32)> {
        let channel = self.connection.create_channel().await.unwrap();
        let passive = QueueDeclareOptions::default().passive();
        let q = channel
            .queue_declare(queue.into(), passive, FieldTable::default())
            .await
            .ok()?;
        let _ = channel.close(200, "ok".into()).await;
        Some((q.message_count(), q.consumer_count()))
    }

    /// Ready messages of a queue that exists.
    async fn ready(&self, queue: &str) -> u32 {
        self.counts(queue).await.expect("the queue exists").0
    }

    async fn wait_counts(&self, queue: &str, ready: u32, consumers: u32) {
        let what = format!("{queue} to hold {ready} ready messages and {consumers} consumers");
        eventually(WAIT, &what, || async {
            (self.counts(queue).await == Some((ready, consumers))).then_some(())
        })
        .await;
    }

    async fn publish(&self, queue: &str, body: &[u8], properties: BasicProperties) {
        let confirm = self
            .channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body,
                properties.with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack());
    }

    /// The next message on `queue`, taken off it.
    async fn next(&self, queue: &str) -> (BasicProperties, Vec<u8>) {
        eventually(WAIT, &format!("a message on {queue}"), || self.take(queue)).await
    }

    async fn take(&self, queue: &str) -> Option<(BasicProperties, Vec<u8>)> {
        let options = BasicGetOptions { no_ack: true };
        let message = self
            .channel
            .basic_get(queue.into(), options)
            .await
            .unwrap()?;
        let delivery = message.delivery;
        Some((delivery.properties, delivery.data))
    }

    /// The next answer on `queue`: its properties, `status_code` header and JSON body.
    async fn answer(&self, queue: &str) -> Answer {
        let (properties, body) = self.next(queue).await;
        Answer::new(properties, &body)
    }

    async fn delete(&self, queues: &[&str]) {
        for queue in queues {
            let _ = self
                .channel
                .queue_delete((*queue).into(), QueueDeleteOptions::default())
                .await;
        }
    }
}

struct Answer {
    properties: BasicProperties,
    status: i64,
    body: Value,
}

impl Answer {
    fn new(properties: BasicProperties, body: &[u8]) -> Answer {
        let status = match header(&properties, "status_code") {
            Some(AMQPValue::LongInt(status)) => i64::from(status),
            other => panic!("the answer has no status_code header: {other:?}"),
        };
        let body = serde_json::from_slice(body).expect("the answer is JSON");
        Answer {
            properties,
            status,
            body,
        }
    }

    fn correlation_id(&self) -> Option<&str> {
        self.properties
            .correlation_id()
            .as_ref()
            .map(ShortString::as_str)
    }

    fn replayed(&self) -> bool {
        matches!(
            header(&self.properties, "idempotent_replayed"),
            Some(AMQPValue::Boolean(true))
        )
    }
}

fn header(properties: &BasicProperties, name: &str) -> Option<AMQPValue> {
    properties.headers().as_ref()?.inner().get(name).cloned()
}

/// A submission's properties: the account's key, and where to answer with which id.
fn submission(key: Option<&str>) -> BasicProperties {
    let mut headers = FieldTable::default();
    if let Some(key) = key {
        headers.insert("api_key".into(), AMQPValue::LongString(key.into()));
    }
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_headers(headers)
}

fn body(value: &Value) -> Vec<u8> {
    serde_json::to_vec(value).unwrap()
}

/// A gateway consuming `queue` at `url`, answering on `replies` when a submission names no
/// `reply_to`; `extra` adds lines to `[amqp]`.
async fn gateway(
    sim: &Sim,
    db: &std::path::Path,
    url: &str,
    queue: &str,
    replies: &str,
    extra: &str,
) -> Gateway {
    let text = format!(
        "{}\n[amqp]\nenabled = true\nurl = \"{url}\"\nqueue = \"{queue}\"\n\
         reply_queue = \"{replies}\"\nprefetch = 16\n{extra}\n",
        config_text(db, sim.address(), None)
    );
    let gateway = Gateway::start(parse_config(&text)).await;
    gateway.wait_ready().await;
    gateway
}

/// How many messages account `key` has.
async fn stored(gateway: &Gateway, key: &str) -> usize {
    let (status, page) = gateway.get(key, "/v1/messages?limit=500").await;
    assert_eq!(status, 200, "{page}");
    page["messages"].as_array().map_or(0, Vec::len)
}

#[tokio::test]
async fn a_queued_submission_is_stored_sent_delivered_and_answered() {
    let Some(broker) = Broker::connect().await else {
        return;
    };
    let (queue, replies, app) = (unique("submit"), unique("replies"), unique("app"));
    broker.declare(&app, FieldTable::default()).await;
    let sim = Sim::start(sim_config()).await;
    let (_dir, db) = temp_db();
    let gateway = gateway(&sim, &db, &broker_url(), &queue, &replies, "").await;
    // The gateway declares its queues and consumes from the submission queue.
    broker.wait_counts(&queue, 0, 1).await;
    broker.wait_counts(&replies, 0, 0).await;

    let properties = submission(Some(KEY_A))
        .with_correlation_id("order-17".into())
        .with_reply_to(app.as_str().into());
    let request = message("+46701234567", "Hej från kön");
    broker.publish(&queue, &body(&request), properties).await;

    let answer = broker.answer(&app).await;
    assert_eq!(answer.correlation_id(), Some("order-17"));
    assert_eq!(answer.status, 202, "{}", answer.body);
    assert_eq!(answer.body["status"], "queued", "{}", answer.body);
    assert_eq!(answer.body["segments"], 1);
    assert_eq!(
        answer
            .properties
            .content_type()
            .as_ref()
            .map(ShortString::as_str),
        Some("application/json")
    );
    let id = answer.body["id"].as_str().expect("an id").to_owned();
    let delivered = gateway.wait_status(KEY_A, &id, "delivered").await;
    assert_eq!(delivered["to"], "+46701234567");
    assert_eq!(delivered["from"], "iP1");
    assert_eq!(sim.handle.submitted().len(), 1);
    // Acknowledged once answered; the answer went to reply_to only.
    broker.wait_counts(&queue, 0, 1).await;
    assert_eq!(broker.ready(&replies).await, 0);

    gateway.stop().await;
    broker.delete(&[&queue, &replies, &app]).await;
}

#[tokio::test]
async fn refusals_are_answered_with_their_code() {
    let Some(broker) = Broker::connect().await else {
        return;
    };
    let (queue, replies) = (unique("submit"), unique("replies"));
    broker.declare(&queue, FieldTable::default()).await;
    broker.declare(&replies, FieldTable::default()).await;
    let sim = Sim::start(sim_config()).await;
    let (_dir, db) = temp_db();
    let gateway = gateway(&sim, &db, &broker_url(), &queue, &replies, "").await;
    broker.wait_counts(&queue, 0, 1).await;
    let opted_out = "+46709999001";
    let (status, added) = gateway
        .post_json(KEY_A, "/v1/opt-outs", &json!({ "number": opted_out }))
        .await;
    assert!(status == 200 || status == 201, "{status} {added}");

    let mut marketing = message(opted_out, "20% off today");
    marketing["category"] = json!("marketing");
    let properties = submission(Some(KEY_A)).with_message_id("refused-1".into());
    broker.publish(&queue, &body(&marketing), properties).await;
    let refused = broker.answer(&replies).await;
    // Without a correlation id, the answer carries the message id.
    assert_eq!(refused.correlation_id(), Some("refused-1"));
    assert_eq!(refused.status, 422, "{}", refused.body);
    assert_eq!(refused.body["status"], "refused_opted_out");
    assert_eq!(refused.body["error"]["code"], "refused_opted_out");
    // A refusal is stored, as over HTTP.
    let id = refused.body["id"]
        .as_str()
        .expect("a refused message has an id");
    assert_eq!(
        gateway.message(KEY_A, id).await["status"],
        "refused_opted_out"
    );

    let properties = submission(Some(KEY_A)).with_correlation_id("bad-number".into());
    broker
        .publish(&queue, &body(&message("+12", "hi")), properties)
        .await;
    let invalid = broker.answer(&replies).await;
    assert_eq!(invalid.correlation_id(), Some("bad-number"));
    assert_eq!(invalid.status, 422, "{}", invalid.body);
    assert_eq!(invalid.body["error"]["code"], "invalid_number");
    assert_eq!(invalid.body["error"]["field"], "to");

    // A batch answers per item, like the API.
    let batch = json!({ "messages": [message("+46701234568", "ok"), message("+12", "no")] });
    let properties = submission(Some(KEY_A)).with_correlation_id("batch".into());
    broker.publish(&queue, &body(&batch), properties).await;
    let answer = broker.answer(&replies).await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    assert_eq!(answer.body["messages"][0]["status"], "queued");
    assert_eq!(
        answer.body["messages"][1]["error"]["code"],
        "invalid_number"
    );

    // All three were acknowledged: nothing comes back.
    broker.wait_counts(&queue, 0, 1).await;
    assert_eq!(stored(&gateway, KEY_A).await, 2);
    assert!(broker.take(&replies).await.is_none());
    gateway.stop().await;
    broker.delete(&[&queue, &replies]).await;
}

#[tokio::test]
async fn what_is_not_a_submission_is_answered_and_dead_lettered_once() {
    let Some(broker) = Broker::connect().await else {
        return;
    };
    let (queue, replies, dead) = (unique("submit"), unique("replies"), unique("dead"));
    broker.declare(&dead, FieldTable::default()).await;
    // The operator's queue, with a dead-letter queue: the gateway uses it as it is.
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    arguments.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(dead.as_str().into()),
    );
    broker.declare(&queue, arguments).await;
    broker.declare(&replies, FieldTable::default()).await;
    let sim = Sim::start(sim_config()).await;
    let (_dir, db) = temp_db();
    let gateway = gateway(&sim, &db, &broker_url(), &queue, &replies, "").await;
    broker.wait_counts(&queue, 0, 1).await;

    let cases: [(&[u8], Option<&str>, i64, &str); 4] = [
        (
            b"{\"to\": \"+46701234567\", ",
            Some(KEY_A),
            400,
            "invalid_json",
        ),
        (
            br#"{"to": "+46701234567", "from": "iP1", "text": "x", "colour": "red"}"#,
            Some(KEY_A),
            400,
            "unknown_field",
        ),
        (
            br#"{"to": "+46701234567", "from": "iP1", "text": "x"}"#,
            None,
            401,
            "unauthorized",
        ),
        (
            br#"{"to": "+46701234567", "from": "iP1", "text": "x"}"#,
            Some("not-a-key"),
            401,
            "unauthorized",
        ),
    ];
    for (i, (payload, key, status, code)) in cases.iter().enumerate() {
        let properties = submission(*key).with_correlation_id(format!("case-{i}").into());
        broker.publish(&queue, payload, properties).await;
        let answer = broker.answer(&replies).await;
        assert_eq!(answer.correlation_id(), Some(format!("case-{i}").as_str()));
        assert_eq!(answer.status, *status, "case {i}: {}", answer.body);
        assert_eq!(answer.body["error"]["code"], *code, "case {i}");
        // The original goes to the dead-letter queue, unchanged, once.
        let (_, original) = broker.next(&dead).await;
        assert_eq!(original, *payload, "case {i}");
    }
    // A message_id that cannot be an idempotency key is refused like such an Idempotency-Key.
    let properties = submission(Some(KEY_A)).with_message_id("ordre-ø".into());
    let payload = br#"{"to": "+46701234567", "from": "iP1", "text": "x"}"#;
    broker.publish(&queue, payload, properties).await;
    let answer = broker.answer(&replies).await;
    assert_eq!(answer.correlation_id(), Some("ordre-ø"));
    assert_eq!(answer.status, 400, "{}", answer.body);
    assert_eq!(answer.body["error"]["code"], "invalid_idempotency_key");
    assert_eq!(broker.next(&dead).await.1, payload.to_vec());
    broker.wait_counts(&queue, 0, 1).await;
    // None of them comes round again: no second answer, nothing more dead-lettered.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(broker.take(&replies).await.is_none());
    assert!(broker.take(&dead).await.is_none());
    assert_eq!(stored(&gateway, KEY_A).await, 0);
    gateway.stop().await;
    broker.delete(&[&queue, &replies, &dead]).await;
}

#[tokio::test]
async fn a_message_id_makes_a_redelivery_a_replay() {
    let Some(broker) = Broker::connect().await else {
        return;
    };
    let (queue, replies) = (unique("submit"), unique("replies"));
    broker.declare(&queue, FieldTable::default()).await;
    broker.declare(&replies, FieldTable::default()).await;
    let sim = Sim::start(sim_config()).await;
    let (_dir, db) = temp_db();
    let gateway = gateway(&sim, &db, &broker_url(), &queue, &replies, "").await;
    broker.wait_counts(&queue, 0, 1).await;

    let request = body(&message("+46701234567", "once"));
    let properties = || submission(Some(KEY_A)).with_message_id("order-9".into());
    broker.publish(&queue, &request, properties()).await;
    let first = broker.answer(&replies).await;
    broker.publish(&queue, &request, properties()).await;
    let again = broker.answer(&replies).await;
    assert_eq!(first.status, 202, "{}", first.body);
    assert!(!first.replayed());
    assert_eq!(again.status, 202);
    assert!(again.replayed());
    assert_eq!(again.body, first.body);
    assert_eq!(stored(&gateway, KEY_A).await, 1);

    // The same id with another body is refused, as the Idempotency-Key is over HTTP.
    let other = body(&message("+46701234567", "twice?"));
    broker.publish(&queue, &other, properties()).await;
    let reused = broker.answer(&replies).await;
    assert_eq!(reused.status, 422);
    assert_eq!(reused.body["error"]["code"], "idempotency_key_reused");
    assert_eq!(stored(&gateway, KEY_A).await, 1);
    gateway.stop().await;
    broker.delete(&[&queue, &replies]).await;
}

#[tokio::test]
async fn a_queue_bound_to_an_account_needs_no_key() {
    let Some(broker) = Broker::connect().await else {
        return;
    };
    let (queue, replies) = (unique("submit"), unique("replies"));
    broker.declare(&queue, FieldTable::default()).await;
    broker.declare(&replies, FieldTable::default()).await;
    let sim = Sim::start(sim_config()).await;
    let (_dir, db) = temp_db();
    let gateway = gateway(
        &sim,
        &db,
        &broker_url(),
        &queue,
        &replies,
        "account = \"c\"",
    )
    .await;
    broker.wait_counts(&queue, 0, 1).await;

    let request = json!({ "to": "+46701234567", "from": "Shop", "text": "Your order shipped" });
    broker
        .publish(&queue, &body(&request), submission(None))
        .await;
    let answer = broker.answer(&replies).await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    let id = answer.body["id"].as_str().unwrap();
    gateway.wait_status(KEY_C, id, "delivered").await;
    // Another account's key on this queue is refused, not taken for account c.
    broker
        .publish(&queue, &body(&request), submission(Some(KEY_A)))
        .await;
    let refused = broker.answer(&replies).await;
    assert_eq!(refused.status, 401, "{}", refused.body);
    assert_eq!(stored(&gateway, KEY_A).await, 0);
    assert_eq!(stored(&gateway, KEY_C).await, 1);
    gateway.stop().await;
    broker.delete(&[&queue, &replies]).await;
}

/// A TCP relay between the gateway and the broker that the test can cut, as a network failure
/// or a broker restart would.
struct Relay {
    address: SocketAddr,
    links: Arc<Mutex<Vec<JoinHandle<()>>>>,
    up: Arc<std::sync::atomic::AtomicBool>,
}

impl Relay {
    async fn start(upstream: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let relay = Relay {
            address: listener.local_addr().unwrap(),
            links: Arc::default(),
            up: Arc::new(true.into()),
        };
        let (links, up) = (relay.links.clone(), relay.up.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !up.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: the broker is "away"
                }
                let link = tokio::spawn(async move {
                    if let Ok(mut broker) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut broker).await;
                    }
                });
                links.lock().unwrap().push(link);
            }
        });
        relay
    }

    /// Drops every connection and refuses new ones.
    fn cut(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }

    fn restore(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The broker address of `broker_url()`.
fn broker_address() -> SocketAddr {
    let url = reqwest::Url::parse(&broker_url()).unwrap();
    let host = url.host_str().unwrap_or("127.0.0.1");
    let host = if host == "localhost" {
        "127.0.0.1"
    } else {
        host
    };
    format!("{host}:{}", url.port().unwrap_or(5672))
        .parse()
        .expect("SMSGW_TEST_AMQP_URL names an IP address")
}

#[tokio::test]
async fn a_submission_is_acknowledged_only_after_its_commit() {
    let Some(broker) = Broker::connect().await else {
        return;
    };
    let (queue, replies, app) = (unique("submit"), unique("replies"), unique("app"));
    for q in [&queue, &replies, &app] {
        broker.declare(q, FieldTable::default()).await;
    }
    let relay = Relay::start(broker_address()).await;
    let mut url = reqwest::Url::parse(&broker_url()).unwrap();
    url.set_ip_host(relay.address.ip()).unwrap();
    url.set_port(Some(relay.address.port())).unwrap();
    let sim = Sim::start(sim_config()).await;
    let (_dir, db) = temp_db();
    let gateway = gateway(&sim, &db, url.as_str(), &queue, &replies, "").await;
    broker.wait_counts(&queue, 0, 1).await;

    // Another writer holds the database: the gateway cannot commit.
    let mut holder = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    sqlx::query("BEGIN EXCLUSIVE")
        .execute(&mut holder)
        .await
        .unwrap();
    let properties = submission(Some(KEY_A))
        .with_message_id("held-1".into())
        .with_reply_to(app.as_str().into());
    let request = body(&message("+46701234567", "after the commit"));
    broker.publish(&queue, &request, properties).await;
    // The gateway has it (nothing ready), but has not acknowledged it: when its connection
    // breaks, the broker puts it back.
    broker.wait_counts(&queue, 0, 1).await;
    relay.cut();
    broker.wait_counts(&queue, 1, 0).await;
    assert!(
        broker.take(&app).await.is_none(),
        "no answer before the commit"
    );

    // The database is free again and the broker is back: the gateway reconnects, and the
    // message is stored once (the first delivery's commit and the redelivery share the
    // message id) and answered.
    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
    holder.close().await.unwrap();
    relay.restore();
    let answer = broker.answer(&app).await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    assert_eq!(answer.correlation_id(), Some("held-1"));
    let id = answer.body["id"].as_str().unwrap();
    gateway.wait_status(KEY_A, id, "delivered").await;
    broker.wait_counts(&queue, 0, 1).await;
    assert_eq!(stored(&gateway, KEY_A).await, 1);
    gateway.stop().await;
    broker.delete(&[&queue, &replies, &app]).await;
}

#[tokio::test]
async fn stopping_finishes_what_was_taken_and_leaves_the_rest_queued() {
    let Some(broker) = Broker::connect().await else {
        return;
    };
    let (queue, replies) = (unique("submit"), unique("replies"));
    broker.declare(&queue, FieldTable::default()).await;
    broker.declare(&replies, FieldTable::default()).await;
    const COUNT: usize = 48;
    for i in 0..COUNT {
        let properties = submission(Some(KEY_A)).with_message_id(format!("m-{i}").into());
        let request = body(&message("+46701234567", &format!("number {i}")));
        broker.publish(&queue, &request, properties).await;
    }
    let sim = Sim::start(sim_config()).await;
    let (_dir, db) = temp_db();
    let mut answered = std::collections::BTreeMap::new();
    let mut runs = 0;
    // Stop the gateway as soon as it has answered something, until all are answered: each
    // stop must leave every submission either answered (and stored) or back in the queue.
    while answered.len() < COUNT {
        runs += 1;
        // Each run answers at least the first submission it takes.
        assert!(
            runs <= COUNT,
            "{} of {COUNT} answered after {COUNT} runs",
            answered.len()
        );
        let gateway = gateway(&sim, &db, &broker_url(), &queue, &replies, "").await;
        let first = broker.answer(&replies).await;
        gateway.stop().await;
        let mut answers = vec![first];
        while let Some((properties, body)) = broker.take(&replies).await {
            answers.push(Answer::new(properties, &body));
        }
        for answer in answers {
            assert_eq!(answer.status, 202, "{}", answer.body);
            let id = answer.correlation_id().unwrap().to_owned();
            answered.insert(id, answer.body["id"].as_str().unwrap().to_owned());
        }
        let ready = broker.ready(&queue).await;
        assert_eq!(
            ready as usize + answered.len(),
            COUNT,
            "after run {runs}: {ready} queued and {} answered",
            answered.len()
        );
    }
    let gateway = gateway(&sim, &db, &broker_url(), &queue, &replies, "").await;
    assert_eq!(stored(&gateway, KEY_A).await, COUNT);
    let ids: std::collections::BTreeSet<_> = answered.values().collect();
    assert_eq!(ids.len(), COUNT, "one message per submission");
    gateway.stop().await;
    broker.delete(&[&queue, &replies]).await;
}
