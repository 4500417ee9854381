//! API keys: an account is found by the SHA-256 of the key it presents. Keys are random tokens,
//! so a fast hash is enough (a slow password hash would only invite denial of service); the
//! configuration holds only hashes, and every comparison is in constant time. Each key has
//! scopes (what it may do) and may have a rate limit of its own, beside its account's.

use std::sync::Arc;

use axum::http::HeaderMap;
use rand::RngCore;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::limits::RateLimit;
use crate::config::{AccountConfig, ApiKeyConfig};

/// What an API key may do. `super::ROUTES` says which scope each route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Submit messages and cancel them.
    Submit,
    /// Read messages: one with its history, or the list.
    Read,
    /// Opt-outs and number changes: list, add, import, export, remove.
    Policy,
    /// Data subjects: export and erase everything the account holds about a number.
    Subjects,
}

impl Scope {
    pub const ALL: [Scope; 4] = [Scope::Submit, Scope::Read, Scope::Policy, Scope::Subjects];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Submit => "submit",
            Scope::Read => "read",
            Scope::Policy => "policy",
            Scope::Subjects => "subjects",
        }
    }

    /// Every scope, for error messages: "`submit`, `read`, ...".
    pub fn names() -> String {
        let names: Vec<String> = Scope::ALL
            .iter()
            .map(|s| format!("`{}`", s.as_str()))
            .collect();
        names.join(", ")
    }
}

/// One API key of an account.
#[derive(Debug)]
pub struct ApiKey {
    hash: [u8; 32],
    scopes: Vec<Scope>,
    /// The key's own limit, taken besides the account's.
    pub limit: Option<RateLimit>,
}

impl ApiKey {
    fn from_config(key: &ApiKeyConfig) -> Option<ApiKey> {
        Some(ApiKey {
            hash: parse_key_hash(&key.hash)?,
            scopes: key.scopes.clone(),
            limit: RateLimit::new(key.rate_per_second, key.burst),
        })
    }

    pub fn allows(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope)
    }
}

/// An account as the API needs it.
#[derive(Debug)]
pub struct Account {
    pub name: String,
    pub webhook_url: Option<String>,
    /// Webhooks of this account can be signed (and so may be sent).
    pub can_sign_webhooks: bool,
    /// Senders this account may use; empty allows any.
    pub senders: Vec<String>,
    pub service_messages: bool,
    pub follow_number_changes: bool,
    /// Consent time (ms) assumed for messages that give none.
    pub default_consent_at: Option<i64>,
    /// The limit all of the account's keys share.
    pub limit: Option<RateLimit>,
    keys: Vec<Arc<ApiKey>>,
}

impl Account {
    pub fn may_send_as(&self, sender: &str) -> bool {
        self.senders.is_empty() || self.senders.iter().any(|s| s == sender)
    }
}

#[derive(Debug, Clone, Default)]
pub struct Accounts(Vec<Arc<Account>>);

impl Accounts {
    pub fn from_config(accounts: &[AccountConfig]) -> Accounts {
        Accounts(
            accounts
                .iter()
                .map(|a| {
                    Arc::new(Account {
                        name: a.name.clone(),
                        webhook_url: a.webhook_url.clone(),
                        can_sign_webhooks: a.webhook_secret.is_some(),
                        service_messages: a.service_messages,
                        follow_number_changes: a.follow_number_changes,
                        default_consent_at: a
                            .default_consent_at
                            .as_deref()
                            .and_then(parse_rfc3339_ms),
                        senders: a
                            .senders
                            .iter()
                            .map(|s| s.trim_start_matches('+').to_owned())
                            .collect(),
                        limit: RateLimit::new(a.rate_per_second, a.burst),
                        keys: a
                            .api_keys
                            .iter()
                            .filter_map(ApiKey::from_config)
                            .map(Arc::new)
                            .collect(),
                    })
                })
                .collect(),
        )
    }

    pub fn find(&self, name: &str) -> Option<&Arc<Account>> {
        self.0.iter().find(|a| a.name == name)
    }

    /// Accounts whose messages follow a changed number to its new one.
    pub fn following_changes(&self) -> Vec<String> {
        self.0
            .iter()
            .filter(|a| a.follow_number_changes)
            .map(|a| a.name.clone())
            .collect()
    }

    /// The account and the key of the `Authorization: Bearer` header, if any. Every configured
    /// hash is compared, so the time taken does not tell which account or how many bytes
    /// matched.
    pub fn authenticate_bearer(&self, headers: &HeaderMap) -> Option<(Arc<Account>, Arc<ApiKey>)> {
        if several_authorizations(headers) {
            return None;
        }
        let value = headers
            .get(axum::http::header::AUTHORIZATION)?
            .to_str()
            .ok()?;
        let key = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))?;
        self.authenticate_key(key)
    }

    /// The account and the key of an API key, however it was presented (a Bearer header, the
    /// queue intake's `api_key` header).
    pub fn authenticate_key(&self, key: &str) -> Option<(Arc<Account>, Arc<ApiKey>)> {
        let key = key.trim();
        if key.is_empty() {
            return None;
        }
        let presented: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let mut found = None;
        for account in &self.0 {
            for key in &account.keys {
                if bool::from(key.hash.ct_eq(&presented)) {
                    found = Some((account.clone(), key.clone()));
                }
            }
        }
        found
    }
}

/// Whether a request carries more than one `Authorization` header. A request has one (RFC 9110
/// §11.6.2); with two, whichever one a proxy checks, the gateway might take the other, so such
/// a request is refused rather than read by its first header.
pub fn several_authorizations(headers: &HeaderMap) -> bool {
    headers
        .get_all(axum::http::header::AUTHORIZATION)
        .iter()
        .nth(1)
        .is_some()
}

/// Validated at start-up (config), so a bad value here is simply absent.
fn parse_rfc3339_ms(text: &str) -> Option<i64> {
    let t = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339);
    t.ok()
        .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
}

/// Parses `sha256:<64 hex digits>`.
pub fn parse_key_hash(text: &str) -> Option<[u8; 32]> {
    let hex_digits = text.strip_prefix("sha256:")?;
    let bytes = hex::decode(hex_digits).ok()?;
    bytes.try_into().ok()
}

/// The configuration line for a key.
pub fn hash_key(key: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(key.as_bytes())))
}

/// A new random key: 32 bytes from the OS generator, hex, with a recognisable prefix.
pub fn new_key() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("smsgw_{}", hex::encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn accounts() -> Accounts {
        Accounts::from_config(&[
            AccountConfig {
                name: "a".into(),
                api_keys: vec![
                    ApiKeyConfig::all_scopes(&hash_key("key-a")),
                    ApiKeyConfig {
                        scopes: vec![Scope::Read],
                        ..ApiKeyConfig::all_scopes(&hash_key("key-a-read"))
                    },
                ],
                rate_per_second: None,
                burst: None,
                webhook_url: None,
                webhook_secret: None,
                webhook_batch: 1,
                senders: vec![],
                service_messages: false,
                follow_number_changes: false,
                default_consent_at: None,
                keywords: Default::default(),
            },
            AccountConfig {
                name: "b".into(),
                api_keys: vec![
                    ApiKeyConfig::all_scopes(&hash_key("key-b1")),
                    ApiKeyConfig::all_scopes(&hash_key("key-b2")),
                ],
                rate_per_second: None,
                burst: None,
                webhook_url: None,
                webhook_secret: None,
                webhook_batch: 1,
                senders: vec![],
                service_messages: false,
                follow_number_changes: false,
                default_consent_at: None,
                keywords: Default::default(),
            },
        ])
    }

    fn bearer(key: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            axum::http::header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {key}")).unwrap(),
        );
        headers
    }

    #[test]
    fn each_key_finds_its_own_account() {
        let accounts = accounts();
        let account_of = |headers: &HeaderMap| {
            accounts
                .authenticate_bearer(headers)
                .map(|(account, _)| account.name.clone())
        };
        assert_eq!(account_of(&bearer("key-a")).as_deref(), Some("a"));
        assert_eq!(account_of(&bearer("key-b2")).as_deref(), Some("b"));
        assert_eq!(account_of(&bearer("key-c")), None);
        assert_eq!(account_of(&bearer("")), None);
        assert_eq!(account_of(&HeaderMap::new()), None);
        let mut two = bearer("key-a");
        two.append(
            axum::http::header::AUTHORIZATION,
            HeaderValue::from_static("Bearer key-b2"),
        );
        assert_eq!(account_of(&two), None, "two keys: neither is taken");
    }

    #[test]
    fn a_key_has_its_own_scopes() {
        let accounts = accounts();
        let (account, key) = accounts.authenticate_bearer(&bearer("key-a-read")).unwrap();
        assert_eq!(account.name, "a");
        assert!(key.allows(Scope::Read));
        assert!(!key.allows(Scope::Submit));
        let (_, key) = accounts.authenticate_bearer(&bearer("key-a")).unwrap();
        assert!(Scope::ALL.iter().all(|s| key.allows(*s)));
    }

    #[test]
    fn generated_keys_hash_to_a_valid_config_line() {
        let key = new_key();
        assert!(key.starts_with("smsgw_"));
        assert!(parse_key_hash(&hash_key(&key)).is_some());
        assert!(parse_key_hash("sha256:abc").is_none());
        assert!(parse_key_hash("md5:00").is_none());
    }
}
