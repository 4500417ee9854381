//! A simulated carrier SMSC: a real SMPP peer over TCP for `smsgw sim`, integration tests and
//! benchmarks.
//!
//! [`start`] accepts connections on a listener; each connection is one task owning its socket
//! (see `connection.rs`). The returned [`SimHandle`] is the test's view: what was submitted,
//! counters, mobile-originated messages, forced link drops and live fault knobs
//! ([`SimHandle::set_config`]).
//!
//! Behaviour in short: binds are checked against [`SimConfig::system_id`]/[`SimConfig::password`];
//! every submit_sm gets a decimal message id from a per-simulator counter, then (unless throttled
//! or rejected) a delivery receipt deliver_sm (esm_class 0x04, `receipted_message_id` and
//! `message_state` TLVs, SMPP 3.4 Appendix B text) after [`SimConfig::receipt_delay`]. Receipts go
//! back on the submitting session if it can receive, else on any bound receiver/transceiver;
//! if none is bound they are parked and flushed to the next receiver that binds, as a store and
//! forward SMSC would. A deliver_sm the ESME answers with an error is sent again a second later,
//! and one still unanswered when its link drops goes to the next receiver (so an ESME that
//! crashes before storing a receipt gets it again).

mod config;
mod connection;
mod deliver;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, VecDeque},
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError, RwLock,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use std::path::Path;

use rusmpp::pdus::DeliverSm;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

pub use config::{IdFormat, ReceiptIds, SimConfig};

/// How many accepted submissions [`SimHandle::submitted`] keeps. A long benchmark pushes
/// millions of PDUs through `smsgw sim`; beyond this the oldest entries are dropped so memory
/// stays bounded. [`SimHandle::submitted_count`] keeps counting all of them.
pub const SUBMITTED_LOG_CAPACITY: usize = 250_000;
/// How many deliver_sm wait for a receiver session to bind before the oldest are dropped.
const PARKED_CAPACITY: usize = 100_000;
/// First message id: random with 9–10 digits, so ids from two simulator runs rarely collide
/// and always have the same shape.
const FIRST_ID_RANGE: std::ops::Range<u64> = 100_000_000..5_000_000_000;

/// One submit_sm the simulator accepted (answered ESME_ROK).
#[derive(Debug, Clone)]
pub struct SubmittedPdu {
    /// The id returned in submit_sm_resp (and in the receipt).
    pub message_id: String,
    pub source_addr: String,
    pub destination_addr: String,
    pub esm_class: u8,
    pub data_coding: u8,
    pub registered_delivery: u8,
    /// `short_message`, or the `message_payload` TLV when `short_message` is empty.
    pub short_message: Vec<u8>,
    /// `validity_period` as sent (SMPP time format), empty for the SMSC's default.
    pub validity_period: String,
    /// Which TCP connection carried it (simulator-wide counter, starting at 1).
    pub connection: u64,
    /// The SAR TLVs (sar_msg_ref_num, sar_total_segments, sar_segment_seqnum) when all three
    /// came.
    pub sar: Option<(u16, u8, u8)>,
}

/// Errors of [`SimHandle::send_mo`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// No receiver or transceiver session is bound, so there is nobody to deliver to.
    #[error("no receiver or transceiver session is bound to the simulator")]
    NotBound,
    /// `from` or `to` does not fit an SMPP address (ASCII, at most 20 characters).
    #[error("{field}: not a valid SMPP address (ASCII, at most 20 characters)")]
    InvalidAddress { field: &'static str },
    /// The encoded text is longer than the 65535 octets message_payload can carry.
    #[error("text too long for one deliver_sm")]
    TextTooLong,
}

/// Starts accepting SMPP connections on `listener` until `shutdown` is cancelled, and returns at
/// once. Must be called inside a tokio runtime. Cancelling `shutdown` stops the acceptor and closes
/// every connection (without unbind).
pub fn start(listener: TcpListener, config: SimConfig, shutdown: CancellationToken) -> SimHandle {
    start_serving(listener, config, None, shutdown)
}

/// [`start`], with SMPP over TLS: every connection starts with a TLS handshake (see
/// [`tls_acceptor`]). A failed handshake is counted in [`SimHandle::connections`] and closed.
pub fn start_tls(
    listener: TcpListener,
    config: SimConfig,
    acceptor: TlsAcceptor,
    shutdown: CancellationToken,
) -> SimHandle {
    start_serving(listener, config, Some(acceptor), shutdown)
}

fn start_serving(
    listener: TcpListener,
    config: SimConfig,
    tls: Option<TlsAcceptor>,
    shutdown: CancellationToken,
) -> SimHandle {
    let local_addr = listener.local_addr().unwrap_or_else(|err| {
        tracing::warn!(%err, "simulated carrier: listener has no local address");
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
    });
    let first_id = rand::random_range(FIRST_ID_RANGE);
    let shared = Arc::new(Shared::new(local_addr, config, first_id));
    tokio::spawn(accept_loop(listener, Arc::clone(&shared), tls, shutdown));
    tracing::info!(%local_addr, "simulated carrier listening");
    SimHandle { shared }
}

/// The simulator's TLS side from a PEM certificate chain and its PEM private key.
pub fn tls_acceptor(cert_file: &Path, key_file: &Path) -> Result<TlsAcceptor, SimTlsError> {
    let chain = CertificateDer::pem_file_iter(cert_file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| SimTlsError(format!("{}: {e}", cert_file.display())))?;
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| SimTlsError(format!("{}: {e}", key_file.display())))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(chain, key))
        .map_err(|e| SimTlsError(e.to_string()))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The simulator's certificate or key could not be used.
#[derive(Debug, thiserror::Error)]
#[error("simulator TLS: {0}")]
pub struct SimTlsError(String);

/// Runs the TLS handshake of one accepted connection, then serves it; off the acceptor, so a
/// slow or failing handshake holds up no one else.
async fn serve_tls(
    shared: Arc<Shared>,
    acceptor: TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
) {
    match acceptor.accept(stream).await {
        Ok(tls) => connection::serve(shared, Box::new(tls), peer, shutdown).await,
        Err(err) => {
            shared.counters.tls_failures.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%peer, %err, "simulated carrier: TLS handshake failed");
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    tls: Option<TlsAcceptor>,
    shutdown: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                shared.counters.connections.fetch_add(1, Ordering::Relaxed);
                let shared = Arc::clone(&shared);
                let shutdown = shutdown.child_token();
                match &tls {
                    Some(acceptor) => {
                        tokio::spawn(serve_tls(shared, acceptor.clone(), stream, peer, shutdown));
                    }
                    None => {
                        if let Err(err) = stream.set_nodelay(true) {
                            tracing::debug!(%err, "simulated carrier: TCP_NODELAY failed");
                        }
                        tokio::spawn(connection::serve(shared, Box::new(stream), peer, shutdown));
                    }
                }
            }
            Err(err) => {
                // Typically EMFILE: back off a little instead of spinning. This is the acceptor,
                // not a session's read loop.
                tracing::warn!(%err, "simulated carrier: accept failed");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        }
    }
    tracing::info!(local_addr = %shared.local_addr, "simulated carrier stopped accepting");
}

/// Cloneable view of a running simulator, for tests and the `smsgw sim` command.
#[derive(Clone)]
pub struct SimHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for SimHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimHandle")
            .field("local_addr", &self.shared.local_addr)
            .finish_non_exhaustive()
    }
}

impl SimHandle {
    /// The address the simulator listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local_addr
    }

    /// Every submit_sm answered ESME_ROK, in arrival order (the last
    /// [`SUBMITTED_LOG_CAPACITY`] of them).
    pub fn submitted(&self) -> Vec<SubmittedPdu> {
        lock(&self.shared.submitted).iter().cloned().collect()
    }

    /// How many submit_sm were answered ESME_ROK. Cheap: one atomic load.
    pub fn submitted_count(&self) -> usize {
        self.shared.counters.submitted.load(Ordering::Relaxed)
    }

    /// How many submit_sm were answered ESME_RTHROTTLED (0x58).
    pub fn throttled_count(&self) -> usize {
        self.shared.counters.throttled.load(Ordering::Relaxed)
    }

    /// How many sessions are bound right now.
    pub fn bound_count(&self) -> usize {
        self.shared.counters.bound.load(Ordering::Relaxed)
    }

    /// How many bind PDUs arrived, accepted or refused.
    pub fn bind_attempts(&self) -> usize {
        self.shared.counters.bind_attempts.load(Ordering::Relaxed)
    }

    /// How many TCP connections were accepted (before any TLS handshake or bind).
    pub fn connections(&self) -> usize {
        self.shared.counters.connections.load(Ordering::Relaxed)
    }

    /// How many TLS handshakes failed (a client that does not trust our certificate).
    pub fn tls_failures(&self) -> usize {
        self.shared.counters.tls_failures.load(Ordering::Relaxed)
    }

    /// How many sessions are bound right now, by kind: (transmitters, receivers, transceivers).
    pub fn bound_by_kind(&self) -> (usize, usize, usize) {
        let c = &self.shared.counters;
        (
            c.bound_tx.load(Ordering::Relaxed),
            c.bound_rx.load(Ordering::Relaxed),
            c.bound_trx.load(Ordering::Relaxed),
        )
    }

    /// How many binds asked for SMPP 5.0 (interface_version 0x50).
    pub fn binds_v50(&self) -> usize {
        self.shared.counters.binds_v50.load(Ordering::Relaxed)
    }

    /// How many deliver_sm (receipts and MOs) were written to a socket.
    pub fn deliver_sm_sent(&self) -> usize {
        self.shared.counters.deliver_sent.load(Ordering::Relaxed)
    }

    /// How many query_sm were answered (known id or not).
    pub fn query_count(&self) -> usize {
        self.shared.counters.queries.load(Ordering::Relaxed)
    }

    /// How many deliver_sm_resp came back (any status).
    pub fn deliver_sm_resp_count(&self) -> usize {
        self.shared.counters.deliver_resps.load(Ordering::Relaxed)
    }

    /// Closes every current connection abruptly (no unbind), as a carrier link drop; in-flight
    /// submits get no response. Receipts still owed are delivered to the next receiver that binds.
    pub fn drop_links(&self) {
        let registry = lock(&self.shared.registry);
        tracing::info!(
            connections = registry.sessions.len(),
            "simulated carrier dropping every link"
        );
        for session in registry.sessions.values() {
            session.link.cancel();
        }
    }

    /// Sends a mobile-originated SMS (deliver_sm, esm_class 0x00) on a bound receiver or
    /// transceiver session (round robin when several are bound). The text goes as unpacked GSM-7
    /// (data_coding 0x00) if every character fits the GSM default alphabet, else as UCS-2 (0x08,
    /// UTF-16BE). Returns once the PDU is queued on a session, not when it is acknowledged.
    pub async fn send_mo(&self, from: &str, to: &str, text: &str) -> Result<(), SimError> {
        let mut pdu = deliver::mo_deliver_sm(from, to, text)?;
        loop {
            let Some(outbound) = self.shared.pick_receiver() else {
                return Err(SimError::NotBound);
            };
            match outbound.send(pdu).await {
                Ok(()) => return Ok(()),
                // That session closed in between: try another one.
                Err(mpsc::error::SendError(back)) => pdu = back,
            }
        }
    }

    /// Replaces the configuration for everything from now on (credentials for new binds, ratios,
    /// throttling, receipt delay). Receipts already scheduled keep their delay.
    pub fn set_config(&self, config: SimConfig) {
        *self
            .shared
            .config
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(config);
        self.shared
            .config_generation
            .fetch_add(1, Ordering::Release);
    }
}

/// State shared by the acceptor, every connection task, receipt timers and handles.
struct Shared {
    local_addr: SocketAddr,
    config: RwLock<Arc<SimConfig>>,
    /// Bumped by `set_config`, so that connections re-read the config only when it changed.
    config_generation: AtomicU64,
    next_message_id: AtomicU64,
    next_connection_id: AtomicU64,
    throttle: ThrottleWindow,
    counters: Counters,
    submitted: Mutex<VecDeque<SubmittedPdu>>,
    outcomes: Mutex<Outcomes>,
    registry: Mutex<Registry>,
    /// Round-robin cursor over receiving sessions.
    next_receiver: AtomicUsize,
}

#[derive(Default)]
struct Counters {
    submitted: AtomicUsize,
    throttled: AtomicUsize,
    bound: AtomicUsize,
    bound_tx: AtomicUsize,
    bound_rx: AtomicUsize,
    bound_trx: AtomicUsize,
    binds_v50: AtomicUsize,
    bind_attempts: AtomicUsize,
    connections: AtomicUsize,
    tls_failures: AtomicUsize,
    deliver_sent: AtomicUsize,
    deliver_resps: AtomicUsize,
    queries: AtomicUsize,
}

/// What became of the last [`SUBMITTED_LOG_CAPACITY`] messages, for query_sm.
#[derive(Default)]
struct Outcomes {
    by_id: std::collections::HashMap<u64, (deliver::Outcome, Instant)>,
    order: VecDeque<u64>,
}

/// Live connections, and deliver_sm waiting for a receiver. One lock, so that "no receiver is
/// bound, park it" and "a receiver bound, take the parked ones" cannot interleave.
#[derive(Default)]
struct Registry {
    sessions: BTreeMap<u64, SessionEntry>,
    parked: VecDeque<DeliverSm>,
}

struct SessionEntry {
    outbound: mpsc::Sender<DeliverSm>,
    /// Cancelled by `drop_links`.
    link: CancellationToken,
    /// Bound as receiver or transceiver.
    receives: bool,
}

impl Shared {
    fn new(local_addr: SocketAddr, config: SimConfig, first_message_id: u64) -> Self {
        Self {
            local_addr,
            config: RwLock::new(Arc::new(config)),
            config_generation: AtomicU64::new(0),
            next_message_id: AtomicU64::new(first_message_id),
            next_connection_id: AtomicU64::new(1),
            throttle: ThrottleWindow::new(),
            counters: Counters::default(),
            submitted: Mutex::new(VecDeque::new()),
            outcomes: Mutex::new(Outcomes::default()),
            registry: Mutex::new(Registry::default()),
            next_receiver: AtomicUsize::new(0),
        }
    }

    /// The current config and its generation.
    fn config(&self) -> (u64, Arc<SimConfig>) {
        let generation = self.config_generation.load(Ordering::Acquire);
        let config = Arc::clone(&self.config.read().unwrap_or_else(PoisonError::into_inner));
        (generation, config)
    }

    fn record_submitted(&self, pdu: SubmittedPdu) {
        self.counters.submitted.fetch_add(1, Ordering::Relaxed);
        let mut log = lock(&self.submitted);
        if log.len() == SUBMITTED_LOG_CAPACITY {
            log.pop_front();
        }
        log.push_back(pdu);
    }

    /// Remembers that message `id` reaches `outcome` at `final_at`, for query_sm.
    fn record_outcome(&self, id: u64, outcome: deliver::Outcome, final_at: Instant) {
        let mut outcomes = lock(&self.outcomes);
        if outcomes.order.len() == SUBMITTED_LOG_CAPACITY
            && let Some(oldest) = outcomes.order.pop_front()
        {
            outcomes.by_id.remove(&oldest);
        }
        outcomes.order.push_back(id);
        outcomes.by_id.insert(id, (outcome, final_at));
    }

    /// The state of message `id` now: its outcome once final, ENROUTE before; None if unknown.
    fn message_state(&self, id: u64) -> Option<rusmpp::values::MessageState> {
        let outcomes = lock(&self.outcomes);
        let (outcome, final_at) = outcomes.by_id.get(&id)?;
        Some(if Instant::now() >= *final_at {
            outcome.message_state()
        } else {
            rusmpp::values::MessageState::Enroute
        })
    }

    /// A receiving session's outbound queue, round robin.
    fn pick_receiver(&self) -> Option<mpsc::Sender<DeliverSm>> {
        self.pick_receiver_locked(&lock(&self.registry))
    }

    fn register(&self, id: u64, outbound: mpsc::Sender<DeliverSm>, link: CancellationToken) {
        let entry = SessionEntry {
            outbound,
            link,
            receives: false,
        };
        lock(&self.registry).sessions.insert(id, entry);
    }

    /// Marks a session bound as receiver/transceiver and hands it every parked deliver_sm.
    fn start_receiving(&self, id: u64) -> VecDeque<DeliverSm> {
        let mut registry = lock(&self.registry);
        if let Some(session) = registry.sessions.get_mut(&id) {
            session.receives = true;
        }
        std::mem::take(&mut registry.parked)
    }

    /// Forgets a session: receipts routed from now on go elsewhere.
    fn unregister(&self, id: u64) {
        lock(&self.registry).sessions.remove(&id);
    }

    /// Keeps deliver_sm that a closing session could not write, for the next receiver.
    fn park_all(&self, pdus: impl IntoIterator<Item = DeliverSm>) {
        let mut registry = lock(&self.registry);
        for pdu in pdus {
            park(&mut registry, pdu);
        }
    }

    /// Hands a receipt to `preferred` (the submitting session, if it can receive), else to any
    /// receiving session, else parks it until one binds.
    async fn deliver(&self, preferred: Option<mpsc::Sender<DeliverSm>>, mut pdu: DeliverSm) {
        if let Some(outbound) = preferred {
            match outbound.send(pdu).await {
                Ok(()) => return,
                Err(mpsc::error::SendError(back)) => pdu = back,
            }
        }
        loop {
            let target = {
                let mut registry = lock(&self.registry);
                match self.pick_receiver_locked(&registry) {
                    Some(target) => target,
                    None => {
                        park(&mut registry, pdu);
                        return;
                    }
                }
            };
            match target.send(pdu).await {
                Ok(()) => return,
                Err(mpsc::error::SendError(back)) => pdu = back,
            }
        }
    }

    /// Like [`Shared::deliver`] without the preferred session, but never waits: `Err` gives the
    /// PDU back when the chosen session's queue is full.
    fn try_deliver(&self, pdu: DeliverSm) -> Result<(), Box<DeliverSm>> {
        let mut registry = lock(&self.registry);
        match self.pick_receiver_locked(&registry) {
            Some(target) => match target.try_send(pdu) {
                Ok(()) => Ok(()),
                Err(mpsc::error::TrySendError::Full(back)) => Err(Box::new(back)),
                Err(mpsc::error::TrySendError::Closed(back)) => {
                    park(&mut registry, back);
                    Ok(())
                }
            },
            None => {
                park(&mut registry, pdu);
                Ok(())
            }
        }
    }

    fn pick_receiver_locked(&self, registry: &Registry) -> Option<mpsc::Sender<DeliverSm>> {
        let receivers = registry.sessions.values().filter(|s| s.receives).count();
        if receivers == 0 {
            return None;
        }
        let n = self.next_receiver.fetch_add(1, Ordering::Relaxed) % receivers;
        registry
            .sessions
            .values()
            .filter(|s| s.receives)
            .nth(n)
            .map(|s| s.outbound.clone())
    }
}

fn park(registry: &mut Registry, pdu: DeliverSm) {
    if registry.parked.len() == PARKED_CAPACITY {
        registry.parked.pop_front();
        tracing::warn!("simulated carrier: parked deliver_sm queue full, dropping the oldest");
    }
    registry.parked.push_back(pdu);
}

/// Fixed one-second windows counted from the simulator's start, shared by all sessions. Packed in
/// one atomic (window number << 32 | count) so the submit path takes no lock.
struct ThrottleWindow {
    started: Instant,
    state: AtomicU64,
}

impl ThrottleWindow {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            state: AtomicU64::new(0),
        }
    }

    /// Counts one submit_sm; true if it is over `limit` in the current window.
    fn over_limit(&self, limit: u32) -> bool {
        let window = self.started.elapsed().as_secs() & 0xFFFF_FFFF;
        let previous = self
            .state
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |state| {
                let count = if state >> 32 == window {
                    (state & 0xFFFF_FFFF).saturating_add(1).min(0xFFFF_FFFF)
                } else {
                    1
                };
                Some(window << 32 | count)
            })
            .unwrap_or(0);
        let count = if previous >> 32 == window {
            (previous & 0xFFFF_FFFF) + 1
        } else {
            1
        };
        count > u64::from(limit)
    }
}

/// Locks a mutex, ignoring poisoning: every critical section here leaves the data consistent.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
