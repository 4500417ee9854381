//! A hostile carrier: a hand-written SMSC front (a proxy over loopback in front of the real
//! simulator, which keeps the record of what was submitted and sends the receipts) that, per
//! connection, drops the link, goes half-open (stops answering, no FIN), answers slower than the
//! response timeout, sends garbage bytes or a PDU header with an absurd command_length, or
//! refuses the bind. The real daemon binary must stay up with bounded memory, detect each fault,
//! bind again, and bring every message to a final status once the carrier behaves.
//!
//! The seed of the fault schedule is printed; `SMSGW_FAULT_SEED=<seed>` replays it.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

use common::*;

/// The gateway's response timeout and enquire_link interval in this test.
const TIMEOUT: Duration = Duration::from_secs(1);
/// A slow carrier answers this late: well past the timeout.
const SLOW_BY: Duration = Duration::from_millis(2500);
/// How long a half-open link is held before the test gives up on the gateway noticing.
const HALF_OPEN_HOLD: Duration = Duration::from_secs(20);
/// Peak resident memory the daemon may reach (it idles at about 30 MiB).
const MAX_RSS_KIB: u64 = 256 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Closes both sides (FIN) mid-traffic.
    Drop,
    /// Stops forwarding in both directions and keeps the sockets open: no FIN, no answers.
    HalfOpen,
    /// Delays everything the carrier sends by `SLOW_BY`.
    Slow,
    /// Random bytes at a PDU boundary.
    Garbage,
    /// A PDU header claiming 0xFFFFFFFF bytes.
    AbsurdLength,
    /// Answers bind_transceiver with ESME_RBINDFAIL and closes.
    BindRefused,
}

const FAULTS: [Fault; 6] = [
    Fault::Drop,
    Fault::HalfOpen,
    Fault::Slow,
    Fault::Garbage,
    Fault::AbsurdLength,
    Fault::BindRefused,
];

/// What the proxy saw, for the assertions.
#[derive(Default)]
struct Seen {
    faults: Vec<Fault>,
    /// How long the gateway took to close each half-open link (None: it never did).
    half_open_closed_after: Vec<Option<Duration>>,
}

struct HostileCarrier {
    address: SocketAddr,
    seen: Arc<Mutex<Seen>>,
    /// Set when the schedule is used up: every later connection is clean.
    calm: Arc<AtomicBool>,
}

impl HostileCarrier {
    /// Listens on loopback; the first `schedule.len()` connections get those faults, after a
    /// random time each; the rest are forwarded to `upstream` untouched.
    async fn start(upstream: SocketAddr, schedule: Vec<Fault>, seed: u64) -> HostileCarrier {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Seen>> = Arc::default();
        let calm = Arc::new(AtomicBool::new(false));
        let (seen_, calm_) = (seen.clone(), calm.clone());
        tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut schedule = schedule.into_iter();
            while let Ok((gateway, _)) = listener.accept().await {
                let fault = schedule.next();
                if fault.is_none() {
                    calm_.store(true, Ordering::SeqCst);
                }
                let after = Duration::from_millis(rng.random_range(100..1500));
                let garbage: Vec<u8> = (0..rng.random_range(1..64)).map(|_| rng.random()).collect();
                tokio::spawn(serve(
                    gateway,
                    upstream,
                    fault,
                    after,
                    garbage,
                    seen_.clone(),
                ));
            }
        });
        HostileCarrier {
            address,
            seen,
            calm,
        }
    }
}

/// One connection from the gateway: forwarded to the simulator until `after`, then `fault`.
async fn serve(
    gateway: TcpStream,
    upstream: SocketAddr,
    fault: Option<Fault>,
    after: Duration,
    garbage: Vec<u8>,
    seen: Arc<Mutex<Seen>>,
) {
    if let Some(fault) = fault {
        seen.lock().unwrap().faults.push(fault);
    }
    if fault == Some(Fault::BindRefused) {
        refuse_bind(gateway).await;
        return;
    }
    let Ok(sim) = TcpStream::connect(upstream).await else {
        return;
    };
    let (gateway_in, mut gateway_out) = gateway.into_split();
    let (sim_in, sim_out) = sim.into_split();
    let blackhole = Arc::new(AtomicBool::new(false));
    let mut upward = tokio::spawn(forward_up(gateway_in, sim_out, blackhole.clone()));
    // What the simulator sends, PDU by PDU, so that faults land on PDU boundaries.
    let (pdus, mut downward) = tokio::sync::mpsc::channel(64);
    let reader = tokio::spawn(read_pdus(sim_in, pdus));
    let trigger = tokio::time::sleep(after);
    tokio::pin!(trigger);
    let mut slow = false;
    let mut triggered = false;
    loop {
        tokio::select! {
            () = &mut trigger, if !triggered && fault.is_some() => {
                triggered = true;
                match fault {
                    Some(Fault::Drop) => break,
                    Some(Fault::HalfOpen) => {
                        blackhole.store(true, Ordering::SeqCst);
                        let started = Instant::now();
                        // The gateway must give up on the link by itself and close it.
                        let closed = tokio::time::timeout(HALF_OPEN_HOLD, &mut upward).await.is_ok();
                        seen.lock().unwrap().half_open_closed_after.push(closed.then(|| started.elapsed()));
                        break;
                    }
                    Some(Fault::Slow) => slow = true,
                    Some(Fault::Garbage) => {
                        if gateway_out.write_all(&garbage).await.is_err() {
                            break;
                        }
                    }
                    Some(Fault::AbsurdLength) => {
                        let header = [0xFF, 0xFF, 0xFF, 0xFF, 0x80, 0, 0, 0x04, 0, 0, 0, 0, 0, 0, 0, 9];
                        if gateway_out.write_all(&header).await.is_err() {
                            break;
                        }
                    }
                    Some(Fault::BindRefused) | None => {}
                }
            }
            frame = downward.recv() => {
                let Some(frame) = frame else { break };
                if slow {
                    tokio::time::sleep(SLOW_BY).await;
                }
                if gateway_out.write_all(&frame).await.is_err() {
                    break;
                }
            }
            _ = &mut upward => break,
        }
    }
    upward.abort();
    reader.abort();
}

/// Reads whole PDUs (by their command_length) from the simulator.
async fn read_pdus(mut from: OwnedReadHalf, pdus: tokio::sync::mpsc::Sender<Vec<u8>>) {
    loop {
        let mut pdu = vec![0u8; 4];
        if from.read_exact(&mut pdu).await.is_err() {
            return;
        }
        let length = u32::from_be_bytes([pdu[0], pdu[1], pdu[2], pdu[3]]) as usize;
        pdu.resize(length.max(4), 0);
        if from.read_exact(&mut pdu[4..]).await.is_err() || pdus.send(pdu).await.is_err() {
            return;
        }
    }
}

/// Copies the gateway's bytes to the simulator; once `blackhole` is set, reads and drops them
/// (the carrier's application stopped answering). Returns when the gateway closes.
async fn forward_up(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, blackhole: Arc<AtomicBool>) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) if !blackhole.load(Ordering::SeqCst) => {
                if to.write_all(&buffer[..n]).await.is_err() {
                    return;
                }
            }
            Ok(_) => {}
        }
    }
}

/// Reads the bind and answers it with ESME_RBINDFAIL (0x0D), a header without a body.
async fn refuse_bind(mut gateway: TcpStream) {
    let mut header = [0u8; 16];
    if gateway.read_exact(&mut header).await.is_err() {
        return;
    }
    let length = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let mut body = vec![0u8; length.saturating_sub(16).min(4096)];
    let _ = gateway.read_exact(&mut body).await;
    let command_id = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    let mut answer = Vec::with_capacity(16);
    answer.extend_from_slice(&16u32.to_be_bytes());
    answer.extend_from_slice(&(command_id | 0x8000_0000).to_be_bytes());
    answer.extend_from_slice(&0x0Du32.to_be_bytes());
    answer.extend_from_slice(&header[12..16]);
    let _ = gateway.write_all(&answer).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
}

fn config(db: &Path, carrier: SocketAddr) -> String {
    format!(
        r#"
        [http]
        listen = "127.0.0.1:0"
        [admin]
        enabled = false
        [store]
        path = "{db}"
        [messages]
        retry_schedule = ["200ms"]
        [privacy]
        pseudonym_key = "test-pseudonym-key-0123456789"
        [logging]
        format = "json"
        [[accounts]]
        name = "a"
        api_keys = ["{hash_a}"]
        [[carriers]]
        name = "hostile"
        address = "{carrier}"
        binds = 2
        window = 10
        rate_per_second = 2000
        reconnect_min = "50ms"
        reconnect_max = "400ms"
        response_timeout = "{timeout}ms"
        enquire_link_interval = "{timeout}ms"
        "#,
        db = db.display(),
        hash_a = smsgw::api::auth::hash_key(KEY_A),
        timeout = TIMEOUT.as_millis(),
    )
}

/// The daemon's peak resident set (VmHWM), in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_carrier_never_takes_the_daemon_down_and_every_message_ends_final() {
    let seed = std::env::var("SMSGW_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    println!("carrier fault seed: {seed} (replay with SMSGW_FAULT_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    // Every fault twice, in a random order.
    let mut schedule: Vec<Fault> = FAULTS.iter().chain(FAULTS.iter()).copied().collect();
    schedule.shuffle(&mut rng);
    println!("fault schedule: {schedule:?}");

    let sim = Sim::start(smsgw::sim::SimConfig {
        receipt_delay: Duration::from_millis(50),
        ..smsgw::sim::SimConfig::default()
    })
    .await;
    let carrier = HostileCarrier::start(sim.address(), schedule.clone(), rng.random()).await;
    let (dir, db) = temp_db();
    let path = dir.path().join("smsgw.toml");
    std::fs::write(&path, config(&db, carrier.address)).unwrap();
    let daemon = Daemon::start(&path);

    // Load until every scheduled fault has had its connection.
    let http = reqwest::Client::new();
    let mut accepted = Vec::new();
    let started = Instant::now();
    let mut batch = 0;
    while !carrier.calm.load(Ordering::SeqCst) {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the fault schedule did not run out in 120 s"
        );
        let messages: Vec<_> = (0..10)
            .map(|n| message("+46701234567", &format!("fault b{batch} n{n}")))
            .collect();
        batch += 1;
        let answer = http
            .post(format!("{}/v1/messages", daemon.url))
            .bearer_auth(KEY_A)
            .json(&json!({ "messages": messages }))
            .send()
            .await
            .expect("the daemon answers through every carrier fault");
        assert_eq!(answer.status().as_u16(), 202);
        let body: serde_json::Value = answer.json().await.unwrap();
        for item in body["messages"].as_array().unwrap() {
            accepted.push(item["id"].as_str().unwrap().to_owned());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "{} messages accepted while the carrier misbehaved ({:?})",
        accepted.len(),
        started.elapsed()
    );

    let store = sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=ro", db.display()))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let open: Vec<(String, String)> = sqlx::query_as(
            "SELECT status, COALESCE(detail, '') FROM messages WHERE status <> 'delivered'",
        )
        .fetch_all(&store)
        .await
        .unwrap();
        if open.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            for line in daemon.new_logs() {
                eprintln!("{line}");
            }
        }
        assert!(
            Instant::now() < deadline,
            "{} messages not delivered within 60 s of the carrier calming down, e.g. {:?}",
            open.len(),
            &open[..open.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stored: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM messages")
        .fetch_one(&store)
        .await
        .unwrap();
    assert_eq!(stored as usize, accepted.len());

    let seen = carrier.seen.lock().unwrap();
    for fault in FAULTS {
        assert!(seen.faults.contains(&fault), "{fault:?} never happened");
    }
    assert!(
        !seen.half_open_closed_after.is_empty(),
        "no half-open link was held long enough to test"
    );
    for closed in &seen.half_open_closed_after {
        let after = closed.expect("the gateway never closed a half-open link");
        println!("a half-open link was closed by the gateway after {after:?}");
    }
    let peak = peak_rss_kib(daemon.child.id());
    println!("daemon peak RSS: {} MiB", peak / 1024);
    assert!(peak > 0 && peak < MAX_RSS_KIB, "peak RSS {peak} KiB");
    assert!(sim.handle.submitted_count() >= accepted.len());
    daemon.terminate();
}
