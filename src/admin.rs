//! Operator commands that act on the store directly (`smsgw opt-out ...`,
//! `smsgw number-change ...`). SQLite takes a second writer beside a running daemon (WAL and a
//! busy timeout), so these work whether the gateway runs or not. Those that ask the running
//! daemon (`smsgw status`, ...) go through [`client::AdminClient`].

pub mod client;

use std::path::Path;
use std::sync::Arc;

use crate::api::auth::Accounts;
use crate::api::policy::{NumberChangeRequest, number_change_from, parse_import};
use crate::config::{Config, Secret};
use crate::message::{Category, Msisdn, Pseudonymizer, rfc3339};
use crate::policy::number_change::ChangeKind;
use crate::router::{CarrierState, Facts, NoRoute, Plan, RouteTable};
use crate::store::{AccountPolicy, NumberChange, OptOutSource, Store, StoreError, StoreRules};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(
        "the admin API at {url} did not answer ({source}); is the gateway running, with [admin] enabled?"
    )]
    Unreachable { url: String, source: reqwest::Error },
    #[error(
        "no permission to open the admin API at {0}: run the command as the gateway's user \
         (sudo -u smsgw smsgw ...) or as root"
    )]
    NoPermission(String),
    #[error("admin.enabled is false: the gateway serves no admin API to ask")]
    Disabled,
    #[error("cannot make an HTTP client: {0}")]
    Client(reqwest::Error),
    #[error("the admin API answered {status}: {body}")]
    Refused { status: u16, body: String },
    #[error("no account named `{0}` in the configuration")]
    UnknownAccount(String),
    #[error("{0}")]
    Invalid(String),
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Calls the running daemon's admin API (a GET, or a POST without a body) and returns its
/// answer, pretty. `token` is sent instead of `admin.token` when given.
pub async fn call_daemon(
    config: &Config,
    token: Option<Secret>,
    post: bool,
    path: &str,
) -> Result<String, AdminError> {
    let client = client::AdminClient::new(config, token)?;
    let answer = if post {
        client.post(path).await?
    } else {
        client.get(path).await?
    };
    Ok(format!("{answer:#}\n"))
}

/// What routing decides for a message (`smsgw route`): asked of the running gateway, which
/// knows its carriers' state and the routes in force; from the configuration alone when it does
/// not answer.
pub async fn route(
    config: &Config,
    token: Option<Secret>,
    to: &str,
    sender: Option<&str>,
    account: Option<&str>,
    category: Category,
) -> Result<String, AdminError> {
    let recipient = e164(to)?;
    let mut url = reqwest::Url::parse("http://gateway/admin/route")
        .map_err(|e| AdminError::Invalid(e.to_string()))?;
    url.query_pairs_mut()
        .append_pair("to", &recipient)
        .append_pair("sender", sender.unwrap_or(""))
        .append_pair("account", account.unwrap_or(""))
        .append_pair("category", category.as_str());
    let path = format!("{}?{}", url.path(), url.query().unwrap_or(""));
    let facts = Facts {
        recipient: &recipient,
        sender: sender.unwrap_or(""),
        account: account.unwrap_or(""),
        category,
    };
    let heading = format!(
        "{recipient} (sender {}, account {}, category {})\n",
        sender.unwrap_or("-"),
        account.unwrap_or("-"),
        category.as_str()
    );
    let asked = match client::AdminClient::new(config, token) {
        Ok(client) => client
            .get(&path)
            .await
            .map(|answer| (answer, client.endpoint().to_owned())),
        Err(e) => Err(e),
    };
    let (plan, source) = match asked {
        Ok((answer, endpoint)) => {
            let plan: Plan = serde_json::from_value(answer)
                .map_err(|e| AdminError::Invalid(format!("unexpected answer: {e}")))?;
            (plan, format!("the running gateway at {endpoint}"))
        }
        Err(AdminError::Refused { status: 404, .. }) => {
            return Err(AdminError::Invalid(format!("{heading}{NoRoute}")));
        }
        Err(unanswered @ (AdminError::Unreachable { .. } | AdminError::Disabled)) => {
            let table = RouteTable::from_config(config);
            let plan = table
                .preview(&facts, |_| CarrierState::Unknown)
                .map_err(|e| AdminError::Invalid(format!("{heading}{e}")))?;
            let why = match unanswered {
                AdminError::Unreachable { url, .. } => format!("no gateway answered at {url}"),
                _ => "admin.enabled is false".to_owned(),
            };
            (plan, format!("the configuration only ({why})"))
        }
        Err(e) => return Err(e),
    };
    Ok(format!("{heading}{}decided by {source}\n", plan.render()))
}

/// The store and accounts of a configuration, for one command.
pub struct Admin {
    store: Arc<dyn Store>,
    accounts: Accounts,
    config: Config,
}

impl Admin {
    pub async fn open(config: Config) -> Result<Admin, AdminError> {
        let rules = StoreRules {
            pseudonyms: Pseudonymizer::new(config.privacy.pseudonym_key.expose().as_bytes()),
            suspect_after: config.policy.suspect_after,
            suspect_codes: config.policy.suspect_codes.clone(),
        };
        let store = crate::store::open(&config.store, rules).await?.store;
        Ok(Admin {
            store,
            accounts: Accounts::from_config(&config.accounts),
            config,
        })
    }

    pub async fn close(&self) {
        self.store.close().await;
    }

    fn policy(&self, account: &str) -> Result<AccountPolicy, AdminError> {
        let account = self
            .accounts
            .find(account)
            .ok_or_else(|| AdminError::UnknownAccount(account.to_owned()))?;
        Ok(AccountPolicy {
            service_messages: account.service_messages,
            follow_number_changes: account.follow_number_changes,
        })
    }

    /// Runs the retention purge now; `dry_run` shows what would go without removing it.
    pub async fn purge(&self, dry_run: bool) -> Result<String, AdminError> {
        let cutoffs = crate::retention::cutoffs(&self.config.retention, crate::message::now_ms());
        let purge = self
            .store
            .purge(cutoffs, crate::retention::ROWS_PER_RUN, dry_run)
            .await?;
        let verb = if dry_run { "would remove" } else { "removed" };
        Ok(format!(
            "{verb}: {} message bodies, {} inbound bodies, {} webhook payloads, {} events, \
             {} canceled messages, {} idempotency keys\n",
            purge.message_bodies,
            purge.inbound_bodies,
            purge.webhooks,
            purge.events,
            purge.canceled_messages,
            purge.idempotency_keys
        ))
    }

    /// Everything the account holds about a number, as the API's export shows it.
    pub async fn subject_export(&self, account: &str, number: &str) -> Result<String, AdminError> {
        self.policy(account)?;
        let number = e164(number)?;
        let export = self.store.export_subject(account, &number).await?;
        let json = crate::api::policy::subject_json(&number, &export);
        Ok(format!("{json:#}\n"))
    }

    /// Erases what the account holds about a number; an opt-out stays, pseudonymised.
    pub async fn subject_erase(&self, account: &str, number: &str) -> Result<String, AdminError> {
        self.policy(account)?;
        let number = e164(number)?;
        let e = self.store.erase_subject(account, &number).await?;
        Ok(format!(
            "erased {} messages and {} inbound; kept {} opt-outs (pseudonymised) and {} number \
             changes, which protect whoever holds the number now\n",
            e.messages, e.inbound, e.suppressions_kept, e.number_changes_kept
        ))
    }

    pub async fn opt_out_add(
        &self,
        account: &str,
        number: &str,
        sender: Option<String>,
    ) -> Result<String, AdminError> {
        let policy = self.policy(account)?;
        let number = e164(number)?;
        let by = cli();
        let added = self
            .store
            .add_opt_outs(account, vec![(number.clone(), sender)], by, policy)
            .await?;
        Ok(if added > 0 {
            format!("{number} opted out")
        } else {
            format!("{number} was opted out already")
        })
    }

    pub async fn opt_out_remove(
        &self,
        account: &str,
        number: &str,
        sender: Option<String>,
    ) -> Result<String, AdminError> {
        self.policy(account)?;
        let number = e164(number)?;
        let removed = self
            .store
            .remove_opt_out(account, &number, sender, cli())
            .await?;
        Ok(format!("{removed} opt-out entries removed for {number}"))
    }

    pub async fn opt_out_list(&self, account: &str) -> Result<String, AdminError> {
        self.policy(account)?;
        let mut out = String::from("number\tsender\tsource\tcreated_at\n");
        let mut cursor = None;
        loop {
            let page = self
                .store
                .list_opt_outs(account, cursor.take(), 1000)
                .await?;
            for o in &page {
                let shown = o
                    .number
                    .clone()
                    .unwrap_or_else(|| format!("(erased {})", &o.number_key[..16]));
                let sender = o.sender.as_deref().unwrap_or("*");
                out.push_str(&format!(
                    "{shown}\t{sender}\t{}\t{}\n",
                    o.source,
                    rfc3339(o.created_at)
                ));
            }
            match page.last() {
                Some(o) if page.len() == 1000 => cursor = Some(o.cursor()),
                _ => break,
            }
        }
        Ok(out)
    }

    pub async fn opt_out_import(&self, account: &str, file: &Path) -> Result<String, AdminError> {
        let policy = self.policy(account)?;
        let text = read(file)?;
        let (entries, errors) = parse_import(&text);
        let by = OptOutSource {
            source: "import",
            actor: Some("cli".into()),
        };
        let added = self
            .store
            .add_opt_outs(account, entries, by, policy)
            .await?;
        let mut out = format!(
            "{added} opt-outs imported, {} lines refused\n",
            errors.len()
        );
        for error in errors {
            out.push_str(&format!("{error}\n"));
        }
        Ok(out)
    }

    /// A change reported by the operator; `account` None applies it to every account.
    pub async fn number_change_add(
        &self,
        request: NumberChangeRequest,
        account: Option<String>,
    ) -> Result<String, AdminError> {
        if let Some(name) = &account {
            self.policy(name)?;
        }
        let change = number_change_from(request, account, "cli", self.config.policy.max_backdate)
            .map_err(|e| AdminError::Invalid(e.message))?;
        let affected = self
            .store
            .add_number_changes(vec![change], self.accounts.following_changes())
            .await?;
        Ok(format!(
            "recorded; {affected} waiting messages refused or redirected"
        ))
    }

    /// Imports a list of permanently disconnected numbers (`number,date` lines, the shape of a
    /// Reassigned Numbers Database answer): global `deactivated` events, not limited in age.
    pub async fn number_change_import(&self, file: &Path) -> Result<String, AdminError> {
        let text = read(file)?;
        let mut changes = Vec::new();
        let mut refused = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || (index == 0 && line.to_ascii_lowercase().starts_with("number")) {
                continue;
            }
            match disconnection(line) {
                Some(change) => changes.push(change),
                None => refused.push(index + 1),
            }
        }
        let count = changes.len();
        let affected = self
            .store
            .add_number_changes(changes, self.accounts.following_changes())
            .await?;
        Ok(format!(
            "{count} disconnections imported; {affected} waiting messages refused or redirected; \
             lines refused: {refused:?}"
        ))
    }

    pub async fn number_change_show(
        &self,
        number: &str,
        account: &str,
    ) -> Result<String, AdminError> {
        let number = e164(number)?;
        let history = self.store.number_history(account, &number).await?;
        let mut out = format!(
            "{number}: suspect {}, unknown-subscriber results {}\n",
            history.suspect, history.failures
        );
        for (change, reported_at) in &history.changes {
            let to = match &change.kind {
                ChangeKind::Changed { new_number } => format!(" → {new_number}"),
                ChangeKind::Deactivated => String::new(),
            };
            out.push_str(&format!(
                "{} {}{to} effective {} (reported {} via {}, {})\n",
                number,
                change.kind.as_str(),
                rfc3339(change.effective_at),
                rfc3339(*reported_at),
                change.source,
                change.account.as_deref().unwrap_or("all accounts"),
            ));
        }
        Ok(out)
    }
}

fn cli() -> OptOutSource {
    OptOutSource {
        source: "cli",
        actor: Some("cli".into()),
    }
}

fn e164(number: &str) -> Result<String, AdminError> {
    Msisdn::parse(number)
        .map(|m| m.as_str().to_owned())
        .map_err(|e| AdminError::Invalid(format!("{number}: {e}")))
}

fn read(file: &Path) -> Result<String, AdminError> {
    std::fs::read_to_string(file).map_err(|source| AdminError::Read {
        path: file.display().to_string(),
        source,
    })
}

/// `+15551234567,2026-01-31` (a date, or an RFC 3339 time) → a global deactivation.
fn disconnection(line: &str) -> Option<NumberChange> {
    let (number, date) = line.split_once(',')?;
    let number = e164(number.trim()).ok()?;
    let date = date.trim();
    let time = if date.len() == 10 {
        format!("{date}T00:00:00Z")
    } else {
        date.to_owned()
    };
    let at =
        time::OffsetDateTime::parse(&time, &time::format_description::well_known::Rfc3339).ok()?;
    Some(NumberChange {
        account: None,
        number,
        kind: ChangeKind::Deactivated,
        effective_at: (at.unix_timestamp_nanos() / 1_000_000) as i64,
        source: "import".into(),
    })
}
