//! The body of `POST /v1/messages` through its parsing and validation
//! (`smsgw::api::parse_submission`, everything the handler does before the store): any bytes
//! give a result or an API error with a code, never a panic, and what validates is within the
//! limits the store relies on.
#![no_main]

use std::path::Path;
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use smsgw::api::auth::{Account, Accounts};
use smsgw::api::{SubmitRules, parse_submission};
use smsgw::config::Config;
use smsgw::router::RouteTable;

const CONFIG: &str = r#"
[privacy]
pseudonym_key = "fuzz-pseudonym-key-0123456789"
[[accounts]]
name = "a"
api_keys = ["sha256:0000000000000000000000000000000000000000000000000000000000000000"]
senders = ["iP1", "+46700000001"]
webhook_url = "https://hooks.example.com/smsgw"
webhook_secret = "fuzz-webhook-secret"
default_consent_at = "2026-01-01T00:00:00Z"
[[carriers]]
name = "sweden"
address = "127.0.0.1:2775"
[[routes]]
prefixes = ["+4670", "+4673"]
carrier = "sweden"
"#;

static SETUP: LazyLock<(Config, RouteTable, std::sync::Arc<Account>)> = LazyLock::new(|| {
    let config = Config::parse(CONFIG, Path::new("fuzz.toml")).expect("the fuzz config is valid");
    let account = Accounts::from_config(&config.accounts)
        .find("a")
        .cloned()
        .expect("account a");
    let routes = RouteTable::from_config(&config);
    (config, routes, account)
});

fuzz_target!(|data: &[u8]| {
    let (config, routes, account) = &*SETUP;
    let rules = SubmitRules {
        http: &config.http,
        messages: &config.messages,
        routes,
    };
    let Ok(parsed) = parse_submission(&rules, account, data) else {
        return;
    };
    assert!(parsed.items.len() >= parsed.messages.len());
    assert!(parsed.batch || parsed.messages.len() == 1);
    assert!(parsed.items.len() <= config.http.max_batch);
    for message in &parsed.messages {
        assert!(message.recipient.starts_with("+4670") || message.recipient.starts_with("+4673"));
        assert!(message.segments as usize <= config.messages.max_segments);
        assert!(message.segments >= 1);
        assert!(message.expires_at > message.due_at);
        assert!(!message.body.trim().is_empty());
    }
});
