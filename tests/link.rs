//! The carrier link end to end through the real daemon and the simulator over loopback: TLS,
//! SMPP 5.0 and congestion, transmitter/receiver pairs, flow control under throttling, quotas,
//! the link health timers, and the window (never more unanswered submit_sm than it allows).

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use common::*;
use smsgw::sim::{SimConfig, SimHandle};

/// A simulator that stops when dropped, like `common::Sim`, serving TLS or plain TCP.
struct Smsc {
    handle: SimHandle,
    stop: CancellationToken,
}

impl Drop for Smsc {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Smsc {
    async fn plain(config: SimConfig) -> Smsc {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stop = CancellationToken::new();
        let handle = smsgw::sim::start(listener, config, stop.clone());
        Smsc { handle, stop }
    }

    /// Serves TLS with the test certificate of `localhost`/127.0.0.1, signed by `tests/tls/ca.pem`.
    async fn tls(config: SimConfig) -> Smsc {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stop = CancellationToken::new();
        let acceptor =
            smsgw::sim::tls_acceptor(&tls_file("server.pem"), &tls_file("server-key.pem")).unwrap();
        let handle = smsgw::sim::start_tls(listener, config, acceptor, stop.clone());
        Smsc { handle, stop }
    }
}

fn tls_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/tls")
        .join(name)
}

/// The common test configuration with the carrier renamed (its metric series are then this
/// test's alone) and `extra` keys added to its table.
fn carrier_config(db: &Path, sim: &SimHandle, name: &str, extra: &str) -> smsgw::config::Config {
    let text = config_text(db, sim.local_addr(), None)
        .replace("name = \"sim\"", &format!("name = \"{name}\""));
    parse_config(&format!("{text}\n{extra}\n"))
}

async fn metrics_text(gateway: &Gateway) -> String {
    gateway.metrics().await
}

/// The value of one series in the Prometheus text, e.g. `smsgw_link_rate_effective{carrier="x"}`.
async fn metric(gateway: &Gateway, series: &str) -> Option<f64> {
    metrics_text(gateway).await.lines().find_map(|line| {
        line.strip_prefix(series)
            .and_then(|rest| rest.trim().parse().ok())
    })
}

async fn post_batch(gateway: &Gateway, messages: Vec<serde_json::Value>) -> Vec<String> {
    let count = messages.len();
    let (status, answer) = gateway.post(KEY_A, &json!({ "messages": messages })).await;
    assert_eq!(status, 202, "{answer}");
    let ids: Vec<String> = answer["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), count);
    ids
}

#[tokio::test]
async fn a_tls_bind_to_a_simulator_with_its_own_ca_delivers() {
    let (_dir, db) = temp_db();
    let smsc = Smsc::tls(sim_config()).await;
    let ca = tls_file("ca.pem");
    let config = carrier_config(
        &db,
        &smsc.handle,
        "tls",
        &format!("tls = {{ ca_file = \"{}\" }}", ca.display()),
    );
    let gateway = Gateway::start(config).await;
    gateway.wait_ready().await;
    let (status, answer) = gateway
        .post(KEY_A, &message("+46701234567", "over TLS"))
        .await;
    assert_eq!(status, 202, "{answer}");
    gateway
        .wait_status(KEY_A, answer["id"].as_str().unwrap(), "delivered")
        .await;
    assert_eq!(smsc.handle.submitted()[0].short_message, b"over TLS");
    assert_eq!(smsc.handle.tls_failures(), 0);
}

#[tokio::test]
async fn a_tls_bind_to_an_untrusted_certificate_backs_off_instead_of_looping() {
    let (_dir, db) = temp_db();
    let smsc = Smsc::tls(sim_config()).await;
    let config = carrier_config(
        &db,
        &smsc.handle,
        "wrong-ca",
        &format!(
            "tls = {{ ca_file = \"{}\", server_name = \"localhost\" }}",
            tls_file("other-ca.pem").display()
        ),
    );
    let gateway = Gateway::start(config).await;
    eventually(
        Duration::from_secs(10),
        "two refused handshakes",
        || async { (smsc.handle.tls_failures() >= 2).then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Backoff from 50 ms doubling to 500 ms: about ten tries in these seconds, not thousands.
    let tries = smsc.handle.connections();
    assert!(tries <= 20, "{tries} connections: a hot loop");
    assert_eq!(
        smsc.handle.bind_attempts(),
        0,
        "no bind over an untrusted link"
    );
    let text = metrics_text(&gateway).await;
    assert!(
        text.contains("smsgw_reconnects_total{carrier=\"wrong-ca\",reason=\"tls_failed\"}"),
        "{text}"
    );
    let ready = gateway
        .client
        .get(format!("{}/readyz", gateway.url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503, "not ready without a bind");
}

#[tokio::test]
async fn smpp_5_0_binds_and_a_congested_smsc_slows_the_link() {
    let (_dir, db) = temp_db();
    let smsc = Smsc::plain(SimConfig {
        congestion_state: Some(95),
        ..sim_config()
    })
    .await;
    let config = carrier_config(
        &db,
        &smsc.handle,
        "congested",
        "interface_version = \"5.0\"",
    );
    let gateway = Gateway::start(config).await;
    gateway.wait_ready().await;
    assert_eq!(
        smsc.handle.binds_v50(),
        1,
        "bound with interface_version 0x50"
    );
    let rate = "smsgw_link_rate_effective{carrier=\"congested\"}";
    assert_eq!(metric(&gateway, rate).await, Some(2000.0));

    let batch = (0..20)
        .map(|i| message("+46701234567", &format!("m{i}")))
        .collect();
    for id in post_batch(&gateway, batch).await {
        gateway.wait_status(KEY_A, &id, "delivered").await;
    }
    eventually(Duration::from_secs(5), "the rate to drop", || async {
        metric(&gateway, rate).await.filter(|r| *r < 2000.0)
    })
    .await;

    // Lightly loaded again: the rate climbs back as submits succeed.
    smsc.handle.set_config(SimConfig {
        congestion_state: Some(10),
        ..sim_config()
    });
    let batch = (0..150)
        .map(|i| message(&format!("+4670123{i:04}"), "again"))
        .collect();
    for id in post_batch(&gateway, batch).await {
        gateway.wait_status(KEY_A, &id, "delivered").await;
    }
    eventually(Duration::from_secs(5), "the rate to recover", || async {
        metric(&gateway, rate).await.filter(|r| *r == 2000.0)
    })
    .await;
}

#[tokio::test]
async fn a_transmitter_and_receiver_pair_sends_and_gets_receipts_on_the_receiver() {
    let (_dir, db) = temp_db();
    let smsc = Smsc::plain(sim_config()).await;
    let config = carrier_config(&db, &smsc.handle, "pair", "bind_type = \"pair\"");
    let gateway = Gateway::start(config).await;
    gateway.wait_ready().await;
    eventually(
        Duration::from_secs(10),
        "a transmitter and a receiver",
        || async { (smsc.handle.bound_by_kind() == (1, 1, 0)).then_some(()) },
    )
    .await;
    let (_, answer) = gateway.post(KEY_A, &message("+46701234567", "pair")).await;
    // The transmitter cannot receive: the receipt can only have come on the receiver.
    gateway
        .wait_status(KEY_A, answer["id"].as_str().unwrap(), "delivered")
        .await;
    assert_eq!(smsc.handle.deliver_sm_resp_count(), 1);
}

#[tokio::test]
async fn a_throttling_storm_keeps_each_recipients_order_and_loses_nothing() {
    let (_dir, db) = temp_db();
    let smsc = Smsc::plain(SimConfig {
        throttle_above_per_second: Some(15),
        ..sim_config()
    })
    .await;
    // Long enough waits that nothing goes back to the store during the storm.
    let mut config = carrier_config(&db, &smsc.handle, "storm", "");
    config.carriers[0].response_timeout = Duration::from_secs(20);
    let gateway = Gateway::start(config).await;
    gateway.wait_ready().await;

    let recipients = ["+46701000001", "+46701000002", "+46701000003"];
    let batch = (0..60)
        .map(|i| message(recipients[i % 3], &format!("n{:02}", i / 3)))
        .collect();
    let ids = post_batch(&gateway, batch).await;
    let rate = "smsgw_link_rate_effective{carrier=\"storm\"}";
    let lowest = eventually(Duration::from_secs(10), "the rate to drop", || async {
        metric(&gateway, rate).await.filter(|r| *r < 500.0)
    })
    .await;
    for id in &ids {
        gateway.wait_status(KEY_A, id, "delivered").await;
    }
    assert!(smsc.handle.throttled_count() > 0, "the simulator throttled");
    let submitted = smsc.handle.submitted();
    assert_eq!(submitted.len(), 60, "each message accepted exactly once");
    let mut per_recipient: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for pdu in submitted {
        per_recipient
            .entry(pdu.destination_addr)
            .or_default()
            .push(String::from_utf8(pdu.short_message).unwrap());
    }
    for (recipient, texts) in per_recipient {
        let mut sorted = texts.clone();
        sorted.sort();
        assert_eq!(texts, sorted, "order to {recipient}");
        assert_eq!(texts.len(), 20);
    }

    // The storm is over: the rate climbs back to the configured one as submits succeed.
    smsc.handle.set_config(sim_config());
    let batch = (0..150)
        .map(|i| message(&format!("+4670200{i:04}"), "after"))
        .collect();
    for id in post_batch(&gateway, batch).await {
        gateway.wait_status(KEY_A, &id, "delivered").await;
    }
    let recovered = eventually(Duration::from_secs(5), "the rate to recover", || async {
        metric(&gateway, rate).await.filter(|r| *r == 2000.0)
    })
    .await;
    assert!(lowest < recovered);
    eprintln!(
        "storm: {} throttled answers, effective rate seen at {lowest}/s, back to {recovered}/s",
        smsc.handle.throttled_count()
    );
}

#[tokio::test]
async fn a_used_up_quota_holds_messages_in_the_queue() {
    let (_dir, db) = temp_db();
    let smsc = Smsc::plain(sim_config()).await;
    // A daily quota: its window cannot end during the test (unless it runs across midnight UTC).
    let config = carrier_config(&db, &smsc.handle, "quota", "quota_per_day = 3");
    let gateway = Gateway::start(config).await;
    gateway.wait_ready().await;
    let batch = (0..5)
        .map(|i| message("+46701234567", &format!("q{i}")))
        .collect();
    let ids = post_batch(&gateway, batch).await;
    for id in &ids[..3] {
        gateway.wait_status(KEY_A, id, "delivered").await;
    }
    // Past the 3 s a claimed message may wait for a bind to take it.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(smsc.handle.submitted_count(), 3, "no more than the quota");
    for id in &ids[3..] {
        let m = gateway.message(KEY_A, id).await;
        assert_eq!(m["status"], "queued", "held, not failed: {m}");
    }
}

#[tokio::test]
async fn refused_credentials_stop_the_bind_once_and_raise_the_alert() {
    let (_dir, db) = temp_db();
    let smsc = Smsc::plain(SimConfig {
        password: "other".into(),
        ..sim_config()
    })
    .await;
    let config = carrier_config(&db, &smsc.handle, "refused", "");
    let gateway = Gateway::start(config).await;
    let alert = "smsgw_bind_credentials_refused{carrier=\"refused\"}";
    eventually(Duration::from_secs(10), "the alert", || async {
        metric(&gateway, alert).await.filter(|v| *v == 1.0)
    })
    .await;
    // Reconnects would come every 50–500 ms; two seconds of quiet is no hot loop.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(smsc.handle.bind_attempts(), 1);
    assert_eq!(smsc.handle.connections(), 1);
}

#[tokio::test]
async fn a_silent_smsc_is_dropped_after_the_inactivity_timeout_and_bound_again() {
    let (_dir, db) = temp_db();
    let smsc = Smsc::plain(SimConfig {
        silent: true,
        ..sim_config()
    })
    .await;
    let config = carrier_config(
        &db,
        &smsc.handle,
        "silent",
        "enquire_link_interval = \"300ms\"\ninactivity_timeout = \"1s\"",
    );
    let _gateway = Gateway::start(config).await;
    eventually(Duration::from_secs(15), "three binds", || async {
        (smsc.handle.bind_attempts() >= 3).then_some(())
    })
    .await;
}

/// Between the gateway and the simulator: counts the submit_sm the gateway has written and not
/// yet been answered, and holds the simulator's submit_sm_resp for a while and lets them go
/// together, so that the gateway's window fills.
struct WindowWatch {
    address: SocketAddr,
    most_unanswered: Arc<AtomicUsize>,
}

impl WindowWatch {
    const SUBMIT_SM: u32 = 0x0000_0004;
    const SUBMIT_SM_RESP: u32 = 0x8000_0004;

    async fn start(upstream: SocketAddr) -> WindowWatch {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let most_unanswered = Arc::new(AtomicUsize::new(0));
        let most = Arc::clone(&most_unanswered);
        tokio::spawn(async move {
            while let Ok((gateway, _)) = listener.accept().await {
                let Ok(sim) = TcpStream::connect(upstream).await else {
                    return;
                };
                let unanswered = Arc::new(AtomicUsize::new(0));
                let (from_gateway, to_gateway) = gateway.into_split();
                let (from_sim, to_sim) = sim.into_split();
                tokio::spawn(Self::up(
                    from_gateway,
                    to_sim,
                    Arc::clone(&unanswered),
                    Arc::clone(&most),
                ));
                tokio::spawn(Self::down(from_sim, to_gateway, unanswered));
            }
        });
        WindowWatch {
            address,
            most_unanswered,
        }
    }

    async fn read_pdu(from: &mut OwnedReadHalf) -> Option<(u32, Vec<u8>)> {
        let mut pdu = vec![0u8; 8];
        from.read_exact(&mut pdu).await.ok()?;
        let length = u32::from_be_bytes(pdu[0..4].try_into().unwrap()) as usize;
        let command_id = u32::from_be_bytes(pdu[4..8].try_into().unwrap());
        pdu.resize(length.max(8), 0);
        from.read_exact(&mut pdu[8..]).await.ok()?;
        Some((command_id, pdu))
    }

    async fn up(
        mut from: OwnedReadHalf,
        mut to: OwnedWriteHalf,
        unanswered: Arc<AtomicUsize>,
        most: Arc<AtomicUsize>,
    ) {
        while let Some((command_id, pdu)) = Self::read_pdu(&mut from).await {
            if command_id == Self::SUBMIT_SM {
                let now = unanswered.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
            }
            if to.write_all(&pdu).await.is_err() {
                return;
            }
        }
    }

    async fn down(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, unanswered: Arc<AtomicUsize>) {
        // Whole PDUs come through a channel: a `read_exact` raced against the release timer
        // would lose the bytes it had read when the timer won.
        let (pdus, mut arriving) = tokio::sync::mpsc::channel(1024);
        let reader = tokio::spawn(async move {
            while let Some(pdu) = Self::read_pdu(&mut from).await {
                if pdus.send(pdu).await.is_err() {
                    return;
                }
            }
        });
        let mut held = Vec::new();
        let mut release = tokio::time::interval(Duration::from_millis(20));
        loop {
            tokio::select! {
                pdu = arriving.recv() => match pdu {
                    Some((Self::SUBMIT_SM_RESP, pdu)) => held.push(pdu),
                    Some((_, pdu)) => {
                        if to.write_all(&pdu).await.is_err() {
                            break;
                        }
                    }
                    None => break,
                },
                _ = release.tick() => {
                    // Counted as answered before the gateway can read them.
                    unanswered.fetch_sub(held.len(), Ordering::SeqCst);
                    if to.write_all(&held.concat()).await.is_err() {
                        break;
                    }
                    held.clear();
                }
            }
        }
        reader.abort();
    }
}

#[tokio::test]
async fn a_bind_keeps_its_window_full_and_never_beyond() {
    let (_dir, db) = temp_db();
    let smsc = Smsc::plain(sim_config()).await;
    let watch = WindowWatch::start(smsc.handle.local_addr()).await;
    // One bind, a window of 10 (config_text), a rate far above what 10 in flight allow.
    let config = parse_config(&config_text(&db, watch.address, None));
    let gateway = Gateway::start(config).await;
    gateway.wait_ready().await;
    let batch = (0..300)
        .map(|i| message(&format!("+4670300{i:04}"), "window"))
        .collect();
    for id in post_batch(&gateway, batch).await {
        gateway.wait_status(KEY_A, &id, "delivered").await;
    }
    assert_eq!(smsc.handle.submitted_count(), 300);
    let most = watch.most_unanswered.load(Ordering::SeqCst);
    assert_eq!(
        most, 10,
        "most submit_sm unanswered at once (the window is 10)"
    );
}
