//! End-to-end load test: HTTP submit → SQLite → SMPP (simulated carrier) → receipts → webhooks.
//!
//! Starts, in this one process, the real daemon (`smsgw::run`), the SMSC simulator and a webhook
//! receiver, then posts `--messages` messages in requests of `--batch` with `--concurrency`
//! requests in flight, and waits until every accepted message has been reported `delivered` by
//! webhook. Everything runs on 127.0.0.1; every wait is bounded by `--timeout` (default 110 s).
//!
//! The gateway runs on its own tokio runtime (threads `gw-*`), the load generator, simulator and
//! webhook receiver on another (threads `load-*`), so the per-thread CPU breakdown printed at the
//! end tells what the gateway itself costs. Both share the machine's cores.
//!
//! `cargo bench --bench e2e -- --messages 20000 --batch 100 --concurrency 8`
//! (see benches/README.md for every flag and what each number means).

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderValue, header};
use hyper::client::conn::http1::SendRequest;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use smsgw::config::Config;
use smsgw::sim::{SimConfig, SimHandle};

/// The daemon's allocator (src/main.rs), so that the bench measures what runs in production;
/// configured as there (`main`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const API_KEY: &str = "e2e-bench-api-key-0123456789";
const HOOK_SECRET: &str = "e2e-bench-webhook-secret";
/// Every n-th webhook has its signature checked (all of them would load the harness).
const VERIFY_EVERY: usize = 97;

#[derive(Debug, Clone)]
struct Args {
    messages: usize,
    concurrency: usize,
    batch: usize,
    /// Open-loop target in messages/s; 0 = as fast as the gateway answers.
    rate: u64,
    receipt_delay_ms: u64,
    timeout_secs: u64,
    binds: usize,
    window: usize,
    carrier_rate: u32,
    gateway_threads: usize,
    load_threads: usize,
    /// Where the temporary SQLite directory is made (a tmpfs here shows what fsync costs).
    db_dir: Option<String>,
    /// A PostgreSQL database (`postgres://...`) instead of the SQLite file.
    store_url: Option<String>,
    /// Gateways sharing the PostgreSQL database; requests go to them in turn.
    instances: usize,
    /// PostgreSQL: the gateway's writer transactions at once (`store.writers`).
    store_writers: Option<usize>,
    /// `webhooks.concurrency` of the gateway; None keeps the daemon's default.
    webhook_concurrency: Option<usize>,
    /// The account has no webhook_url: done when every receipt is stored (isolates webhook cost).
    no_webhooks: bool,
    /// The account's `webhook_batch`: most events per webhook request (1: one per request).
    webhook_batch: usize,
}

impl Default for Args {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Args {
            messages: 20_000,
            concurrency: 8,
            batch: 100,
            rate: 0,
            receipt_delay_ms: 5,
            timeout_secs: 110,
            binds: 2,
            window: 200,
            carrier_rate: 50_000,
            gateway_threads: cores,
            load_threads: cores,
            db_dir: None,
            store_url: None,
            instances: 1,
            store_writers: None,
            webhook_concurrency: None,
            no_webhooks: false,
            webhook_batch: 1,
        }
    }
}

const USAGE: &str = "usage: cargo bench --bench e2e -- [--messages N] [--batch B] [--concurrency C] \
[--rate MSG_PER_S] [--receipt-delay-ms MS] [--timeout SECS] [--binds N] [--window W] \
[--carrier-rate PER_BIND_PER_S] [--gateway-threads T] [--load-threads T] [--db-dir DIR] \
[--store-url postgres://...] [--store-writers N] [--instances N] \
[--webhook-concurrency N] [--webhook-batch N] [--no-webhooks]";

impl Args {
    /// Simple `--flag value` parsing. Unknown arguments (cargo bench adds `--bench`) are ignored.
    fn parse() -> Result<Args, String> {
        let mut args = Args::default();
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let mut value = |name: &str| -> Result<u64, String> {
                let v = it.next().ok_or(format!("{name} needs a value"))?;
                v.parse::<u64>()
                    .map_err(|_| format!("{name}: `{v}` is not a number"))
            };
            match flag.as_str() {
                "--messages" | "-n" => args.messages = value("--messages")? as usize,
                "--concurrency" | "-c" => args.concurrency = value("--concurrency")? as usize,
                "--batch" | "-b" => args.batch = value("--batch")? as usize,
                "--rate" => args.rate = value("--rate")?,
                "--receipt-delay-ms" => args.receipt_delay_ms = value("--receipt-delay-ms")?,
                "--timeout" => args.timeout_secs = value("--timeout")?,
                "--binds" => args.binds = value("--binds")? as usize,
                "--window" => args.window = value("--window")? as usize,
                "--carrier-rate" => args.carrier_rate = value("--carrier-rate")? as u32,
                "--gateway-threads" => args.gateway_threads = value("--gateway-threads")? as usize,
                "--load-threads" => args.load_threads = value("--load-threads")? as usize,
                "--webhook-concurrency" => {
                    args.webhook_concurrency = Some(value("--webhook-concurrency")? as usize)
                }
                "--no-webhooks" => args.no_webhooks = true,
                "--webhook-batch" => args.webhook_batch = value("--webhook-batch")? as usize,
                "--instances" => args.instances = value("--instances")? as usize,
                "--store-writers" => args.store_writers = Some(value("--store-writers")? as usize),
                "--store-url" => {
                    args.store_url = Some(it.next().ok_or("--store-url needs a value")?);
                }
                "--db-dir" => {
                    args.db_dir = Some(it.next().ok_or("--db-dir needs a value")?);
                }
                "--help" | "-h" => return Err(USAGE.to_owned()),
                _ => {}
            }
        }
        if args.messages == 0 || args.concurrency == 0 || args.batch == 0 {
            return Err(format!(
                "--messages, --concurrency and --batch must be at least 1\n{USAGE}"
            ));
        }
        if args.batch > 1000 {
            return Err(
                "--batch: the gateway takes at most 1000 per request (http.max_batch)".into(),
            );
        }
        if args.instances == 0 || (args.instances > 1 && args.store_url.is_none()) {
            return Err(
                "--instances: at least 1, and more than 1 needs --store-url postgres://... \
                 (instances share a queue only on PostgreSQL)"
                    .into(),
            );
        }
        if args.gateway_threads == 0 || args.load_threads == 0 || args.timeout_secs == 0 {
            return Err(
                "--gateway-threads, --load-threads and --timeout must be at least 1".into(),
            );
        }
        Ok(args)
    }
}

fn main() {
    smsgw::allocator::configure();
    let args = match Args::parse() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.timeout_secs);
    let cpu_at_start = process_cpu_seconds();

    let load_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.load_threads)
        .thread_name("load-rt")
        .enable_all()
        .build()
        .expect("load runtime");
    let gw_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.gateway_threads)
        .thread_name("gw-rt")
        .enable_all()
        .build()
        .expect("gateway runtime");

    let db_dir = args
        .db_dir
        .clone()
        .unwrap_or_else(|| env!("CARGO_TARGET_TMPDIR").to_owned());
    let dir = tempfile::tempdir_in(&db_dir).expect("temporary directory");
    let db = dir.path().join("smsgw.db");

    let (sim, sim_stop, hooks) = load_rt.block_on(async {
        let sim_stop = CancellationToken::new();
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind simulator");
        let sim = smsgw::sim::start(
            listener,
            SimConfig {
                receipt_delay: Duration::from_millis(args.receipt_delay_ms),
                ..SimConfig::default()
            },
            sim_stop.clone(),
        );
        let hooks = Hooks::start(started).await;
        (sim, sim_stop, hooks)
    });

    let config = gateway_config(&args, &db, &sim, &hooks.url);
    let settings = format!(
        "binds {} × window {} at {}/s per bind; store.max_batch {}; messages.max_in_flight {}; \
         webhooks.concurrency {}, webhook_batch {}; receipt_delay {} ms; {}",
        args.binds,
        args.window,
        args.carrier_rate,
        config.store.max_batch,
        config.messages.max_in_flight,
        config.webhooks.concurrency,
        args.webhook_batch,
        args.receipt_delay_ms,
        match &args.store_url {
            Some(_) => format!(
                "PostgreSQL, {} instance(s) in this process on the gw-rt threads",
                args.instances
            ),
            None => format!("SQLite in {db_dir}"),
        },
    );
    let shutdown = CancellationToken::new();
    let mut urls = Vec::new();
    let mut gateways = Vec::new();
    for _ in 0..args.instances {
        let http = gw_rt
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("bind HTTP");
        urls.push(format!(
            "http://{}",
            http.local_addr().expect("HTTP address")
        ));
        gateways.push(gw_rt.spawn(smsgw::run(
            config.clone(),
            // No operators' API: the bench measures the message path only.
            smsgw::Listeners {
                http,
                admin: None,
                metrics: None,
            },
            shutdown.clone(),
        )));
    }

    let report = load_rt.block_on(drive(&args, &urls, &sim, &hooks, started, deadline));
    let cpu_at_end = process_cpu_seconds();
    let threads = thread_cpu_seconds();

    print_report(
        &args,
        &settings,
        &report,
        &sim,
        &hooks,
        cpu_at_end - cpu_at_start,
        threads,
    );

    // Stop in order; bounded so a stuck shutdown cannot hang the bench. The store finishes
    // every job queued before the stop, so the CPU of the stop shows work left behind.
    let stop_started = Instant::now();
    shutdown.cancel();
    for gateway in gateways {
        let stopped =
            gw_rt.block_on(async { tokio::time::timeout(Duration::from_secs(15), gateway).await });
        match stopped {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => eprintln!("warning: a gateway stopped with an error: {e}"),
            Ok(Err(e)) => eprintln!("warning: a gateway task failed: {e}"),
            Err(_) => eprintln!("warning: a gateway did not stop within 15 s"),
        }
    }
    println!(
        "stop:                {:.2} s, CPU {:.2} s (the store's queued work, e.g. webhook results, then the shutdown)",
        stop_started.elapsed().as_secs_f64(),
        process_cpu_seconds() - cpu_at_end
    );
    sim_stop.cancel();
    gw_rt.shutdown_timeout(Duration::from_secs(2));
    load_rt.shutdown_timeout(Duration::from_secs(2));
    drop(dir);
    if !report.complete {
        std::process::exit(1);
    }
}

fn gateway_config(args: &Args, db: &Path, sim: &SimHandle, hook_url: &str) -> Config {
    let text = format!(
        r#"
        [http]
        listen = "127.0.0.1:0"
        [store]
        {store}
        [webhooks]
        allow_internal = ["127.0.0.1/32"]
        {webhooks}
        [privacy]
        pseudonym_key = "e2e-bench-pseudonym-key-0123456789"
        [logging]
        level = "warn"
        [[accounts]]
        name = "bench"
        api_keys = ["{hash}"]
        {hooks}
        [[carriers]]
        name = "sim"
        address = "{carrier}"
        binds = {binds}
        window = {window}
        rate_per_second = {rate}
        reconnect_min = "50ms"
        reconnect_max = "1s"
        response_timeout = "10s"
        drain_timeout = "2s"
        "#,
        store = match &args.store_url {
            Some(url) => match args.store_writers {
                Some(writers) => format!("url = \"{url}\"\nwriters = {writers}"),
                None => format!("url = \"{url}\""),
            },
            None => format!("path = \"{}\"", db.display()),
        },
        hash = smsgw::api::auth::hash_key(API_KEY),
        carrier = sim.local_addr(),
        binds = args.binds,
        window = args.window,
        rate = args.carrier_rate,
        hooks = if args.no_webhooks {
            String::new()
        } else {
            format!(
                "webhook_url = \"{hook_url}\"\nwebhook_secret = \"{HOOK_SECRET}\"\n\
                 webhook_batch = {}",
                args.webhook_batch
            )
        },
        webhooks = args
            .webhook_concurrency
            .map(|n| format!("concurrency = {n}"))
            .unwrap_or_default(),
    );
    Config::parse(&text, Path::new("e2e-bench.toml")).unwrap_or_else(|e| {
        eprintln!("the bench configuration is invalid: {e}");
        std::process::exit(2)
    })
}

/// What the load generator measured. Times are from `t0`, the first request.
#[derive(Default)]
struct Report {
    complete: bool,
    failure: Option<String>,
    requests: usize,
    request_errors: usize,
    first_error: Option<String>,
    accepted: usize,
    /// Time of the last 202.
    last_accept: Duration,
    /// Per-request accept latency, microseconds, sorted.
    latencies_us: Vec<u64>,
    first_submit: Option<Duration>,
    last_submit: Option<Duration>,
    all_receipts_acked: Option<Duration>,
    all_delivered: Option<Duration>,
    all_webhooks: Option<Duration>,
    /// Wall time from `t0` to the end of measuring.
    elapsed: Duration,
    timeline: Vec<Sample>,
}

async fn drive(
    args: &Args,
    urls: &[String],
    sim: &SimHandle,
    hooks: &Hooks,
    started: Instant,
    deadline: Instant,
) -> Report {
    // For the readiness checks only; the workers post through `Connections`.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("HTTP client");
    let mut report = Report::default();

    // Every instance holds a bind before the clock starts (binds are spread among instances).
    for url in urls {
        if let Err(e) = wait_ready(&client, url, deadline).await {
            report.failure = Some(e);
            return report;
        }
    }

    let bodies = Arc::new(request_bodies(args.messages, args.batch));
    report.requests = bodies.len();

    let t0 = Instant::now();
    let stop_monitor = Arc::new(AtomicBool::new(false));
    let accepted_so_far = Arc::new(AtomicUsize::new(0));
    let monitor = tokio::spawn(monitor_sim(
        sim.clone(),
        hooks.stats.clone(),
        accepted_so_far.clone(),
        t0,
        deadline,
        stop_monitor.clone(),
    ));

    let next = Arc::new(AtomicUsize::new(0));
    let last_accept_us = Arc::new(AtomicU64::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency {
        let bodies = bodies.clone();
        let next = next.clone();
        let last_accept_us = last_accept_us.clone();
        let accepted_so_far = accepted_so_far.clone();
        let hosts: Vec<String> = urls
            .iter()
            .map(|u| u.trim_start_matches("http://").to_owned())
            .collect();
        let per_request = Duration::from_secs_f64(args.batch as f64 / args.rate.max(1) as f64);
        let paced = args.rate > 0;
        workers.spawn(async move {
            let mut out = WorkerResult::default();
            let mut connections = Connections::new(hosts);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= bodies.len() || Instant::now() > deadline {
                    break;
                }
                if paced {
                    tokio::time::sleep_until((t0 + per_request.mul_f64(i as f64)).into()).await;
                }
                let sent = Instant::now();
                let outcome = connections.post(i, bodies[i].clone()).await;
                let done = Instant::now();
                match outcome {
                    Ok(ids) => {
                        out.latencies_us.push((done - sent).as_micros() as u64);
                        out.accepted += ids;
                        accepted_so_far.fetch_add(ids, Ordering::Relaxed);
                        last_accept_us.fetch_max((done - t0).as_micros() as u64, Ordering::Relaxed);
                    }
                    Err(e) => {
                        out.errors += 1;
                        out.first_error.get_or_insert(e);
                    }
                }
            }
            out
        });
    }
    while let Some(joined) = workers.join_next().await {
        match joined {
            Ok(w) => {
                report.accepted += w.accepted;
                report.request_errors += w.errors;
                report.latencies_us.extend(w.latencies_us);
                if report.first_error.is_none() {
                    report.first_error = w.first_error;
                }
            }
            Err(e) => {
                report.request_errors += 1;
                report
                    .first_error
                    .get_or_insert(format!("worker panicked: {e}"));
            }
        }
    }
    report.latencies_us.sort_unstable();
    report.last_accept = Duration::from_micros(last_accept_us.load(Ordering::Relaxed));

    // Wait until every accepted message was reported delivered and every webhook arrived
    // (queued, sent, delivered: three per message).
    // Without webhooks, done when the gateway has acknowledged (so stored) every receipt.
    let expected = report.accepted;
    loop {
        let (delivered, total) = if args.no_webhooks {
            let acked = sim.deliver_sm_resp_count();
            (acked, 3 * acked)
        } else {
            (
                hooks.stats.delivered.load(Ordering::Relaxed),
                hooks.stats.total.load(Ordering::Relaxed),
            )
        };
        if delivered >= expected && total >= 3 * expected {
            report.complete = report.request_errors == 0 && expected == args.messages;
            break;
        }
        if Instant::now() > deadline {
            let what = if args.no_webhooks {
                "receipts stored"
            } else {
                "delivered webhooks"
            };
            report.failure = Some(format!(
                "timed out after {:.1} s (--timeout {}): {delivered} of {expected} {what}, \
                 {total} of {} webhooks",
                started.elapsed().as_secs_f64(),
                args.timeout_secs,
                3 * expected
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    report.elapsed = t0.elapsed();
    stop_monitor.store(true, Ordering::Relaxed);
    let marks = monitor.await.unwrap_or_default();
    report.first_submit = marks.first_submit;
    report.last_submit = marks.last_submit;
    report.all_receipts_acked = marks.all_receipts_acked;
    report.timeline = marks.timeline;
    // The receiver stamps arrivals against `started`; rebase them on t0.
    let since_t0 = |us: u64| {
        (us > 0).then(|| (started + Duration::from_micros(us)).saturating_duration_since(t0))
    };
    if args.no_webhooks {
        // "Delivered" is the last receipt stored; no webhooks were asked for.
        report.all_delivered = report.all_receipts_acked;
        report.all_webhooks = report.all_receipts_acked;
    } else {
        if hooks.stats.delivered.load(Ordering::Relaxed) >= expected {
            report.all_delivered = since_t0(hooks.stats.last_delivered_us.load(Ordering::Relaxed));
        }
        if hooks.stats.total.load(Ordering::Relaxed) >= 3 * expected {
            report.all_webhooks = since_t0(hooks.stats.last_any_us.load(Ordering::Relaxed));
        }
    }
    report
}

/// A worker's keep-alive HTTP/1.1 connections, one per gateway, as an application's client
/// holds them: hyper's own connection, without reqwest's pool, URL parsing and redirect policy
/// on every request. The load generator shares the two cores with the gateway, and those were
/// ~15% of its CPU.
struct Connections {
    hosts: Vec<String>,
    open: Vec<Option<SendRequest<axum::body::Body>>>,
    auth: HeaderValue,
}

impl Connections {
    fn new(hosts: Vec<String>) -> Connections {
        Connections {
            open: hosts.iter().map(|_| None).collect(),
            hosts,
            auth: HeaderValue::from_str(&format!("Bearer {API_KEY}")).expect("header value"),
        }
    }

    /// Posts request `i` to gateway `i % n`; returns the count of accepted messages. A
    /// connection that failed is opened again for the next request.
    async fn post(&mut self, i: usize, body: Bytes) -> Result<usize, String> {
        let which = i % self.hosts.len();
        let result = self.try_post(which, body).await;
        if result.is_err() {
            self.open[which] = None;
        }
        result
    }

    async fn try_post(&mut self, which: usize, body: Bytes) -> Result<usize, String> {
        let host = &self.hosts[which];
        let sender = match &mut self.open[which] {
            Some(sender) => sender,
            empty => empty.insert(connect(host).await?),
        };
        let request = axum::http::Request::post("/v1/messages")
            .header(header::HOST, host.as_str())
            .header(header::AUTHORIZATION, self.auth.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .body(axum::body::Body::from(body))
            .map_err(|e| format!("building the request: {e}"))?;
        sender
            .ready()
            .await
            .map_err(|e| format!("connection lost: {e}"))?;
        let response = tokio::time::timeout(Duration::from_secs(10), sender.send_request(request))
            .await
            .map_err(|_| "no answer within 10 s".to_owned())?
            .map_err(|e| format!("request failed: {e}"))?;
        let status = response.status().as_u16();
        let body = axum::body::to_bytes(axum::body::Body::new(response.into_body()), 1 << 20)
            .await
            .map_err(|e| format!("reading the answer: {e}"))?;
        match status {
            202 => Ok(count_ids(&body)),
            _ => Err(format!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(300)])
            )),
        }
    }
}

async fn connect(host: &str) -> Result<SendRequest<axum::body::Body>, String> {
    let stream = tokio::net::TcpStream::connect(host)
        .await
        .map_err(|e| format!("connecting to {host}: {e}"))?;
    stream
        .set_nodelay(true)
        .map_err(|e| format!("TCP_NODELAY: {e}"))?;
    let (sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP handshake with {host}: {e}"))?;
    tokio::spawn(connection);
    Ok(sender)
}

#[derive(Default)]
struct WorkerResult {
    accepted: usize,
    errors: usize,
    first_error: Option<String>,
    latencies_us: Vec<u64>,
}

/// Messages accepted in an answer: one `"id":` per accepted item (rejected items carry `error`).
fn count_ids(body: &[u8]) -> usize {
    body.windows(5).filter(|w| w == b"\"id\":").count()
}

/// Request bodies, built before the clock starts: distinct recipients spread over the number
/// range (`common::recipient`), one GSM-7 segment each.
fn request_bodies(messages: usize, batch: usize) -> Vec<Bytes> {
    let message = |i: usize| {
        serde_json::json!({
            "to": common::recipient(i),
            "from": "iP1",
            "text": format!("Your verification code is {:06}. It expires in 10 minutes.", i % 1_000_000),
        })
    };
    (0..messages)
        .step_by(batch)
        .map(|start| {
            let end = (start + batch).min(messages);
            let body = if batch == 1 {
                message(start)
            } else {
                serde_json::json!({ "messages": (start..end).map(message).collect::<Vec<_>>() })
            };
            Bytes::from(body.to_string())
        })
        .collect()
}

async fn wait_ready(client: &reqwest::Client, url: &str, deadline: Instant) -> Result<(), String> {
    // Long enough for a second instance to be handed a bind (the presence count is refreshed
    // every few seconds).
    let limit = (Instant::now() + Duration::from_secs(40)).min(deadline);
    let mut last = String::from("no answer");
    while Instant::now() < limit {
        match client.get(format!("{url}/readyz")).send().await {
            Ok(r) if r.status().is_success() => return Ok(()),
            Ok(r) => last = format!("{} {}", r.status(), r.text().await.unwrap_or_default()),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Err(format!(
        "the gateway at {url} did not become ready within 40 s: {last}"
    ))
}

#[derive(Default)]
struct SimMarks {
    first_submit: Option<Duration>,
    last_submit: Option<Duration>,
    all_receipts_acked: Option<Duration>,
    timeline: Vec<Sample>,
}

/// Cumulative counts at one moment, for the per-second timeline.
#[derive(Clone, Copy)]
struct Sample {
    at: Duration,
    accepted: usize,
    submitted: usize,
    receipts_stored: usize,
    webhooks: usize,
    delivered_webhooks: usize,
}

/// Samples the simulator's counters every millisecond: when the first and the last submit_sm
/// arrived, and when every receipt sent so far had been acknowledged (the gateway acks a receipt
/// once it has stored it). Every second it also records the cumulative counts of each stage.
async fn monitor_sim(
    sim: SimHandle,
    hooks: Arc<HookStats>,
    accepted: Arc<AtomicUsize>,
    t0: Instant,
    deadline: Instant,
    stop: Arc<AtomicBool>,
) -> SimMarks {
    let mut marks = SimMarks::default();
    let mut seen = 0;
    let mut acked_seen = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let sample = |at| Sample {
        at,
        accepted: accepted.load(Ordering::Relaxed),
        submitted: sim.submitted_count(),
        receipts_stored: sim.deliver_sm_resp_count(),
        webhooks: hooks.total.load(Ordering::Relaxed),
        delivered_webhooks: hooks.delivered.load(Ordering::Relaxed),
    };
    let mut next_sample = Duration::from_secs(1);
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        tick.tick().await;
        let submitted = sim.submitted_count();
        let now = t0.elapsed();
        if now >= next_sample {
            marks.timeline.push(sample(now));
            next_sample += Duration::from_secs(1);
        }
        if submitted > 0 && marks.first_submit.is_none() {
            marks.first_submit = Some(now);
        }
        if submitted != seen {
            seen = submitted;
            marks.last_submit = Some(now);
        }
        let acked = sim.deliver_sm_resp_count();
        if acked != acked_seen {
            acked_seen = acked;
            if acked >= submitted {
                marks.all_receipts_acked = Some(now);
            }
        }
    }
    marks.timeline.push(sample(t0.elapsed()));
    marks
}

/// Webhook counters, stamped in microseconds since the bench started.
#[derive(Default)]
struct HookStats {
    /// Events received (a request of a batching account carries several).
    total: AtomicUsize,
    requests: AtomicUsize,
    queued: AtomicUsize,
    sent: AtomicUsize,
    delivered: AtomicUsize,
    other: AtomicUsize,
    bad_signatures: AtomicUsize,
    verified: AtomicUsize,
    last_delivered_us: AtomicU64,
    last_any_us: AtomicU64,
}

struct Hooks {
    url: String,
    stats: Arc<HookStats>,
}

#[derive(Deserialize)]
struct HookEvent<'a> {
    #[serde(borrow)]
    status: Option<&'a str>,
}

impl Hooks {
    /// An application's webhook endpoint: counts events by status, checks a sample of signatures.
    async fn start(started: Instant) -> Hooks {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind webhook receiver");
        let url = format!("http://{}/hooks", listener.local_addr().expect("address"));
        let stats = Arc::new(HookStats::default());
        let state = stats.clone();
        let app = axum::Router::new().route(
            "/hooks",
            axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                let stats = state.clone();
                async move {
                    let n = stats.requests.fetch_add(1, Ordering::Relaxed);
                    let now = started.elapsed().as_micros() as u64;
                    let statuses: Vec<Option<&str>> = if body.first() == Some(&b'[') {
                        serde_json::from_slice::<Vec<HookEvent>>(&body)
                            .map(|events| events.into_iter().map(|e| e.status).collect())
                            .unwrap_or_else(|_| vec![None])
                    } else {
                        let event = serde_json::from_slice::<HookEvent>(&body);
                        vec![event.ok().and_then(|e| e.status)]
                    };
                    for status in &statuses {
                        let counter = match status {
                            Some("queued") => &stats.queued,
                            Some("sent") => &stats.sent,
                            Some("delivered") => {
                                stats.last_delivered_us.fetch_max(now, Ordering::Relaxed);
                                &stats.delivered
                            }
                            _ => &stats.other,
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                    stats.total.fetch_add(statuses.len(), Ordering::Relaxed);
                    stats.last_any_us.fetch_max(now, Ordering::Relaxed);
                    if n % VERIFY_EVERY == 0 {
                        stats.verified.fetch_add(1, Ordering::Relaxed);
                        let signature = headers
                            .get(smsgw::webhook::SIGNATURE_HEADER)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("");
                        let text = String::from_utf8_lossy(&body);
                        let now_s = smsgw::message::now_ms() / 1000;
                        if smsgw::webhook::verify(HOOK_SECRET, signature, &text, now_s, 300)
                            .is_err()
                        {
                            stats.bad_signatures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    "ok"
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        Hooks { url, stats }
    }
}

fn print_report(
    args: &Args,
    settings: &str,
    report: &Report,
    sim: &SimHandle,
    hooks: &Hooks,
    cpu_seconds: f64,
    threads: BTreeMap<String, f64>,
) {
    let secs = |d: Duration| d.as_secs_f64();
    let rate = |n: usize, d: Duration| {
        if d.is_zero() {
            "n/a".to_owned()
        } else {
            format!("{:.0}", n as f64 / d.as_secs_f64())
        }
    };
    let opt = |d: Option<Duration>| d.map_or("n/a".to_owned(), |d| format!("{:.3} s", secs(d)));
    let pct = |q: f64| {
        let v = &report.latencies_us;
        if v.is_empty() {
            "n/a".to_owned()
        } else {
            let i = ((v.len() - 1) as f64 * q).round() as usize;
            format!("{:.2} ms", v[i] as f64 / 1000.0)
        }
    };
    let submitted = sim.submitted_count();
    let s = &hooks.stats;
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());

    println!();
    println!(
        "== smsgw e2e bench ({cores} cores; gateway, simulator and load generator in one process) =="
    );
    println!("settings:            {settings}");
    println!(
        "load:                {} messages, batch {}, concurrency {}, {} requests{}",
        args.messages,
        args.batch,
        args.concurrency,
        report.requests,
        if args.rate > 0 {
            format!(", paced at {} msg/s", args.rate)
        } else {
            String::new()
        }
    );
    if let Some(failure) = &report.failure {
        println!("RESULT:              INCOMPLETE: {failure}");
    } else if report.complete {
        println!(
            "RESULT:              complete: every message delivered and every webhook arrived"
        );
    } else {
        println!("RESULT:              finished with errors (see below)");
    }
    println!(
        "accepted:            {} messages, {} request errors{}",
        report.accepted,
        report.request_errors,
        report
            .first_error
            .as_deref()
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default()
    );
    println!(
        "accepted msg/s:      {}   (accepted / {:.3} s until the last 202)",
        rate(report.accepted, report.last_accept),
        secs(report.last_accept)
    );
    let carrier_span = match (report.first_submit, report.last_submit) {
        (Some(a), Some(b)) if b > a => Some(b - a),
        _ => None,
    };
    println!(
        "carrier submit/s:    {}   ({submitted} submit_sm between {} and {}; {} throttled)",
        carrier_span.map_or("n/a".to_owned(), |d| rate(submitted, d)),
        opt(report.first_submit),
        opt(report.last_submit),
        sim.throttled_count(),
    );
    println!(
        "receipts:            {} sent by the carrier, {} acknowledged (stored) by the gateway; all acked at {}",
        sim.deliver_sm_sent(),
        sim.deliver_sm_resp_count(),
        opt(report.all_receipts_acked)
    );
    println!(
        "webhooks:            {} received in {} requests: {} queued, {} sent, {} delivered, {} other; {}/{} sampled signatures bad",
        s.total.load(Ordering::Relaxed),
        s.requests.load(Ordering::Relaxed),
        s.queued.load(Ordering::Relaxed),
        s.sent.load(Ordering::Relaxed),
        s.delivered.load(Ordering::Relaxed),
        s.other.load(Ordering::Relaxed),
        s.bad_signatures.load(Ordering::Relaxed),
        s.verified.load(Ordering::Relaxed),
    );
    println!(
        "all delivered at:    {}   (last `delivered` webhook)",
        opt(report.all_delivered)
    );
    println!(
        "all webhooks at:     {}   (every receipt matched, every webhook arrived)",
        opt(report.all_webhooks)
    );
    println!(
        "end-to-end msg/s:    {}",
        report
            .all_webhooks
            .map_or("n/a".to_owned(), |d| rate(report.accepted, d))
    );
    println!(
        "accept latency:      p50 {}, p90 {}, p99 {}, max {}   (per HTTP request of {} messages)",
        pct(0.50),
        pct(0.90),
        pct(0.99),
        pct(1.0),
        args.batch
    );
    let wall = secs(report.elapsed);
    println!(
        "process:             peak RSS {} MiB (VmHWM), CPU {:.2} s over {:.2} s measured ({:.0}% of one core)",
        peak_rss_kib().map_or("n/a".to_owned(), |k| format!("{:.1}", k as f64 / 1024.0)),
        cpu_seconds,
        wall,
        if wall > 0.0 {
            100.0 * cpu_seconds / wall
        } else {
            0.0
        },
    );
    let breakdown: Vec<String> = threads
        .iter()
        .filter(|(_, s)| **s >= 0.01)
        .map(|(name, s)| format!("{name} {s:.2} s"))
        .collect();
    println!("CPU by thread:       {}", breakdown.join(", "));
    println!("timeline (cumulative; each stage's progress per second):");
    println!("     t  accepted  submit_sm  receipts stored  webhooks  delivered webhooks");
    for t in &report.timeline {
        println!(
            "{:>5.1}s {:>9} {:>10} {:>16} {:>9} {:>19}",
            t.at.as_secs_f64(),
            t.accepted,
            t.submitted,
            t.receipts_stored,
            t.webhooks,
            t.delivered_webhooks
        );
    }
}

/// Peak resident set size of this process (gateway, simulator and load generator together).
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Clock ticks per second of /proc times; 100 on every mainstream Linux.
const CLOCK_TICKS: f64 = 100.0;

/// utime + stime (fields 14 and 15) of a /proc `stat` line, in seconds.
fn stat_cpu_seconds(stat: &str) -> Option<(String, f64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat[open + 1..close].to_owned();
    let mut fields = stat[close + 1..].split_whitespace();
    // After the name: state is field 3, so utime (14) and stime (15) are the 12th and 13th.
    let utime: f64 = fields.nth(11)?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some((name, (utime + stime) / CLOCK_TICKS))
}

fn process_cpu_seconds() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| stat_cpu_seconds(&s))
        .map_or(0.0, |(_, s)| s)
}

/// CPU seconds of the live threads, summed by thread name (tokio workers, sqlx's SQLite worker).
fn thread_cpu_seconds() -> BTreeMap<String, f64> {
    let mut by_name = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return by_name;
    };
    for task in tasks.flatten() {
        if let Some((name, s)) = std::fs::read_to_string(task.path().join("stat"))
            .ok()
            .and_then(|s| stat_cpu_seconds(&s))
        {
            *by_name.entry(name).or_insert(0.0) += s;
        }
    }
    by_name
}
