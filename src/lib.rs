//! smsgw: an SMS gateway daemon.
//!
//! The modules follow one message through the gateway:
//! HTTP (`api`) → validation → durable queue (`store`) → `dispatch` → `router` → SMPP session
//! (`smpp`) → `receipt` → `webhook`. This file wires them and owns the order of start and
//! shutdown.

pub mod admin;
pub mod allocator;
pub mod api;
pub mod config;
pub mod dispatch;
pub mod encoding;
pub mod intake;
pub mod message;
pub mod metrics;
mod numbering;
pub mod policy;
pub mod receipt;
pub mod reload;
pub mod retention;
pub mod router;
pub mod sim;
pub mod smpp;
pub mod store;
pub mod systemd;
pub mod webhook;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::api::AppState;
use crate::config::Config;
use crate::dispatch::Dispatcher;
use crate::router::{RouteTable, Router};
use crate::smpp::Carrier;
use crate::store::{Store, StoreError, StoreRules};
use crate::webhook::WebhookSender;

/// Sockets the daemon serves on, bound by the caller ([`Listeners::bind`]; tests bind port 0).
pub struct Listeners {
    pub http: TcpListener,
    /// The operators' API; None when disabled.
    pub admin: Option<api::listener::AdminListener>,
    /// Prometheus's `GET /metrics`; None unless `metrics.listen` is set.
    pub metrics: Option<TcpListener>,
}

impl Listeners {
    /// Binds what `config` names: `http.listen`, the admin API (`admin.listen`, else the Unix
    /// socket) and `metrics.listen`.
    pub async fn bind(config: &Config) -> Result<Listeners, api::listener::BindError> {
        use api::listener::{AdminListener, bind_tcp};
        let http = bind_tcp("http.listen", config.http.listen).await?;
        let admin = match config.admin_endpoint() {
            Some(endpoint) => Some(AdminListener::bind(&endpoint).await?),
            None => None,
        };
        let metrics = match config.metrics.listen {
            Some(address) => Some(bind_tcp("metrics.listen", address).await?),
            None => None,
        };
        Ok(Listeners {
            http,
            admin,
            metrics,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot open the store: {0}")]
    Store(#[from] StoreError),
    #[error("cannot start the simulated carrier `{carrier}`: {source}")]
    Simulator {
        carrier: String,
        source: std::io::Error,
    },
    #[error("HTTP server failed: {0}")]
    Http(std::io::Error),
    #[error("carrier `{carrier}`: tls.{source}")]
    CarrierTls {
        carrier: String,
        source: smpp::tls::TlsError,
    },
    #[error("{0}")]
    Tls(#[from] api::serve::TlsError),
    #[error("cannot build the webhook client: {0}")]
    WebhookClient(reqwest::Error),
}

/// Runs the gateway until `shutdown` is cancelled, then stops in order: the HTTP API stops
/// accepting, the dispatcher stops claiming and waits for the messages in flight, each bind
/// drains its window and unbinds, webhooks in flight finish, and the store commits what is
/// queued. Nothing accepted is lost: what did not go out stays queued for the next start.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    run_with_reloads(config, listeners, shutdown, mpsc::channel(1).1).await
}

/// [`run`], taking new configurations (validated by the caller, e.g. on SIGHUP) from
/// `reloads`: accounts and policy change at once; what needs a restart is logged.
pub async fn run_with_reloads(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
    mut reloads: mpsc::Receiver<Config>,
) -> Result<(), RunError> {
    // Before the store opens: a TLS file that went missing since validation stops start-up.
    let tls = config
        .http
        .tls
        .as_ref()
        .map(api::serve::load_tls)
        .transpose()?;
    let rules = StoreRules {
        pseudonyms: message::Pseudonymizer::new(config.privacy.pseudonym_key.expose().as_bytes()),
        suspect_after: config.policy.suspect_after,
        suspect_codes: config.policy.suspect_codes.clone(),
    };
    // While the store opens: the numbering plans load on a thread of their own, not in the
    // first request.
    let numbering = tokio::task::spawn_blocking(numbering::load);
    let store::Opened { store, links } = store::open(&config.store, rules).await?;
    let _ = numbering.await;
    let prometheus = metrics::install();
    let observers = CancellationToken::new();
    tokio::spawn(metrics::upkeep(prometheus.clone(), observers.clone()));
    tokio::spawn(sample_backlog(store.clone(), observers.clone()));
    tokio::spawn(retention::run(
        store.clone(),
        config.retention.clone(),
        observers.clone(),
    ));
    // One instance owns an SQLite file: whatever was being sent when it last stopped is ours.
    // (PostgreSQL takes only claims whose lease ended: other instances may be sending.)
    let released = store.release_claims(true).await?;
    if released > 0 {
        warn!(
            messages = released,
            "messages left in flight by the previous run are queued again"
        );
    }
    // The numbering-plan metadata loads on first use (about 100 ms); not on a request.
    let _ = message::Msisdn::parse("+46701234567");

    let binds = TaskTracker::new();
    let simulators = CancellationToken::new();
    let live = reload::live(&config);
    let egress = webhook::Egress::new(&config.webhooks).map_err(RunError::WebhookClient)?;
    let mut carriers = Vec::new();
    let unmatched = Arc::new(receipt::unmatched::UnmatchedLog::new(
        message::Pseudonymizer::new(config.privacy.pseudonym_key.expose().as_bytes()),
    ));
    for carrier in &config.carriers {
        let address = match (&carrier.simulator, &carrier.address) {
            (Some(sim_config), _) => {
                // The simulated SMSC expects the credentials this carrier binds with.
                let mut sim_config = sim_config.clone();
                sim_config.system_id = carrier.system_id.clone();
                sim_config.password = carrier.password.expose().to_owned();
                start_simulator(&carrier.name, sim_config, simulators.clone()).await?
            }
            (None, Some(address)) => address.clone(),
            (None, None) => continue,
        };
        let deliver = receipt::handler(store.clone(), carrier, live.clone(), unmatched.clone());
        let started = Carrier::start_owned(
            carrier.clone(),
            address,
            deliver,
            &binds,
            shutdown.clone(),
            links.clone(),
        )
        .map_err(|source| RunError::CarrierTls {
            carrier: carrier.name.clone(),
            source,
        })?;
        let started = Arc::new(started);
        start_receipt_upkeep(&store, &started, &unmatched, &shutdown);
        carriers.push(started);
    }
    binds.close();
    let router = Arc::new(Router::new(carriers, RouteTable::from_config(&config)));

    let dispatcher = tokio::spawn(
        Dispatcher {
            store: store.clone(),
            router: router.clone(),
            config: config.messages.clone(),
            lease: config.store.lease,
        }
        .run(shutdown.clone()),
    );
    let webhooks = tokio::spawn(
        WebhookSender {
            store: store.clone(),
            live: live.clone(),
            egress,
            config: config.webhooks.clone(),
        }
        .run(shutdown.clone()),
    );

    let state = AppState {
        store: store.clone(),
        live: live.clone(),
        carriers: router,
        http: Arc::new(config.http.clone()),
        messages: Arc::new(config.messages.clone()),
    };
    let intakes = intake::start(&config.amqp, &state, &shutdown);
    let running = config.clone();
    let routed = state.carriers.clone();
    tokio::spawn(async move {
        while let Some(new) = reloads.recv().await {
            reload::apply(&live, &routed, &running, &new);
        }
    });
    // The operators' listeners, with the API's connection limits (no TLS: loopback or a
    // socket; a remote operator goes through a proxy or SSH).
    let mut operators = Vec::new();
    if let Some(admin) = listeners.admin {
        info!(address = %admin.describe(), "admin API listening");
        let state = api::admin::AdminState {
            store: store.clone(),
            carriers: state.carriers.clone(),
            messages: state.messages.clone(),
            pseudonyms: message::Pseudonymizer::new(
                config.privacy.pseudonym_key.expose().as_bytes(),
            ),
            unmatched: unmatched.clone(),
            prometheus: prometheus.clone(),
        };
        let token = config.admin.token.as_ref();
        let limits = config.http.clone();
        let stop = shutdown.clone();
        operators.push(match admin {
            api::listener::AdminListener::Tcp(listener) => {
                let port = listener.local_addr().map_err(RunError::Http)?.port();
                let guard = api::guard::Guard::tcp(port, token, "admin.token");
                let app = api::admin::router(state, &guard, limits.max_body_bytes);
                tokio::spawn(async move {
                    api::serve::serve("admin", listener, app, &limits, None, stop).await
                })
            }
            api::listener::AdminListener::Socket(socket) => {
                let guard = api::guard::Guard::socket(token, "admin.token");
                let app = api::admin::router(state, &guard, limits.max_body_bytes);
                tokio::spawn(async move {
                    api::serve::serve("admin", socket, app, &limits, None, stop).await
                })
            }
        });
    }
    if let Some(listener) = listeners.metrics {
        let address = listener.local_addr().map_err(RunError::Http)?;
        info!(%address, "metrics listening");
        let guard = api::guard::Guard::tcp(
            address.port(),
            config.metrics.token.as_ref(),
            "metrics.token",
        );
        let app = api::admin::metrics_router(prometheus.clone(), &guard);
        let limits = config.http.clone();
        let stop = shutdown.clone();
        operators.push(tokio::spawn(async move {
            api::serve::serve("metrics", listener, app, &limits, None, stop).await
        }));
    }
    let address = listeners.http.local_addr().map_err(RunError::Http)?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    info!(%address, scheme, "HTTP API listening");
    // systemd (no-ops unless started by it): the watchdog is fed while the store answers and
    // the dispatcher and webhook sender run; READY once the store is open and the API serves.
    let tasks = vec![
        ("dispatcher", dispatcher.abort_handle()),
        ("webhooks", webhooks.abort_handle()),
    ];
    systemd::supervise(
        store.clone(),
        state.carriers.clone(),
        tasks,
        shutdown.clone(),
    );
    systemd::ready(&format!("HTTP API on {address}"));
    let http = state.http.clone();
    api::serve::serve(
        "api",
        listeners.http,
        api::router(state),
        &http,
        tls,
        shutdown.clone(),
    )
    .await;
    // They stop on the same signal; the admin socket's file goes with its listener.
    for listener in operators {
        let _ = listener.await;
    }

    systemd::stopping();
    info!("shutting down: draining binds");
    for intake in intakes {
        let _ = intake.await;
    }
    let _ = dispatcher.await;
    binds.wait().await;
    let _ = webhooks.await;
    simulators.cancel();
    observers.cancel();
    store.close().await;
    info!("stopped");
    Ok(())
}

/// A carrier's receipt chores: giving up receipts that match nothing, and query_sm for
/// messages whose receipt never came (when `query_after` is set).
fn start_receipt_upkeep(
    store: &Arc<dyn Store>,
    carrier: &Arc<Carrier>,
    unmatched: &Arc<receipt::unmatched::UnmatchedLog>,
    shutdown: &CancellationToken,
) {
    let config = carrier.config();
    tokio::spawn(receipt::unmatched::sweep(
        store.clone(),
        carrier.name.clone(),
        config.unmatched_after,
        unmatched.clone(),
        shutdown.clone(),
    ));
    if let Some(after) = config.query_after {
        tokio::spawn(receipt::query::run(
            store.clone(),
            carrier.clone(),
            after,
            shutdown.clone(),
        ));
    }
}

/// Publishes the queue depth and the webhook backlog every few seconds.
async fn sample_backlog(store: Arc<dyn Store>, stop: CancellationToken) {
    loop {
        if let Ok((queued, earliest_due, webhooks)) = store.backlog().await {
            metrics::backlog(
                queued,
                metrics::overdue_ms(earliest_due, message::now_ms()),
                webhooks,
            );
        }
        tokio::select! {
            () = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
            () = stop.cancelled() => return,
        }
    }
}

async fn start_simulator(
    carrier: &str,
    config: sim::SimConfig,
    shutdown: CancellationToken,
) -> Result<String, RunError> {
    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .map_err(|source| RunError::Simulator {
            carrier: carrier.to_owned(),
            source,
        })?;
    let handle = sim::start(listener, config, shutdown);
    let address = handle.local_addr();
    warn!(
        carrier,
        %address,
        "SIMULATED carrier: messages are not delivered to real phones; configure `address` for a real SMSC"
    );
    Ok(address.to_string())
}
