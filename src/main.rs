//! The `smsgw` command: parses the command line, loads the configuration, starts logging and
//! hands over to the library.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use smsgw::config::{Config, LogFormat, LoggingConfig};

/// mimalloc instead of the system allocator: the gateway allocates many small, short-lived
/// buffers on several threads, where glibc's malloc spent a tenth of the send path's CPU.
/// Configured, with the glibc malloc that SQLite keeps, by `smsgw::allocator::configure`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "smsgw",
    version,
    about = "An SMS gateway: HTTP JSON API in, SMPP out"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Run {
        #[arg(long, env = "SMSGW_CONFIG", default_value = "config/smsgw.toml")]
        config: PathBuf,
    },
    /// Check a configuration file and report every problem in it.
    CheckConfig {
        #[arg(default_value = "config/smsgw.toml")]
        path: PathBuf,
    },
    /// Run a simulated SMSC (an SMPP server) for tests and trials.
    Sim {
        #[arg(long, default_value = "127.0.0.1:2775")]
        listen: SocketAddr,
        /// A TOML file of simulator settings (the keys of `[carriers.simulator]`).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Serve SMPP over TLS with this PEM certificate chain (needs --tls-key).
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The PEM private key of --tls-cert.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
    },
    /// Make a new API key and the hash to put in an account's `api_keys`.
    ApiKey,
    /// Remove what the retention periods say is too old (the daemon also does it hourly).
    Purge {
        #[arg(long, env = "SMSGW_CONFIG", default_value = "config/smsgw.toml")]
        config: PathBuf,
        /// Only show what would be removed.
        #[arg(long)]
        dry_run: bool,
    },
    /// Show the running gateway: binds, windows, rates, queue depth (admin API).
    Status {
        #[arg(long, env = "SMSGW_CONFIG", default_value = "config/smsgw.toml")]
        config: PathBuf,
    },
    /// The running gateway's queue across accounts (admin API).
    Queue {
        #[arg(long, env = "SMSGW_CONFIG", default_value = "config/smsgw.toml")]
        config: PathBuf,
        #[command(subcommand)]
        action: QueueAction,
    },
    /// Pause or resume a carrier of the running gateway (admin API).
    Carriers {
        #[arg(long, env = "SMSGW_CONFIG", default_value = "config/smsgw.toml")]
        config: PathBuf,
        #[command(subcommand)]
        action: CarrierAction,
    },
    /// Show which routing rule takes a message and the carriers it would try, in order (with
    /// their state when the gateway runs).
    Route {
        #[arg(long, env = "SMSGW_CONFIG", default_value = "config/smsgw.toml")]
        config: PathBuf,
        /// The destination, in international format.
        to: String,
        #[arg(long)]
        sender: Option<String>,
        #[arg(long)]
        account: Option<String>,
        /// `transactional` (default) or `marketing`.
        #[arg(long, default_value = "transactional")]
        category: String,
    },
    /// Receipts of the running gateway that matched no message (admin API).
    Receipts {
        #[arg(long, env = "SMSGW_CONFIG", default_value = "config/smsgw.toml")]
        config: PathBuf,
        #[command(subcommand)]
        action: ReceiptsAction,
    },
    /// Export or erase what an account holds about a phone number (GDPR).
    Subject {
        #[arg(long, env = "SMSGW_CONFIG", default_value = "config/smsgw.toml")]
        config: PathBuf,
        #[command(subcommand)]
        action: SubjectAction,
    },
    /// Manage an account's opt-out list.
    OptOut {
        #[arg(long, env = "SMSGW_CONFIG", default_value = "config/smsgw.toml")]
        config: PathBuf,
        #[command(subcommand)]
        action: OptOutAction,
    },
    /// Report and inspect number changes (deactivated or reassigned numbers).
    NumberChange {
        #[arg(long, env = "SMSGW_CONFIG", default_value = "config/smsgw.toml")]
        config: PathBuf,
        #[command(subcommand)]
        action: NumberChangeAction,
    },
}

#[derive(Subcommand)]
enum QueueAction {
    /// Messages in one status (default queued), oldest due first; numbers as pseudonyms.
    List {
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        limit: Option<u32>,
    },
    /// Send a failed, expired, unknown or undelivered message again.
    Retry { id: String },
    /// Cancel a waiting message.
    Cancel { id: String },
}

#[derive(Subcommand)]
enum ReceiptsAction {
    /// The last receipts of each carrier that matched no message, newest first (handsets as
    /// pseudonyms).
    Unmatched {
        #[arg(long)]
        carrier: Option<String>,
    },
}

#[derive(Subcommand)]
enum CarrierAction {
    /// Stop giving the carrier new messages; its binds stay up.
    Pause {
        name: String,
    },
    Resume {
        name: String,
    },
}

#[derive(Subcommand)]
enum SubjectAction {
    /// Print everything the account holds about the number, as JSON.
    Export {
        #[arg(long)]
        account: String,
        number: String,
    },
    /// Erase it; an opt-out stays as a pseudonymised suppression entry.
    Erase {
        #[arg(long)]
        account: String,
        number: String,
    },
}

#[derive(Subcommand)]
enum OptOutAction {
    /// Opt a number out (of one sender with --sender, else of all the account's senders).
    Add {
        #[arg(long)]
        account: String,
        number: String,
        #[arg(long)]
        sender: Option<String>,
    },
    /// Remove an opt-out (one sender with --sender, else every entry of the number).
    Remove {
        #[arg(long)]
        account: String,
        number: String,
        #[arg(long)]
        sender: Option<String>,
    },
    /// List the account's opt-outs.
    List {
        #[arg(long)]
        account: String,
    },
    /// Import `number[,sender]` CSV lines or `{"number": ..}` JSON lines.
    Import {
        #[arg(long)]
        account: String,
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum NumberChangeAction {
    /// Report that a number was deactivated, or changed to another one.
    Add {
        number: String,
        /// `deactivated` or `changed`.
        #[arg(long)]
        kind: String,
        #[arg(long)]
        new_number: Option<String>,
        /// RFC 3339; now when absent; at most `policy.max_backdate` ago.
        #[arg(long)]
        effective_at: Option<String>,
        /// Only for this account; every account when absent.
        #[arg(long)]
        account: Option<String>,
    },
    /// Import disconnected numbers: `number,date` lines (a Reassigned Numbers Database answer).
    Import { file: PathBuf },
    /// Show the changes and carrier feedback recorded for a number.
    Show {
        number: String,
        #[arg(long)]
        account: String,
    },
}

fn main() -> ExitCode {
    smsgw::allocator::configure();
    // One crypto provider for every TLS user (SMPP, webhooks), chosen here and not by whichever
    // dependency asks first (CRATES.md §1). Fails only if one is installed already.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config } => run(&config),
        Command::CheckConfig { path } => check_config(&path),
        Command::Sim {
            listen,
            config,
            tls_cert,
            tls_key,
        } => {
            let tls = tls_cert.zip(tls_key);
            sim(listen, config.as_deref(), tls)
        }
        Command::Purge { config, dry_run } => {
            admin(&config, |admin| async move { admin.purge(dry_run).await })
        }
        Command::Status { config } => daemon(&config, false, "/admin/status".into()),
        Command::Queue { config, action } => match action {
            QueueAction::List { status, limit } => {
                let mut query = vec![];
                if let Some(status) = status {
                    query.push(format!("status={status}"));
                }
                if let Some(limit) = limit {
                    query.push(format!("limit={limit}"));
                }
                daemon(&config, false, format!("/admin/queue?{}", query.join("&")))
            }
            QueueAction::Retry { id } => daemon(&config, true, format!("/admin/queue/{id}/retry")),
            QueueAction::Cancel { id } => {
                daemon(&config, true, format!("/admin/queue/{id}/cancel"))
            }
        },
        Command::Carriers { config, action } => match action {
            CarrierAction::Pause { name } => {
                daemon(&config, true, format!("/admin/carriers/{name}/pause"))
            }
            CarrierAction::Resume { name } => {
                daemon(&config, true, format!("/admin/carriers/{name}/resume"))
            }
        },
        Command::Route {
            config,
            to,
            sender,
            account,
            category,
        } => route(&config, &to, sender, account, &category),
        Command::Receipts { config, action } => match action {
            ReceiptsAction::Unmatched { carrier } => {
                let query = carrier.map(|c| format!("?carrier={c}")).unwrap_or_default();
                daemon(&config, false, format!("/admin/receipts/unmatched{query}"))
            }
        },
        Command::Subject { config, action } => admin(&config, |admin| async move {
            match action {
                SubjectAction::Export { account, number } => {
                    admin.subject_export(&account, &number).await
                }
                SubjectAction::Erase { account, number } => {
                    admin.subject_erase(&account, &number).await
                }
            }
        }),
        Command::OptOut { config, action } => admin(&config, |admin| async move {
            match action {
                OptOutAction::Add {
                    account,
                    number,
                    sender,
                } => admin.opt_out_add(&account, &number, sender).await,
                OptOutAction::Remove {
                    account,
                    number,
                    sender,
                } => admin.opt_out_remove(&account, &number, sender).await,
                OptOutAction::List { account } => admin.opt_out_list(&account).await,
                OptOutAction::Import { account, file } => {
                    admin.opt_out_import(&account, &file).await
                }
            }
        }),
        Command::NumberChange { config, action } => admin(&config, |admin| async move {
            match action {
                NumberChangeAction::Add {
                    number,
                    kind,
                    new_number,
                    effective_at,
                    account,
                } => {
                    let request = smsgw::api::policy::NumberChangeRequest {
                        number,
                        kind,
                        new_number,
                        effective_at,
                    };
                    admin.number_change_add(request, account).await
                }
                NumberChangeAction::Import { file } => admin.number_change_import(&file).await,
                NumberChangeAction::Show { number, account } => {
                    admin.number_change_show(&number, &account).await
                }
            }
        }),
        Command::ApiKey => {
            let key = smsgw::api::auth::new_key();
            println!("key:  {key}");
            println!("hash: {}", smsgw::api::auth::hash_key(&key));
            println!("Give the key to the application; put the hash in the account's api_keys.");
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("smsgw: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    init_logging(&config.logging);
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        // Bound before anything starts, so that a port in use or a live admin socket stops
        // start-up with the key to change.
        let listeners = smsgw::Listeners::bind(&config).await?;
        let shutdown = CancellationToken::new();
        tokio::spawn(stop_on_signal(shutdown.clone()));
        let (reloads, reloaded) = tokio::sync::mpsc::channel(1);
        tokio::spawn(reload_on_hangup(path.to_owned(), reloads));
        smsgw::run_with_reloads(config, listeners, shutdown, reloaded).await?;
        Ok(())
    })
}

/// The admin token given in the environment, sent instead of `admin.token`.
fn admin_token() -> Option<smsgw::config::Secret> {
    std::env::var("SMSGW_ADMIN_TOKEN")
        .ok()
        .filter(|token| !token.is_empty())
        .map(smsgw::config::Secret)
}

/// Asks the running daemon's admin API and prints its answer.
fn daemon(path: &Path, post: bool, route: String) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let answer = runtime.block_on(smsgw::admin::call_daemon(
        &config,
        admin_token(),
        post,
        &route,
    ))?;
    print!("{answer}");
    Ok(())
}

/// Prints the routing decision for a message.
fn route(
    path: &Path,
    to: &str,
    sender: Option<String>,
    account: Option<String>,
    category: &str,
) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let category = category.parse().map_err(|()| {
        anyhow::anyhow!("--category: `{category}` is neither transactional nor marketing")
    })?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let answer = runtime.block_on(smsgw::admin::route(
        &config,
        admin_token(),
        to,
        sender.as_deref(),
        account.as_deref(),
        category,
    ))?;
    print!("{answer}");
    Ok(())
}

/// Runs one admin command against the store of a configuration and prints its answer.
fn admin<F, Fut>(path: &Path, command: F) -> anyhow::Result<()>
where
    F: FnOnce(Arc<smsgw::admin::Admin>) -> Fut,
    Fut: std::future::Future<Output = Result<String, smsgw::admin::AdminError>>,
{
    let config = Config::load(path)?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        let admin = Arc::new(smsgw::admin::Admin::open(config).await?);
        let result = command(admin.clone()).await;
        admin.close().await;
        print!("{}", result?);
        Ok(())
    })
}

fn check_config(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    println!(
        "{}: valid ({} accounts, {} carriers, {} routes)",
        path.display(),
        config.accounts.len(),
        config.carriers.len(),
        config.routes.len()
    );
    Ok(())
}

fn sim(
    listen: SocketAddr,
    path: Option<&Path>,
    tls: Option<(PathBuf, PathBuf)>,
) -> anyhow::Result<()> {
    let config: smsgw::sim::SimConfig = match path {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            // The simulator's file holds a bind password too: no source text in the error.
            toml::from_str(&text).map_err(|e| {
                anyhow::anyhow!(
                    "{}: {}",
                    path.display(),
                    smsgw::config::toml_error(&text, &e)
                )
            })?
        }
        None => Default::default(),
    };
    let problems = config.validate();
    anyhow::ensure!(
        problems.is_empty(),
        "invalid simulator settings: {}",
        problems.join("; ")
    );
    let acceptor = match &tls {
        Some((cert, key)) => Some(smsgw::sim::tls_acceptor(cert, key)?),
        None => None,
    };
    init_logging(&LoggingConfig::default());
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        let shutdown = CancellationToken::new();
        let handle = match acceptor {
            Some(acceptor) => smsgw::sim::start_tls(listener, config, acceptor, shutdown.clone()),
            None => smsgw::sim::start(listener, config, shutdown.clone()),
        };
        tracing::info!(address = %handle.local_addr(), "simulated SMSC listening");
        stop_on_signal(shutdown).await;
        Ok(())
    })
}

/// On SIGHUP, reads the configuration again; a valid one is applied, an invalid one is
/// refused with its problems and the running configuration stays.
async fn reload_on_hangup(path: PathBuf, reloads: tokio::sync::mpsc::Sender<Config>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hangups) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; reload by restarting");
            return;
        };
        while hangups.recv().await.is_some() {
            match Config::load(&path) {
                Ok(config) => {
                    if reloads.send(config).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "reload refused; the running configuration stays")
                }
            }
        }
    }
    #[cfg(not(unix))]
    let _ = (path, reloads);
}

/// Cancels `shutdown` on SIGTERM or ctrl-c.
async fn stop_on_signal(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("stop requested");
    shutdown.cancel();
}

fn init_logging(config: &LoggingConfig) {
    // rusmpp logs PDUs (bodies and numbers) at debug: keep it at warn whatever the level.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{},rusmpp=warn,sqlx=warn", config.level)));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match config.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
