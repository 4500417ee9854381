//! systemd integration for the `Type=notify` unit in `systemd/smsgw.service`.
//!
//! - [`ready`] once the store is open and the HTTP listener is serving;
//! - [`status`] lines: whether the store answers and the binds up per carrier;
//! - [`stopping`] when the drain begins;
//! - [`watchdog`]: `WATCHDOG=1` every half `WatchdogSec`, but only while the gateway is healthy,
//!   so that a wedged process is aborted and restarted by systemd instead of sitting there.
//!
//! [`supervise`] starts the watchdog with the gateway's own notion of health: the store answered
//! a probe (a read, and its writer task still running) within the last [`STORE_STALE_AFTER`],
//! and the dispatcher and the webhook sender are still running.
//!
//! Everything here is a no-op when the gateway was not started by systemd: `sd-notify` reads
//! `NOTIFY_SOCKET` on each call and does nothing without it, and [`supervise`] starts no task.
//! A failure to notify is logged, never fatal.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::task::AbortHandle;
use tokio::time::{Instant, MissedTickBehavior, interval, interval_at, timeout};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::router::Router;
use crate::store::Store;

/// How often the status line is recomputed; it is sent when it changed.
pub const STATUS_EVERY: Duration = Duration::from_secs(1);
/// How often the store is asked whether it answers.
pub const PROBE_EVERY: Duration = Duration::from_secs(5);
/// A probe still unanswered after this has failed.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// The store counts as healthy while its last answer is at most this old: three probes, so one
/// slow answer (a long group commit, a WAL checkpoint) is not an outage. With `WatchdogSec=30`
/// a store that stops answering gets the gateway restarted 15 to 50 seconds later.
pub const STORE_STALE_AFTER: Duration = Duration::from_secs(15);

/// Tells systemd the gateway is up (`READY=1`), with a first status line.
pub fn ready(status: &str) {
    report(send(&[
        NotifyState::Ready,
        NotifyState::Status(&one_line(status)),
    ]));
}

/// Replaces the status line `systemctl status smsgw` shows.
pub fn status(text: &str) {
    report(send(&[NotifyState::Status(&one_line(text))]));
}

/// Tells systemd the gateway is stopping (`STOPPING=1`): it is draining, not hung.
pub fn stopping() {
    report(send(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping: draining the binds"),
    ]));
}

/// How often to send `WATCHDOG=1`: half the unit's `WatchdogSec`, or `None` when systemd
/// does not expect pings (no `WatchdogSec`, not started by systemd, or meant for another PID).
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
        .map(|limit| limit / 2)
        .filter(|every| !every.is_zero())
}

/// Feeds the systemd watchdog every [`watchdog_interval`] while `health()` is true, and keeps
/// the status line (from `status_line`, checked every [`STATUS_EVERY`], sent when it changed)
/// current, until `shutdown`. While `health()` is false no ping goes out, so systemd aborts
/// the process after `WatchdogSec` and `Restart=on-failure` starts it again. Returns at once
/// when the process was not started by systemd.
pub async fn watchdog(
    health: impl Fn() -> bool,
    status_line: impl Fn() -> String,
    shutdown: CancellationToken,
) {
    if !under_systemd() {
        return;
    }
    let ping_every = watchdog_interval();
    // Without a watchdog this timer is never polled (the branch below is disabled).
    let mut pings = interval(ping_every.unwrap_or(STATUS_EVERY));
    pings.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut checks = interval_at(Instant::now() + STATUS_EVERY, STATUS_EVERY);
    checks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut healthy = true;
    let mut last_status = String::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = pings.tick(), if ping_every.is_some() => {
                let now = health();
                if now {
                    report(send(&[NotifyState::Watchdog]));
                }
                if now != healthy {
                    healthy = now;
                    if now {
                        info!("healthy again: feeding the systemd watchdog");
                    } else {
                        warn!(
                            "unhealthy: not feeding the systemd watchdog; systemd restarts the \
                             gateway unless it recovers within WatchdogSec"
                        );
                    }
                    last_status = send_status(status_line(), now, true, &last_status);
                }
            }
            _ = checks.tick() => {
                let (now, fed) = match ping_every {
                    Some(_) => (healthy, true),
                    None => (health(), false),
                };
                last_status = send_status(status_line(), now, fed, &last_status);
            }
        }
    }
}

/// Sends `line` (marked when unhealthy) unless it is what was sent last; returns what was sent.
fn send_status(line: String, healthy: bool, watchdog: bool, last: &str) -> String {
    let line = match (healthy, watchdog) {
        (true, _) => line,
        (false, true) => format!("UNHEALTHY, watchdog not fed: {line}"),
        (false, false) => format!("UNHEALTHY: {line}"),
    };
    if line != last {
        status(&line);
    }
    line
}

/// Starts what systemd needs while the gateway runs: a task probing the store and the
/// [`watchdog`], both until `shutdown`. Healthy means: the store answered a probe within
/// [`STORE_STALE_AFTER`], and none of `tasks` (the dispatcher, the webhook sender: loops that
/// only end at shutdown) has ended. Starts nothing when not started by systemd.
pub fn supervise(
    store: Arc<dyn Store>,
    router: Arc<Router>,
    tasks: Vec<(&'static str, AbortHandle)>,
    shutdown: CancellationToken,
) {
    if !under_systemd() {
        return;
    }
    let probe = Arc::new(StoreProbe::new());
    tokio::spawn(probe.clone().run(store, shutdown.clone()));
    let health = Arc::new(Health { probe, tasks });
    let line = health.clone();
    tokio::spawn(watchdog(
        move || health.is_healthy(),
        move || line.status_line(&router),
        shutdown,
    ));
}

/// Whether the process was started by systemd with a notification socket.
fn under_systemd() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some_and(|socket| !socket.is_empty())
}

fn send(states: &[NotifyState<'_>]) -> io::Result<()> {
    sd_notify::notify(states)
}

/// Logs a failed notification: a warning the first time, then at debug level.
fn report(result: io::Result<()>) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if let Err(error) = result {
        if WARNED.swap(true, Ordering::Relaxed) {
            debug!(%error, "cannot notify systemd");
        } else {
            warn!(%error, "cannot notify systemd through NOTIFY_SOCKET; going on without it");
        }
    }
}

/// A status line is one `KEY=value` line of the protocol: no line breaks in it.
fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

/// When the store last answered a probe.
struct StoreProbe {
    started: std::time::Instant,
    /// Milliseconds from `started` to the last answer; 0 (the store was just opened) at first.
    answered_ms: AtomicU64,
}

impl StoreProbe {
    fn new() -> StoreProbe {
        StoreProbe {
            started: std::time::Instant::now(),
            answered_ms: AtomicU64::new(0),
        }
    }

    fn since_answer(&self) -> Duration {
        let answered = Duration::from_millis(self.answered_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(answered)
    }

    fn answered(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.answered_ms.store(ms, Ordering::Relaxed);
    }

    /// Pings the store every [`PROBE_EVERY`] until `shutdown`; logs when it stops and starts
    /// answering.
    async fn run(self: Arc<Self>, store: Arc<dyn Store>, shutdown: CancellationToken) {
        let mut every = interval(PROBE_EVERY);
        every.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut answering = true;
        loop {
            let answer = tokio::select! {
                () = shutdown.cancelled() => return,
                _ = every.tick() => tokio::select! {
                    () = shutdown.cancelled() => return,
                    answer = timeout(PROBE_TIMEOUT, store.ping()) => answer,
                },
            };
            match answer {
                Ok(Ok(())) => {
                    self.answered();
                    if !answering {
                        info!("the store answers again");
                    }
                    answering = true;
                }
                Ok(Err(error)) if answering => {
                    warn!(%error, "the store does not answer its health probe");
                    answering = false;
                }
                Err(_) if answering => {
                    warn!(timeout = ?PROBE_TIMEOUT, "the store's health probe timed out");
                    answering = false;
                }
                Ok(Err(_)) | Err(_) => {}
            }
        }
    }
}

/// The gateway's health as the watchdog sees it.
struct Health {
    probe: Arc<StoreProbe>,
    tasks: Vec<(&'static str, AbortHandle)>,
}

impl Health {
    fn store_answers(&self) -> bool {
        self.probe.since_answer() <= STORE_STALE_AFTER
    }

    fn is_healthy(&self) -> bool {
        self.store_answers() && self.tasks.iter().all(|(_, task)| !task.is_finished())
    }

    /// `store answers; binds up: simulated 1, acme 0 (credentials refused)`, plus what stopped.
    fn status_line(&self, router: &Router) -> String {
        let mut line = if self.store_answers() {
            "store answers".to_owned()
        } else {
            format!(
                "store NOT answering for over {}s",
                STORE_STALE_AFTER.as_secs()
            )
        };
        line.push_str("; binds up: ");
        let carriers = router.carriers();
        if carriers.is_empty() {
            line.push_str("no carrier configured");
        }
        for (i, carrier) in carriers.iter().enumerate() {
            if i > 0 {
                line.push_str(", ");
            }
            let bound = carrier.health.bound.load(Ordering::Relaxed);
            line.push_str(&format!("{} {bound}", carrier.name));
            if carrier.health.credentials_refused.load(Ordering::Relaxed) {
                line.push_str(" (credentials refused)");
            }
        }
        for (name, task) in &self.tasks {
            if task.is_finished() {
                line.push_str(&format!("; {name} STOPPED"));
            }
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::ffi::OsString;
    use std::os::unix::net::UnixDatagram;
    use std::path::Path;
    use std::sync::{Mutex, MutexGuard};

    /// Serializes the tests that change the process environment.
    static ENV: Mutex<()> = Mutex::new(());

    /// Holds [`ENV`] and puts back the variables it changed when dropped (even on panic).
    struct EnvGuard {
        saved: Vec<(&'static str, Option<OsString>)>,
        _lock: MutexGuard<'static, ()>,
    }

    impl EnvGuard {
        fn lock() -> EnvGuard {
            EnvGuard {
                saved: Vec::new(),
                _lock: ENV.lock().unwrap_or_else(|poisoned| poisoned.into_inner()),
            }
        }

        fn save(&mut self, key: &'static str) {
            if !self.saved.iter().any(|(k, _)| *k == key) {
                self.saved.push((key, std::env::var_os(key)));
            }
        }

        fn set(&mut self, key: &'static str, value: impl AsRef<std::ffi::OsStr>) {
            self.save(key);
            // SAFETY: the tests that write these variables hold `ENV`, no other code of this
            // crate writes them, and Rust's own reads of the environment take std's lock. (A C
            // library reading the environment in another test thread at this very moment is
            // the remaining risk, accepted for tests: sd-notify reads the variables at call
            // time, so there is no other way to point it at a test socket.)
            unsafe { std::env::set_var(key, value) };
        }

        fn remove(&mut self, key: &'static str) {
            self.save(key);
            // SAFETY: as in `set`.
            unsafe { std::env::remove_var(key) };
        }
    }

    impl Drop for EnvGuard {
        fn drop(&mut self) {
            for (key, value) in self.saved.drain(..) {
                // SAFETY: as in `set`; `_lock` is still held here.
                unsafe {
                    match value {
                        Some(value) => std::env::set_var(key, value),
                        None => std::env::remove_var(key),
                    }
                }
            }
        }
    }

    /// A notification socket in a temporary directory.
    fn listen(dir: &Path) -> UnixDatagram {
        let socket = UnixDatagram::bind(dir.join("notify.sock")).expect("binding a socket");
        socket.set_nonblocking(true).expect("non-blocking socket");
        socket
    }

    /// The datagrams received so far.
    fn received(socket: &UnixDatagram) -> Vec<String> {
        let mut buf = vec![0; 4096];
        let mut out = Vec::new();
        while let Ok(n) = socket.recv(&mut buf) {
            out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        out
    }

    /// Collects notifications into `seen` until one satisfies `want` (at most 10 s).
    async fn wait_for(socket: &UnixDatagram, seen: &mut Vec<String>, want: impl Fn(&str) -> bool) {
        for _ in 0..200 {
            let fresh = received(socket);
            let found = fresh.iter().any(|m| want(m));
            seen.extend(fresh);
            if found {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the expected notification did not come; got {seen:?}");
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime")
    }

    #[test]
    fn without_notify_socket_everything_is_a_no_op() {
        let mut env = EnvGuard::lock();
        env.remove("NOTIFY_SOCKET");
        env.remove("WATCHDOG_USEC");
        env.remove("WATCHDOG_PID");

        ready("up");
        status("still up");
        stopping();
        assert!(send(&[NotifyState::Ready, NotifyState::Watchdog]).is_ok());
        assert_eq!(watchdog_interval(), None);
        // The watchdog returns at once rather than running until shutdown.
        let returned = runtime().block_on(async {
            timeout(
                Duration::from_secs(1),
                watchdog(|| true, String::new, CancellationToken::new()),
            )
            .await
        });
        assert!(returned.is_ok(), "the watchdog must return without systemd");
    }

    #[test]
    fn ready_sends_ready_and_the_status_line() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let socket = listen(dir.path());
        {
            let mut env = EnvGuard::lock();
            env.set("NOTIFY_SOCKET", dir.path().join("notify.sock"));
            ready("x");
            status("two\nlines");
            stopping();
        }
        assert_eq!(
            received(&socket),
            [
                "READY=1\nSTATUS=x\n",
                "STATUS=two lines\n",
                "STOPPING=1\nSTATUS=stopping: draining the binds\n",
            ]
        );
    }

    #[test]
    fn the_watchdog_is_fed_only_while_healthy() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let socket = listen(dir.path());
        let mut env = EnvGuard::lock();
        env.set("NOTIFY_SOCKET", dir.path().join("notify.sock"));
        env.set("WATCHDOG_USEC", "200000"); // WatchdogSec=200ms: a ping every 100 ms
        env.remove("WATCHDOG_PID");
        assert_eq!(watchdog_interval(), Some(Duration::from_millis(100)));

        let healthy = Arc::new(AtomicBool::new(true));
        let shutdown = CancellationToken::new();
        let pings = |messages: &[String]| messages.iter().filter(|m| *m == "WATCHDOG=1\n").count();
        runtime().block_on(async {
            let flag = healthy.clone();
            let task = tokio::spawn(watchdog(
                move || flag.load(Ordering::SeqCst),
                || "all fine".to_owned(),
                shutdown.clone(),
            ));
            tokio::time::sleep(Duration::from_millis(350)).await;
            let fed = received(&socket);
            assert!(pings(&fed) >= 2, "pings while healthy: {fed:?}");

            healthy.store(false, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(120)).await;
            let turned = received(&socket); // at most one ping raced the flag
            tokio::time::sleep(Duration::from_millis(350)).await;
            let starved = received(&socket);
            assert_eq!(pings(&starved), 0, "pings while unhealthy: {starved:?}");
            let says = "STATUS=UNHEALTHY, watchdog not fed: all fine\n";
            assert!(
                turned.iter().chain(&starved).any(|m| m == says),
                "the status line says so: {turned:?} {starved:?}"
            );

            healthy.store(true, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(350)).await;
            let fed_again = received(&socket);
            assert!(
                pings(&fed_again) >= 2,
                "pings after recovery: {fed_again:?}"
            );

            shutdown.cancel();
            let stopped = timeout(Duration::from_secs(1), task).await;
            assert!(
                matches!(stopped, Ok(Ok(()))),
                "the watchdog stops at shutdown"
            );
        });
        drop(env);
    }

    #[test]
    fn the_gateway_notifies_ready_status_watchdog_and_stopping() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let socket = listen(dir.path());
        let mut env = EnvGuard::lock();
        env.set("NOTIFY_SOCKET", dir.path().join("notify.sock"));
        env.set("WATCHDOG_USEC", "1000000");
        env.remove("WATCHDOG_PID");

        let text = format!(
            r#"
            [store]
            path = "{}"
            [privacy]
            pseudonym_key = "systemd-test-pseudonym-key-0123"
            [[carriers]]
            name = "sim"
            simulator = {{}}
            "#,
            dir.path().join("smsgw.db").display()
        );
        let config =
            crate::config::Config::parse(&text, Path::new("test.toml")).expect("a valid config");
        runtime().block_on(async {
            let http = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("a port");
            let address = http.local_addr().expect("an address");
            let shutdown = CancellationToken::new();
            let gateway = tokio::spawn(crate::run(
                config,
                crate::Listeners {
                    http,
                    admin: None,
                    metrics: None,
                },
                shutdown.clone(),
            ));

            let mut seen = Vec::new();
            let ready_line = format!("READY=1\nSTATUS=HTTP API on {address}\n");
            wait_for(&socket, &mut seen, |m| m == ready_line).await;
            let bound = "STATUS=store answers; binds up: sim 1\n";
            wait_for(&socket, &mut seen, |m| m == bound).await;
            wait_for(&socket, &mut seen, |m| m == "WATCHDOG=1\n").await;
            shutdown.cancel();
            wait_for(&socket, &mut seen, |m| m.starts_with("STOPPING=1\n")).await;
            let stopped = timeout(Duration::from_secs(20), gateway).await;
            assert!(
                matches!(stopped, Ok(Ok(Ok(())))),
                "the gateway stops cleanly"
            );
        });
    }
}
