//! Intakes besides the HTTP API: submissions from a message broker. An intake authenticates a
//! submission, then hands its body to the function behind `POST /v1/messages`
//! (`api::messages::submit_body`): the same schema, validation, policy and durable commit.
//!
//! The configuration types live here, outside the cargo feature, so that a binary built
//! without it still reads `[amqp]` and can say why it cannot honour `enabled = true`.

#[cfg(feature = "amqp")]
pub mod amqp;

use serde::Deserialize;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::api::AppState;
use crate::config::{AccountConfig, Secret};

/// `[amqp]`: submissions from a RabbitMQ queue (cargo feature `amqp`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpConfig {
    pub enabled: bool,
    /// `amqp://user:password@host:5672/vhost`, or `amqps://` for TLS (a secret: it holds the
    /// password).
    pub url: Secret,
    /// Where applications publish submissions. Declared durable if it does not exist; an
    /// existing queue is used as it is (its dead-letter settings included).
    pub queue: String,
    /// Where answers go when a submission has no `reply_to` (declared like `queue`).
    pub reply_queue: String,
    /// Most submissions taken from the broker and not yet acknowledged.
    pub prefetch: u32,
    /// Binds the queue to one account: its submissions need no `api_key` header (the broker's
    /// permissions decide who may publish). Unset, each submission carries its account's key.
    pub account: Option<String>,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        AmqpConfig {
            enabled: false,
            url: Secret("amqp://guest:guest@127.0.0.1:5672/%2f".into()),
            queue: "smsgw.submit".into(),
            reply_queue: "smsgw.replies".into(),
            prefetch: 64,
            account: None,
        }
    }
}

/// AMQP queue names are short strings; the broker reserves names starting with `amq.`.
const MAX_QUEUE_NAME: usize = 255;

impl AmqpConfig {
    /// Every problem, each naming its key under `amqp.`.
    pub fn validate(&self, accounts: &[AccountConfig]) -> Vec<String> {
        let mut problems = Vec::new();
        problems.extend(missing_feature(self.enabled, cfg!(feature = "amqp")));
        if let Err(why) = check_url(self.url.expose()) {
            problems.push(format!("amqp.url: {why}"));
        }
        for (key, name) in [("queue", &self.queue), ("reply_queue", &self.reply_queue)] {
            if name.is_empty() || name.len() > MAX_QUEUE_NAME || name.starts_with("amq.") {
                problems.push(format!(
                    "amqp.{key}: must be 1 to {MAX_QUEUE_NAME} bytes and not start with `amq.` \
                     (reserved by the broker)"
                ));
            }
        }
        if self.queue == self.reply_queue {
            problems.push("amqp.reply_queue: must differ from amqp.queue".to_owned());
        }
        if !(1..=u32::from(u16::MAX)).contains(&self.prefetch) {
            problems.push(format!("amqp.prefetch: must be between 1 and {}", u16::MAX));
        }
        if let Some(account) = &self.account
            && !accounts.iter().any(|a| &a.name == account)
        {
            problems.push(format!(
                "amqp.account: `{account}` is not the name of an account in [[accounts]]"
            ));
        }
        problems
    }
}

fn missing_feature(enabled: bool, built_in: bool) -> Option<String> {
    (enabled && !built_in).then(|| {
        "amqp.enabled: this smsgw was built without the `amqp` feature; build it with \
         `cargo build --release --features amqp`, or set enabled = false"
            .to_owned()
    })
}

/// The URL is parsed as the client will parse it when the feature is built in.
fn check_url(url: &str) -> Result<(), String> {
    if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
        return Err("must start with amqp:// or amqps://".into());
    }
    #[cfg(feature = "amqp")]
    amqp::parse_url(url)?;
    Ok(())
}

/// Starts the intakes the configuration enables. Each stops consuming when `shutdown` is
/// cancelled and finishes what it took; wait for the handles before closing the store.
pub fn start(
    config: &AmqpConfig,
    state: &AppState,
    shutdown: &CancellationToken,
) -> Vec<JoinHandle<()>> {
    #[cfg(feature = "amqp")]
    if config.enabled {
        let intake = amqp::Intake::new(config.clone(), state.clone());
        return vec![tokio::spawn(intake.run(shutdown.clone()))];
    }
    #[cfg(not(feature = "amqp"))]
    let _ = (config, state, shutdown);
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(config: &AmqpConfig) -> String {
        config.validate(&[]).join("\n")
    }

    #[test]
    fn the_defaults_are_valid() {
        assert_eq!(problems(&AmqpConfig::default()), "");
    }

    #[test]
    fn every_bad_value_names_its_key() {
        let config = AmqpConfig {
            enabled: false,
            url: Secret("http://broker".into()),
            queue: "amq.gen-1".into(),
            reply_queue: String::new(),
            prefetch: 0,
            account: Some("nobody".into()),
        };
        let problems = problems(&config);
        for key in [
            "amqp.url",
            "amqp.queue",
            "amqp.reply_queue",
            "amqp.prefetch",
            "amqp.account",
        ] {
            assert!(problems.contains(key), "missing {key} in {problems}");
        }
    }

    #[test]
    fn the_reply_queue_is_not_the_submission_queue() {
        let config = AmqpConfig {
            reply_queue: "smsgw.submit".into(),
            ..AmqpConfig::default()
        };
        assert!(problems(&config).contains("amqp.reply_queue: must differ"));
    }

    #[test]
    fn enabling_it_without_the_feature_says_so() {
        let problem = missing_feature(true, false).unwrap_or_default();
        assert!(
            problem.starts_with("amqp.enabled: this smsgw was built without the `amqp` feature")
        );
        assert_eq!(missing_feature(true, true), None);
        assert_eq!(missing_feature(false, false), None);
        // And in this build:
        let config = AmqpConfig {
            enabled: true,
            ..AmqpConfig::default()
        };
        assert_eq!(
            problems(&config).contains("built without"),
            !cfg!(feature = "amqp")
        );
    }

    #[cfg(feature = "amqp")]
    #[test]
    fn with_the_feature_it_can_be_enabled() {
        let config = AmqpConfig {
            enabled: true,
            url: Secret("amqp://user:pass@10.1.2.3:5673/smsgw".into()),
            ..AmqpConfig::default()
        };
        assert_eq!(problems(&config), "");
    }
}
