//! Queue depth: does the store's cost grow with the backlog?
//!
//! For each `--sizes` N, makes a SQLite store holding N queued messages (bulk-inserted straight
//! into the file, each with its `queued` event, as the gateway would have stored them), opens
//! it as the daemon does (`SqliteStore::open`), and measures on it:
//! - accept: `submit` of `--batch` new messages (policy, inserts, events, commit), repeated;
//! - claim: `claim_due` of `--claim` messages then `record_attempts` (sent) for them, as the
//!   dispatcher does, repeated; the claim rate is messages claimed and recorded per second;
//! - the reads the daemon repeats while messages wait: `next_due` and `backlog`;
//! - memory: the process's resident set (`VmRSS`) with the store open, and its peak (`VmHWM`);
//! - the daemon: the real `smsgw run` started on that store, sending its backlog to a simulator
//!   in this process at `--daemon-rate` per second for `--daemon-seconds` while the bench posts
//!   a batch over HTTP every 100 ms; its resident set and peak at the end, what it sent and
//!   accepted. Its memory must not grow with the backlog either.
//!
//! `cargo bench --bench queue_depth` (sizes 10000,100000,1000000; about two minutes on two
//! cores) or `cargo bench --bench queue_depth -- --sizes 10000,1000000 --rounds 50`.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use smsgw::encoding::Encoding;
use smsgw::message::{Category, MessageId, Pseudonymizer, Status, now_ms};
use smsgw::store::sqlite::SqliteStore;
use smsgw::store::{
    AccountPolicy, AttemptResult, NewMessage, Next, RenderAnswer, Store, StoreRules,
};

struct Args {
    sizes: Vec<usize>,
    /// Repetitions of each measured operation.
    rounds: usize,
    /// Messages per submit.
    batch: usize,
    /// Messages per claim.
    claim: usize,
    /// How long the daemon runs on each store (0: not started).
    daemon_seconds: u64,
    /// The daemon's carrier rate, submit_sm per second.
    daemon_rate: usize,
}

const USAGE: &str = "usage: cargo bench --bench queue_depth -- [--sizes N,N,...] [--rounds R] \
[--batch B] [--claim C] [--daemon-seconds S] [--daemon-rate R]";

impl Args {
    fn parse() -> Result<Args, String> {
        let mut args = Args {
            sizes: vec![10_000, 100_000, 1_000_000],
            rounds: 30,
            batch: 100,
            claim: 200,
            daemon_seconds: 10,
            daemon_rate: 5_000,
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let mut value = |name: &str| -> Result<String, String> {
                it.next().ok_or(format!("{name} needs a value"))
            };
            let number = |name: &str, v: String| -> Result<usize, String> {
                v.parse::<usize>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or(format!("{name}: `{v}` is not a positive number"))
            };
            match flag.as_str() {
                "--sizes" => {
                    args.sizes = value("--sizes")?
                        .split(',')
                        .map(|s| number("--sizes", s.trim().to_owned()))
                        .collect::<Result<_, _>>()?
                }
                "--rounds" => args.rounds = number("--rounds", value("--rounds")?)?,
                "--batch" => args.batch = number("--batch", value("--batch")?)?,
                "--claim" => args.claim = number("--claim", value("--claim")?)?,
                "--daemon-seconds" => {
                    let v = value("--daemon-seconds")?;
                    args.daemon_seconds = v
                        .parse()
                        .map_err(|_| format!("--daemon-seconds: `{v}` is not a number"))?
                }
                "--daemon-rate" => {
                    args.daemon_rate = number("--daemon-rate", value("--daemon-rate")?)?
                }
                "--help" | "-h" => return Err(USAGE.to_owned()),
                _ => {} // cargo bench adds `--bench`
            }
        }
        Ok(args)
    }
}

fn main() {
    let args = match Args::parse() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "queue depth: {} rounds, submit of {} messages, claim of {} (cores: {})",
        args.rounds,
        args.batch,
        args.claim,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:>9} | {:>9} | {:>22} | {:>22} | {:>11} | {:>9} | {:>9} | {:>13}",
        "queued",
        "preload s",
        "submit ms p50/p99",
        "claim+record ms p50/p99",
        "claim msg/s",
        "next_due",
        "backlog",
        "RSS / peak MiB"
    );
    let mut daemon_rows = Vec::new();
    for &size in &args.sizes {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temporary directory");
        let db = dir.path().join("queue.db");
        let row = rt.block_on(measure(&args, &db, size));
        println!("{row}");
        if args.daemon_seconds > 0 {
            daemon_rows.push(match daemon::run(&rt, &args, &db) {
                Ok(row) => row,
                Err(error) => format!("{size:>9} | failed: {error}"),
            });
        }
    }
    if !daemon_rows.is_empty() {
        println!(
            "\nthe daemon (`smsgw run`) on each store, {} s sending at {}/s, a batch of {} posted every 100 ms:",
            args.daemon_seconds, args.daemon_rate, args.batch
        );
        println!(
            "{:>9} | {:>9} | {:>9} | {:>13}",
            "queued", "sent", "accepted", "RSS / peak MiB"
        );
        for row in daemon_rows {
            println!("{row}");
        }
    }
}

fn rules() -> StoreRules {
    StoreRules {
        pseudonyms: Pseudonymizer::new(b"queue-depth-bench-key"),
        suspect_after: 3,
        suspect_codes: vec!["001".into()],
    }
}

async fn measure(args: &Args, db: &Path, size: usize) -> String {
    // The schema, as the daemon makes it.
    let store = SqliteStore::open(db, 1024, rules()).await.expect("open");
    store.close().await;
    let started = Instant::now();
    preload(db, size).expect("preload");
    let preload_s = started.elapsed().as_secs_f64();

    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(db, 1024, rules()).await.expect("open"));
    let render: RenderAnswer = Arc::new(|_: &[NewMessage]| (202, String::new()));
    let mut submits = Vec::with_capacity(args.rounds);
    for round in 0..args.rounds {
        let messages = new_messages(args.batch, size + round * args.batch);
        let t = Instant::now();
        store
            .submit(
                "bench",
                AccountPolicy::default(),
                messages,
                None,
                render.clone(),
            )
            .await
            .expect("submit");
        submits.push(t.elapsed());
    }
    let mut claims = Vec::with_capacity(args.rounds);
    let mut claimed = 0;
    for _ in 0..args.rounds {
        let t = Instant::now();
        let taken = store
            .claim_due(args.claim, now_ms() + 60_000)
            .await
            .expect("claim");
        claimed += taken.len();
        let results = taken
            .iter()
            .map(|m| AttemptResult {
                id: m.id,
                carrier: Some("sim".into()),
                accepted: vec![smsgw::store::AcceptedPart {
                    part: 1,
                    carrier_message_id: m.id.to_string(),
                }],
                next: Next::Sent,
                note: None,
            })
            .collect();
        store.record_attempts(results).await.expect("record");
        claims.push(t.elapsed());
    }
    let claim_total: Duration = claims.iter().sum();
    let t = Instant::now();
    store.next_due().await.expect("next_due");
    let next_due = t.elapsed();
    let t = Instant::now();
    store.backlog().await.expect("backlog");
    let backlog = t.elapsed();
    let (rss, peak) = memory_mib();
    store.close().await;
    format!(
        "{:>9} | {:>9.1} | {:>22} | {:>22} | {:>11.0} | {:>9} | {:>9} | {:>13}",
        size,
        preload_s,
        percentiles(&mut submits),
        percentiles(&mut claims),
        claimed as f64 / claim_total.as_secs_f64(),
        format!("{:.1} ms", ms(next_due)),
        format!("{:.1} ms", ms(backlog)),
        format!("{rss:.0} / {peak:.0}"),
    )
}

/// Writes `size` queued messages and their `queued` events in one transaction, bypassing the
/// gateway (it would take minutes through the API).
fn preload(db: &Path, size: usize) -> rusqlite::Result<()> {
    let mut conn = rusqlite::Connection::open(db)?;
    conn.execute_batch("PRAGMA synchronous = OFF")?;
    let tx = conn.transaction()?;
    {
        let mut message = tx.prepare(
            "INSERT INTO messages (id, account, recipient, sender, body, category, encoding,
                 segments, status, created_at, updated_at, due_at, expires_at, policy_gen)
             VALUES (?1, 'bench', ?2, 'iP1', 'Your code is 1234', 'transactional', 'gsm7', 1,
                 'queued', ?3, ?3, ?3, ?4, 1)",
        )?;
        let mut event =
            tx.prepare("INSERT INTO events (message_id, at, status) VALUES (?1, ?2, 'queued')")?;
        let now = now_ms();
        for i in 0..size {
            let id = MessageId::new().to_string();
            let at = now - 60_000;
            message.execute(rusqlite::params![
                id,
                common::recipient(i),
                at,
                now + 86_400_000
            ])?;
            event.execute(rusqlite::params![id, at])?;
        }
    }
    tx.commit()
}

fn new_messages(count: usize, first: usize) -> Vec<NewMessage> {
    let now = now_ms();
    (0..count)
        .map(|i| NewMessage {
            id: MessageId::new(),
            account: "bench".into(),
            reference: None,
            recipient: common::recipient(first + i),
            sender: "iP1".into(),
            body: "Your code is 1234".into(),
            category: Category::Transactional,
            encoding: Encoding::Gsm7,
            segments: 1,
            priority: 0,
            webhook_url: None,
            consent_at: None,
            status: Status::Queued,
            detail: None,
            created_at: now,
            due_at: now,
            expires_at: now + 86_400_000,
        })
        .collect()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn percentiles(samples: &mut [Duration]) -> String {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    format!("{:.2} / {:.2}", ms(at(0.5)), ms(at(0.99)))
}

/// `VmRSS` and `VmHWM` of this process, MiB (Linux; zeros elsewhere).
fn memory_mib() -> (f64, f64) {
    memory_of("/proc/self/status")
}

/// `VmRSS` and `VmHWM` from a `/proc/<pid>/status` file, MiB.
fn memory_of(status_file: &str) -> (f64, f64) {
    let status = std::fs::read_to_string(status_file).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The real daemon on a store the bench made.
mod daemon {
    use std::io::{BufRead, BufReader};
    use std::path::Path;
    use std::process::{Child, Command, Stdio};
    use std::sync::mpsc::Receiver;
    use std::time::{Duration, Instant};

    use tokio::net::TcpListener;
    use tokio_util::sync::CancellationToken;

    use super::Args;
    use crate::common::recipient;

    const API_KEY: &str = "queue-depth-bench-api-key";

    /// Runs `smsgw run` on `db`; its row of the table.
    pub fn run(rt: &tokio::runtime::Runtime, args: &Args, db: &Path) -> Result<String, String> {
        let queued: i64 = rusqlite::Connection::open(db)
            .and_then(|conn| {
                conn.query_row(
                    "SELECT COUNT(*) FROM messages WHERE status = 'queued'",
                    [],
                    |r| r.get(0),
                )
            })
            .map_err(|e| format!("counting the queue: {e}"))?;
        let stop = CancellationToken::new();
        let sim = rt.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            Ok::<_, std::io::Error>(smsgw::sim::start(
                listener,
                smsgw::sim::SimConfig::default(),
                stop.clone(),
            ))
        });
        let sim = sim.map_err(|e| format!("simulator: {e}"))?;
        let config = db.with_file_name("smsgw.toml");
        std::fs::write(&config, config_text(db, sim.local_addr(), args.daemon_rate))
            .map_err(|e| format!("{}: {e}", config.display()))?;
        let mut child = Command::new(env!("CARGO_BIN_EXE_smsgw"))
            .args(["run", "--config"])
            .arg(&config)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("starting smsgw: {e}"))?;
        let result = listening_url(&mut child).and_then(|url| {
            let accepted = rt.block_on(post_batches(&url, args));
            let memory = super::memory_of(&format!("/proc/{}/status", child.id()));
            Ok((accepted?, memory))
        });
        terminate(&mut child);
        let sent = sim.submitted_count();
        stop.cancel();
        let (accepted, (rss, peak)) = result?;
        Ok(format!(
            "{queued:>9} | {sent:>9} | {accepted:>9} | {:>13}",
            format!("{rss:.0} / {peak:.0}")
        ))
    }

    fn config_text(db: &Path, carrier: std::net::SocketAddr, rate: usize) -> String {
        format!(
            r#"
            [http]
            listen = "127.0.0.1:0"
            [admin]
            enabled = false
            [store]
            path = "{db}"
            [privacy]
            pseudonym_key = "queue-depth-bench-pseudonym-key-0123"
            [logging]
            format = "json"
            [[accounts]]
            name = "bench"
            api_keys = ["{hash}"]
            [[carriers]]
            name = "sim"
            address = "{carrier}"
            rate_per_second = {rate}
            "#,
            db = db.display(),
            hash = smsgw::api::auth::hash_key(API_KEY),
        )
    }

    /// Waits (up to 60 s: the store is opened first) for the daemon's "HTTP API listening".
    fn listening_url(child: &mut Child) -> Result<String, String> {
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let lines = log_lines(stdout);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let Ok(line) = lines.recv_timeout(Duration::from_millis(200)) else {
                continue;
            };
            let event: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if event["fields"]["message"] == "HTTP API listening"
                && let Some(address) = event["fields"]["address"].as_str()
            {
                return Ok(format!("http://{address}"));
            }
        }
        Err("the daemon did not start listening within 60 s".into())
    }

    /// The daemon's log lines, read on a thread of their own so that its pipe never fills.
    fn log_lines(stdout: std::process::ChildStdout) -> Receiver<String> {
        let (send, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = send.send(line);
            }
        });
        lines
    }

    /// Posts a batch every 100 ms for `--daemon-seconds`; the messages accepted.
    async fn post_batches(url: &str, args: &Args) -> Result<usize, String> {
        let client = reqwest::Client::new();
        let end = Instant::now() + Duration::from_secs(args.daemon_seconds);
        let mut accepted = 0;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        for round in 0.. {
            tick.tick().await;
            if Instant::now() >= end {
                break;
            }
            let messages: Vec<_> = (0..args.batch)
                .map(|i| {
                    serde_json::json!({
                        "to": recipient(round * args.batch + i),
                        "from": "iP1",
                        "text": "Your code is 1234",
                    })
                })
                .collect();
            let answer = client
                .post(format!("{url}/v1/messages"))
                .bearer_auth(API_KEY)
                .json(&serde_json::json!({ "messages": messages }))
                .send()
                .await
                .map_err(|e| format!("POST /v1/messages: {e}"))?;
            if !answer.status().is_success() {
                return Err(format!("POST /v1/messages answered {}", answer.status()));
            }
            accepted += args.batch;
        }
        Ok(accepted)
    }

    /// SIGTERM, then up to 30 s for the daemon to stop; SIGKILL after that.
    fn terminate(child: &mut Child) {
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}
