//! Which carrier takes a message. [`RouteTable::plan_at`] is a pure function of the message's
//! facts, the carriers' state and a turn number, so every rule can be tested without a network;
//! [`Router`] adds the live carriers and the table a reload replaces.
//!
//! Rules are tried in configuration order and the first whose conditions all hold wins (like a
//! firewall: put the specific rules first and the default last). A rule sends to one carrier, or
//! shares its messages between a set by weight; the rest of the set and then `failover` take
//! over, in order, when the chosen carrier has no bound link, is paused, or refuses with a status
//! its `failover_on` lists. Without `[[routes]]` one implicit rule takes every message and shares
//! it between every carrier in turn.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::message::Category;
use crate::smpp::Carrier;
use crate::smpp::status::{StatusClass, classify};

/// What routing looks at in a message.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    /// E.164, with its `+`.
    pub recipient: &'a str,
    pub sender: &'a str,
    pub account: &'a str,
    pub category: Category,
}

/// What a carrier can do now, as routing sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CarrierState {
    /// A bind is up and no operator paused it.
    Usable,
    /// No bind is up.
    Down,
    Paused,
    /// Named by the rules but not running (added by a reload: carriers start at start-up).
    NotRunning,
    /// Not known: the plan was made from the configuration alone.
    Unknown,
}

/// A refusal that sends a message on to the next carrier (a carrier's `failover_on`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailoverTrigger {
    Class(StatusClass),
    Code(u32),
}

impl FailoverTrigger {
    /// `temporary`, `throttled`, `permanent`, `session`, or a code such as `0x58`.
    pub fn parse(text: &str) -> Option<FailoverTrigger> {
        let class = match text {
            "temporary" => StatusClass::Temporary,
            "throttled" => StatusClass::Throttled,
            "permanent" => StatusClass::Permanent,
            "session" => StatusClass::Session,
            _ => {
                let hex = text
                    .strip_prefix("0x")
                    .or_else(|| text.strip_prefix("0X"))?;
                return u32::from_str_radix(hex, 16).ok().map(FailoverTrigger::Code);
            }
        };
        Some(FailoverTrigger::Class(class))
    }

    pub fn matches(self, status: u32) -> bool {
        match self {
            FailoverTrigger::Class(class) => classify(status) == class,
            FailoverTrigger::Code(code) => code == status,
        }
    }
}

/// The decision for one message: the rule that matched and the carriers to try, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub rule: String,
    /// What the rule matches, for people: `prefix +4670, account a`.
    pub matches: String,
    pub candidates: Vec<Candidate>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    pub carrier: String,
    /// Its weight in the rule's set; None for a `failover` carrier.
    pub weight: Option<u32>,
    pub state: CarrierState,
}

impl Plan {
    /// The carriers that can take the message now, best first.
    pub fn usable(&self) -> impl Iterator<Item = &str> {
        self.candidates
            .iter()
            .filter(|c| c.state == CarrierState::Usable)
            .map(|c| c.carrier.as_str())
    }

    /// Why no candidate can take the message: `a down, b paused`.
    pub fn unavailable(&self) -> String {
        let states: Vec<String> = self
            .candidates
            .iter()
            .map(|c| format!("{} {}", c.carrier, c.state.describe()))
            .collect();
        format!(
            "no carrier of route {} can take it ({})",
            self.rule,
            states.join(", ")
        )
    }

    /// The plan as `smsgw route` prints it.
    pub fn render(&self) -> String {
        let mut out = format!(
            "rule: {} ({})\ncandidates, in order:\n",
            self.rule, self.matches
        );
        for (i, c) in self.candidates.iter().enumerate() {
            let weight = match c.weight {
                Some(w) => format!("weight {w}"),
                None => "failover".to_owned(),
            };
            out.push_str(&format!(
                "  {}. {:<16} {:<10} {}\n",
                i + 1,
                c.carrier,
                weight,
                c.state.describe()
            ));
        }
        out
    }
}

impl CarrierState {
    pub fn describe(self) -> &'static str {
        match self {
            CarrierState::Usable => "usable",
            CarrierState::Down => "down (no bind up)",
            CarrierState::Paused => "paused",
            CarrierState::NotRunning => "not running (restart to start it)",
            CarrierState::Unknown => "state unknown",
        }
    }
}

/// No rule takes the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no route matches this message (destination, sender, account, category)")]
pub struct NoRoute;

struct Rule {
    name: String,
    prefixes: Vec<String>,
    sender: Option<String>,
    account: Option<String>,
    category: Option<Category>,
    /// The set sharing the rule's messages, with weights (at least 1 each).
    set: Vec<(String, u32)>,
    failover: Vec<String>,
    /// Messages planned so far, which spreads them over the set by weight.
    turn: AtomicU64,
}

impl Rule {
    fn takes(&self, facts: &Facts) -> bool {
        let sender = facts.sender.trim_start_matches('+');
        (self.prefixes.is_empty() || self.prefixes.iter().any(|p| facts.recipient.starts_with(p)))
            && self
                .sender
                .as_deref()
                .is_none_or(|s| s.trim_start_matches('+') == sender)
            && self.account.as_deref().is_none_or(|a| a == facts.account)
            && self.category.is_none_or(|c| c == facts.category)
    }

    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.prefixes.is_empty() {
            parts.push(format!("prefix {}", self.prefixes.join(" or ")));
        }
        if let Some(s) = &self.sender {
            parts.push(format!("sender {s}"));
        }
        if let Some(a) = &self.account {
            parts.push(format!("account {a}"));
        }
        if let Some(c) = self.category {
            parts.push(format!("category {}", c.as_str()));
        }
        if parts.is_empty() {
            "every message".to_owned()
        } else {
            parts.join(", ")
        }
    }
}

/// The routing rules and each carrier's failover triggers, as configured; replaced whole by a
/// reload.
pub struct RouteTable {
    rules: Vec<Rule>,
    failover_on: HashMap<String, Vec<FailoverTrigger>>,
}

impl RouteTable {
    /// The table of a validated configuration.
    pub fn from_config(config: &Config) -> RouteTable {
        let mut rules: Vec<Rule> = config
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| Rule {
                name: r.name.clone().unwrap_or_else(|| format!("routes[{i}]")),
                prefixes: r.prefixes.clone(),
                sender: r.sender.clone(),
                account: r.account.clone(),
                category: r.category,
                set: match &r.carrier {
                    Some(name) => vec![(name.clone(), 1)],
                    None => r
                        .carriers
                        .iter()
                        .map(|c| (c.name.clone(), c.weight.max(1)))
                        .collect(),
                },
                failover: r.failover.clone(),
                turn: AtomicU64::new(0),
            })
            .collect();
        if rules.is_empty() {
            rules.push(Rule {
                // No [[routes]]: every carrier in turn.
                name: "default".to_owned(),
                prefixes: Vec::new(),
                sender: None,
                account: None,
                category: None,
                set: config
                    .carriers
                    .iter()
                    .map(|c| (c.name.clone(), 1))
                    .collect(),
                failover: Vec::new(),
                turn: AtomicU64::new(0),
            });
        }
        let failover_on = config
            .carriers
            .iter()
            .map(|c| {
                let triggers = c
                    .failover_on
                    .iter()
                    .filter_map(|t| FailoverTrigger::parse(t))
                    .collect();
                (c.name.clone(), triggers)
            })
            .collect();
        RouteTable { rules, failover_on }
    }

    /// Whether some rule takes the message (checked when it is submitted).
    pub fn has_route(&self, facts: &Facts) -> bool {
        self.rules.iter().any(|r| r.takes(facts))
    }

    /// The plan for a message, taking the rule's next turn: messages spread over its set.
    pub fn plan(
        &self,
        facts: &Facts,
        state: impl Fn(&str) -> CarrierState,
    ) -> Result<Plan, NoRoute> {
        let rule = self.rules.iter().find(|r| r.takes(facts)).ok_or(NoRoute)?;
        let turn = rule.turn.fetch_add(1, Ordering::Relaxed);
        Ok(plan_for(rule, turn, state))
    }

    /// The plan the next message would get, without taking a turn (`smsgw route`).
    pub fn preview(
        &self,
        facts: &Facts,
        state: impl Fn(&str) -> CarrierState,
    ) -> Result<Plan, NoRoute> {
        let rule = self.rules.iter().find(|r| r.takes(facts)).ok_or(NoRoute)?;
        Ok(plan_for(rule, rule.turn.load(Ordering::Relaxed), state))
    }

    /// The plan at a given turn: the pure core of routing.
    pub fn plan_at(
        &self,
        facts: &Facts,
        turn: u64,
        state: impl Fn(&str) -> CarrierState,
    ) -> Result<Plan, NoRoute> {
        let rule = self.rules.iter().find(|r| r.takes(facts)).ok_or(NoRoute)?;
        Ok(plan_for(rule, turn, state))
    }

    /// Whether `carrier` refusing with `status` sends the message on to the next carrier.
    pub fn fails_over(&self, carrier: &str, status: u32) -> bool {
        self.failover_on
            .get(carrier)
            .is_some_and(|triggers| triggers.iter().any(|t| t.matches(status)))
    }
}

fn plan_for(rule: &Rule, turn: u64, state: impl Fn(&str) -> CarrierState) -> Plan {
    let weights: Vec<u32> = rule.set.iter().map(|(_, w)| *w).collect();
    let chosen = choose(&weights, turn);
    let set_order = chosen
        .into_iter()
        .chain((0..rule.set.len()).filter(|&i| Some(i) != chosen));
    let mut candidates: Vec<Candidate> = set_order
        .map(|i| {
            let (name, weight) = &rule.set[i];
            Candidate {
                carrier: name.clone(),
                weight: Some(*weight),
                state: state(name),
            }
        })
        .collect();
    candidates.extend(rule.failover.iter().map(|name| Candidate {
        carrier: name.clone(),
        weight: None,
        state: state(name),
    }));
    Plan {
        rule: rule.name.clone(),
        matches: rule.describe(),
        candidates,
    }
}

/// Which member of a weighted set takes turn `turn`: over every `sum(weights)` turns each member
/// takes as many as its weight. None for an empty set.
fn choose(weights: &[u32], turn: u64) -> Option<usize> {
    let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
    if total == 0 {
        return None;
    }
    let mut slot = turn % total;
    for (i, &w) in weights.iter().enumerate() {
        if slot < u64::from(w) {
            return Some(i);
        }
        slot -= u64::from(w);
    }
    None
}

/// The running carriers and the routing table in force.
pub struct Router {
    carriers: Vec<Arc<Carrier>>,
    table: ArcSwap<RouteTable>,
}

impl Router {
    pub fn new(carriers: Vec<Arc<Carrier>>, table: RouteTable) -> Router {
        Router {
            carriers,
            table: ArcSwap::from_pointee(table),
        }
    }

    pub fn carriers(&self) -> &[Arc<Carrier>] {
        &self.carriers
    }

    /// Some carrier can take messages now.
    pub fn any_usable(&self) -> bool {
        self.carriers.iter().any(|c| c.is_usable())
    }

    pub fn find(&self, name: &str) -> Option<&Arc<Carrier>> {
        self.carriers.iter().find(|c| c.name == name)
    }

    pub fn table(&self) -> Arc<RouteTable> {
        self.table.load_full()
    }

    /// Puts a reloaded table in force; messages planned from now on use it.
    pub fn replace_table(&self, table: RouteTable) {
        self.table.store(Arc::new(table));
    }

    /// What routing sees of a carrier now.
    pub fn state_of(&self, name: &str) -> CarrierState {
        match self.find(name) {
            None => CarrierState::NotRunning,
            Some(c) if !c.is_bound() => CarrierState::Down,
            Some(c) if !c.is_usable() => CarrierState::Paused,
            Some(_) => CarrierState::Usable,
        }
    }

    /// The plan for a message about to be sent.
    pub fn plan(&self, facts: &Facts) -> Result<Plan, NoRoute> {
        self.table.load().plan(facts, |name| self.state_of(name))
    }

    /// The plan the next such message would get (`smsgw route`), taking no turn.
    pub fn preview(&self, facts: &Facts) -> Result<Plan, NoRoute> {
        self.table.load().preview(facts, |name| self.state_of(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn table(routes: &str) -> RouteTable {
        let text = format!(
            r#"
            [privacy]
            pseudonym_key = "0123456789abcdef0123"
            [[accounts]]
            name = "a"
            api_keys = ["sha256:{zeros}"]
            [[carriers]]
            name = "telia"
            address = "h:1"
            failover_on = ["throttled", "0x45"]
            [[carriers]]
            name = "tele2"
            address = "h:2"
            [[carriers]]
            name = "backup"
            address = "h:3"
            {routes}
            "#,
            zeros = "0".repeat(64)
        );
        let config = Config::parse(&text, Path::new("t.toml")).expect("valid");
        RouteTable::from_config(&config)
    }

    fn facts(recipient: &str) -> Facts<'_> {
        Facts {
            recipient,
            sender: "iP1",
            account: "a",
            category: Category::Transactional,
        }
    }

    fn all_usable(_: &str) -> CarrierState {
        CarrierState::Usable
    }

    fn names(plan: &Plan) -> Vec<&str> {
        plan.candidates.iter().map(|c| c.carrier.as_str()).collect()
    }

    const ROUTES: &str = r#"
        [[routes]]
        name = "sweden-mobile"
        prefixes = ["+4670", "+4673"]
        carrier = "telia"
        failover = ["backup"]
        [[routes]]
        name = "marketing"
        category = "marketing"
        carriers = [{ name = "tele2", weight = 3 }, { name = "telia", weight = 1 }]
        [[routes]]
        name = "default"
        carrier = "backup"
    "#;

    #[test]
    fn the_first_matching_rule_wins() {
        let t = table(ROUTES);
        let plan = t.plan_at(&facts("+46701234567"), 0, all_usable).unwrap();
        assert_eq!(plan.rule, "sweden-mobile");
        assert_eq!(names(&plan), ["telia", "backup"]);
        let plan = t.plan_at(&facts("+4981234567"), 0, all_usable).unwrap();
        assert_eq!(plan.rule, "default");
        let mut marketing = facts("+4981234567");
        marketing.category = Category::Marketing;
        assert_eq!(
            t.plan_at(&marketing, 0, all_usable).unwrap().rule,
            "marketing"
        );
        // The prefix rule comes first and takes Swedish mobiles whatever their category.
        marketing.recipient = "+46731234567";
        assert_eq!(
            t.plan_at(&marketing, 0, all_usable).unwrap().rule,
            "sweden-mobile"
        );
    }

    #[test]
    fn sender_and_account_conditions_must_hold() {
        let t = table(
            r#"
            [[routes]]
            sender = "+46700000001"
            account = "a"
            carrier = "tele2"
            "#,
        );
        let mut f = facts("+46701234567");
        assert_eq!(t.plan_at(&f, 0, all_usable), Err(NoRoute));
        f.sender = "46700000001";
        assert_eq!(names(&t.plan_at(&f, 0, all_usable).unwrap()), ["tele2"]);
        f.account = "b";
        assert!(!t.has_route(&f));
    }

    #[test]
    fn a_weighted_set_shares_turns_by_weight_and_the_rest_follow() {
        let t = table(ROUTES);
        let mut f = facts("+4981234567");
        f.category = Category::Marketing;
        let firsts: Vec<String> = (0..8)
            .map(|turn| {
                t.plan_at(&f, turn, all_usable).unwrap().candidates[0]
                    .carrier
                    .clone()
            })
            .collect();
        assert_eq!(firsts.iter().filter(|c| *c == "tele2").count(), 6);
        assert_eq!(firsts.iter().filter(|c| *c == "telia").count(), 2);
        let plan = t.plan_at(&f, 3, all_usable).unwrap();
        assert_eq!(
            names(&plan),
            ["telia", "tele2"],
            "the other member takes over"
        );
    }

    #[test]
    fn carriers_that_cannot_take_messages_are_skipped_in_order() {
        let t = table(ROUTES);
        let state = |name: &str| match name {
            "telia" => CarrierState::Down,
            _ => CarrierState::Usable,
        };
        let plan = t.plan_at(&facts("+46701234567"), 0, state).unwrap();
        assert_eq!(plan.usable().collect::<Vec<_>>(), ["backup"]);
        let none = |_: &str| CarrierState::Paused;
        let plan = t.plan_at(&facts("+46701234567"), 0, none).unwrap();
        assert_eq!(plan.usable().count(), 0);
        assert!(
            plan.unavailable().contains("telia paused"),
            "{}",
            plan.unavailable()
        );
    }

    #[test]
    fn without_routes_every_carrier_takes_turns() {
        let t = table("");
        let f = facts("+4981234567");
        let firsts: Vec<String> = (0..3)
            .map(|turn| {
                t.plan_at(&f, turn, all_usable).unwrap().candidates[0]
                    .carrier
                    .clone()
            })
            .collect();
        assert_eq!(firsts, ["telia", "tele2", "backup"]);
        assert_eq!(t.plan_at(&f, 1, all_usable).unwrap().candidates.len(), 3);
    }

    #[test]
    fn failover_triggers_are_classes_or_codes() {
        let t = table("");
        assert!(t.fails_over("telia", 0x58), "throttled");
        assert!(t.fails_over("telia", 0x45), "by code");
        assert!(!t.fails_over("telia", 0x0B));
        assert!(!t.fails_over("tele2", 0x58), "tele2 lists none");
        assert_eq!(
            FailoverTrigger::parse("0x58"),
            Some(FailoverTrigger::Code(0x58))
        );
        assert_eq!(FailoverTrigger::parse("sometimes"), None);
    }

    #[test]
    fn choose_covers_each_weight_once_per_cycle() {
        assert_eq!(choose(&[1, 1], 0), Some(0));
        assert_eq!(choose(&[1, 1], 1), Some(1));
        assert_eq!(choose(&[2, 1], 1), Some(0));
        assert_eq!(choose(&[2, 1], 2), Some(1));
        assert_eq!(choose(&[], 5), None);
    }
}
