//! What a reload (SIGHUP) changes while the gateway runs: the accounts (API keys, webhooks,
//! senders, keywords, policy rights), the policy settings, the routes, and each carrier's rate,
//! window and failover triggers (its binds stay up). Adding or removing a carrier, its address,
//! credentials or other settings, the listeners, the store and the pseudonym key need a
//! restart; a reload says so instead of half-applying them.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tracing::{info, warn};

use crate::api::auth::Accounts;
use crate::config::{CarrierConfig, Config, PolicyConfig};
use crate::router::{RouteTable, Router};
use crate::smpp::Limits;
use crate::store::{AccountPolicy, InboundOwner};

/// The live, replaceable part of the configuration.
#[derive(Debug)]
pub struct Reloadable {
    pub accounts: Accounts,
    /// Who owns an inbound SMS, by the number it was sent to (digits).
    pub inbound: HashMap<String, InboundOwner>,
    /// Webhook secret per account.
    pub webhook_secrets: HashMap<String, String>,
    /// Most events per webhook request, per account (`webhook_batch`).
    pub webhook_batches: HashMap<String, usize>,
    /// The operator's `webhook_url` per account: the only URLs `webhooks.allow_internal` opens.
    pub webhook_urls: HashMap<String, String>,
    pub policy: PolicyConfig,
}

pub type Live = Arc<ArcSwap<Reloadable>>;

impl Reloadable {
    pub fn from_config(config: &Config) -> Reloadable {
        let mut inbound = HashMap::new();
        for account in &config.accounts {
            let owner = InboundOwner {
                account: account.name.clone(),
                webhook_url: account.webhook_url.clone(),
                keywords: Arc::new(account.keywords.clone()),
                policy: AccountPolicy {
                    service_messages: account.service_messages,
                    follow_number_changes: account.follow_number_changes,
                },
            };
            for sender in &account.senders {
                inbound.insert(sender.trim_start_matches('+').to_owned(), owner.clone());
            }
        }
        Reloadable {
            accounts: Accounts::from_config(&config.accounts),
            inbound,
            webhook_secrets: config
                .accounts
                .iter()
                .filter_map(|a| Some((a.name.clone(), a.webhook_secret.clone()?.0)))
                .collect(),
            webhook_batches: config
                .accounts
                .iter()
                .map(|a| (a.name.clone(), a.webhook_batch))
                .collect(),
            webhook_urls: config
                .accounts
                .iter()
                .filter_map(|a| Some((a.name.clone(), a.webhook_url.clone()?)))
                .collect(),
            policy: config.policy.clone(),
        }
    }
}

pub fn live(config: &Config) -> Live {
    Arc::new(ArcSwap::from_pointee(Reloadable::from_config(config)))
}

/// Applies a new configuration to `live` and the carriers, and logs what it could not apply.
pub fn apply(live: &Live, router: &Router, running: &Config, new: &Config) {
    live.store(Arc::new(Reloadable::from_config(new)));
    let carriers_need_restart = apply_carriers(router, running, new);
    let needs_restart: Vec<&str> = [
        (
            "http",
            format!("{:?}", running.http) != format!("{:?}", new.http),
        ),
        (
            "admin",
            // Debug hides the token: compared apart.
            format!("{:?}", running.admin) != format!("{:?}", new.admin)
                || running.admin.token != new.admin.token,
        ),
        (
            "metrics",
            format!("{:?}", running.metrics) != format!("{:?}", new.metrics)
                || running.metrics.token != new.metrics.token,
        ),
        (
            "store",
            format!("{:?}", running.store) != format!("{:?}", new.store),
        ),
        ("carriers", carriers_need_restart),
        (
            "messages",
            format!("{:?}", running.messages) != format!("{:?}", new.messages),
        ),
        (
            "webhooks",
            format!("{:?}", running.webhooks) != format!("{:?}", new.webhooks),
        ),
        (
            "retention",
            format!("{:?}", running.retention) != format!("{:?}", new.retention),
        ),
        (
            "logging",
            format!("{:?}", running.logging) != format!("{:?}", new.logging),
        ),
        (
            "policy.suspect_after/suspect_codes",
            running.policy.suspect_after != new.policy.suspect_after
                || running.policy.suspect_codes != new.policy.suspect_codes,
        ),
        (
            "amqp",
            format!("{:?}", running.amqp) != format!("{:?}", new.amqp)
                || running.amqp.url != new.amqp.url,
        ),
        (
            "privacy",
            running.privacy.pseudonym_key.expose() != new.privacy.pseudonym_key.expose(),
        ),
    ]
    .into_iter()
    .filter(|(_, changed)| *changed)
    .map(|(section, _)| section)
    .collect();
    info!(
        accounts = new.accounts.len(),
        routes = new.routes.len(),
        "configuration reloaded: accounts, keys, webhooks, keywords, policy, routes and carriers' rates, windows and failover_on apply now"
    );
    if !needs_restart.is_empty() {
        warn!(
            sections = ?needs_restart,
            "these changed sections need a restart to take effect; the running values stay"
        );
    }
}

/// Puts the new routes and each running carrier's rate and window in force. True when a carrier
/// was added or removed or changed in something else, which needs a restart.
fn apply_carriers(router: &Router, running: &Config, new: &Config) -> bool {
    router.replace_table(RouteTable::from_config(new));
    for carrier in &new.carriers {
        if let Some(running) = router.find(&carrier.name) {
            let limits = Limits::of(carrier);
            if running.limits() != limits {
                info!(carrier = %carrier.name, rate_per_second = limits.rate_per_second, window = limits.window, "carrier limits reloaded");
                running.set_limits(limits);
            }
        }
    }
    let names = |c: &Config| {
        c.carriers
            .iter()
            .map(|c| c.name.clone())
            .collect::<Vec<_>>()
    };
    if names(running) != names(new) {
        warn!(
            running = ?names(running),
            configured = ?names(new),
            "carriers added or removed: they start or stop at the next restart; routes naming a carrier that is not running skip it"
        );
        return true;
    }
    running
        .carriers
        .iter()
        .zip(&new.carriers)
        .any(|(old, new)| restart_part(old) != restart_part(new))
}

/// A carrier's configuration without what a reload applies to its running binds.
fn restart_part(carrier: &CarrierConfig) -> String {
    let mut fixed = carrier.clone();
    fixed.rate_per_second = 0;
    fixed.window = 0;
    fixed.failover_on.clear();
    // Debug hides the password; a changed one needs a restart too (compared, never shown).
    format!("{fixed:?} {}", carrier.password.expose())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn carrier() -> CarrierConfig {
        let text = r#"
            [privacy]
            pseudonym_key = "0123456789abcdef0123"
            [[carriers]]
            name = "telia"
            address = "h:1"
        "#;
        let config = Config::parse(text, std::path::Path::new("t.toml")).expect("valid");
        config.carriers[0].clone()
    }

    #[test]
    fn rates_windows_and_failover_reload_and_the_rest_needs_a_restart() {
        let running = carrier();
        let mut live = running.clone();
        live.rate_per_second = 7;
        live.window = 3;
        live.failover_on = vec!["throttled".into()];
        assert_eq!(restart_part(&running), restart_part(&live));
        for change in [
            |c: &mut CarrierConfig| c.address = Some("h:2".into()),
            |c: &mut CarrierConfig| c.password = crate::config::Secret("other".into()),
            |c: &mut CarrierConfig| c.binds = 2,
            |c: &mut CarrierConfig| c.validity_period = crate::config::ValidityPeriod::Relative,
        ] {
            let mut changed = running.clone();
            change(&mut changed);
            assert_ne!(restart_part(&running), restart_part(&changed));
        }
    }
}
