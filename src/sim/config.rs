//! Knobs of the simulated carrier: credentials, receipt timing and fault injection.

use std::time::Duration;

use serde::Deserialize;

/// Configuration of the SMSC simulator.
///
/// Every field has a default (see [`SimConfig::default`]), so an empty TOML table is a valid
/// configuration: a well-behaved SMSC that accepts `smsgw`/`secret`, answers every submit_sm with
/// ESME_ROK and sends a DELIVRD receipt 200 ms later. The fault knobs can be changed while the
/// simulator runs with [`super::SimHandle::set_config`].
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimConfig {
    /// The `system_id` an ESME must bind with. Also returned in every successful bind_*_resp.
    pub system_id: String,
    /// The bind password. A bind with any other system_id/password pair is answered with
    /// ESME_RINVPASWD (0x0E) and the connection is closed.
    pub password: String,
    /// Delay between the submit_sm_resp and the delivery receipt.
    #[serde(with = "humantime_serde")]
    pub receipt_delay: Duration,
    /// More submit_sm than this in the current one-second window (counted over the whole
    /// simulator, not per session) are answered with ESME_RTHROTTLED (0x58) and get no receipt.
    /// `None` never throttles.
    pub throttle_above_per_second: Option<u32>,
    /// Fraction (0..=1) of submit_sm answered with ESME_RSUBMITFAIL (0x45).
    pub reject_ratio: f64,
    /// Fraction (0..=1) of accepted messages whose receipt says `stat:UNDELIV err:001`
    /// (message_state 5) instead of `stat:DELIVRD err:000`.
    pub undeliverable_ratio: f64,
    /// Carrier quirk: send the receipt deliver_sm *before* the submit_sm_resp carrying the same
    /// message id (DOMAIN.md §3.5 quirk 3). `receipt_delay` is ignored when set.
    pub receipt_before_response: bool,
    /// `false` never sends receipts, whatever registered_delivery asks for (query_sm still
    /// answers: the simulator knows what it delivered).
    pub receipts: bool,
    /// How submit_sm_resp writes message ids: `decimal` (default) or `hex` (lower case).
    pub response_ids: IdFormat,
    /// Carrier quirk (DOMAIN.md §3.5 quirk 1): how receipts write the same id. `same` as the
    /// response (default), or `decimal` / `hex` whatever the response used.
    pub receipt_ids: ReceiptIds,
    /// `false`: receipts carry only the Appendix-B text, no receipted_message_id and
    /// message_state TLVs (as many 3.4 SMSCs send them).
    pub receipt_tlvs: bool,
    /// SMPP 5.0 flow control: every submit_sm_resp to a session bound with interface_version
    /// 5.0 carries the `congestion_state` TLV with this value (0 idle … 80–89 optimum, 90–99
    /// nearing congestion, 100 congested; DOMAIN.md §1.6). `None` sends none.
    pub congestion_state: Option<u8>,
    /// A hung SMSC: binds are answered, then nothing is (no responses, no enquire_link_resp),
    /// while deliver_sm already queued still go out. For inactivity and response timeouts.
    pub silent: bool,
}

/// How the simulator writes a message id (a 64-bit counter).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdFormat {
    #[default]
    Decimal,
    Hex,
}

impl IdFormat {
    pub fn write(self, id: u64) -> String {
        match self {
            IdFormat::Decimal => id.to_string(),
            IdFormat::Hex => format!("{id:x}"),
        }
    }

    pub fn read(self, id: &str) -> Option<u64> {
        match self {
            IdFormat::Decimal => id.parse().ok(),
            IdFormat::Hex => u64::from_str_radix(id, 16).ok(),
        }
    }
}

/// How the simulator's receipts write a message id.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReceiptIds {
    #[default]
    Same,
    Decimal,
    Hex,
}

impl ReceiptIds {
    /// The format receipts use when responses use `response`.
    pub fn format(self, response: IdFormat) -> IdFormat {
        match self {
            ReceiptIds::Same => response,
            ReceiptIds::Decimal => IdFormat::Decimal,
            ReceiptIds::Hex => IdFormat::Hex,
        }
    }
}

/// Shows everything but the password.
impl std::fmt::Debug for SimConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimConfig")
            .field("system_id", &self.system_id)
            .field("password", &"***")
            .field("receipt_delay", &self.receipt_delay)
            .field("throttle_above_per_second", &self.throttle_above_per_second)
            .field("reject_ratio", &self.reject_ratio)
            .field("undeliverable_ratio", &self.undeliverable_ratio)
            .field("receipt_before_response", &self.receipt_before_response)
            .field("receipts", &self.receipts)
            .field("response_ids", &self.response_ids)
            .field("receipt_ids", &self.receipt_ids)
            .field("receipt_tlvs", &self.receipt_tlvs)
            .field("congestion_state", &self.congestion_state)
            .field("silent", &self.silent)
            .finish()
    }
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            system_id: "smsgw".to_owned(),
            password: "secret".to_owned(),
            receipt_delay: Duration::from_millis(200),
            throttle_above_per_second: None,
            reject_ratio: 0.0,
            undeliverable_ratio: 0.0,
            receipt_before_response: false,
            receipts: true,
            response_ids: IdFormat::Decimal,
            receipt_ids: ReceiptIds::Same,
            receipt_tlvs: true,
            congestion_state: None,
            silent: false,
        }
    }
}

/// Longest `system_id` a bind PDU can carry: C-Octet String of 16 octets including the NUL
/// (SMPP 3.4 §4.1.1).
const MAX_SYSTEM_ID: usize = 15;
/// Longest `password` a bind PDU can carry: 9 octets including the NUL (SMPP 3.4 §4.1.1).
const MAX_PASSWORD: usize = 8;

impl SimConfig {
    /// Every problem with this configuration, each naming its key. Empty means valid.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if !self.system_id.is_ascii() || self.system_id.len() > MAX_SYSTEM_ID {
            problems.push(format!(
                "system_id: must be at most {MAX_SYSTEM_ID} ASCII characters (an SMPP bind cannot carry more)"
            ));
        }
        if !self.password.is_ascii() || self.password.len() > MAX_PASSWORD {
            problems.push(format!(
                "password: must be at most {MAX_PASSWORD} ASCII characters (an SMPP bind cannot carry more)"
            ));
        }
        for (key, ratio) in [
            ("reject_ratio", self.reject_ratio),
            ("undeliverable_ratio", self.undeliverable_ratio),
        ] {
            if !(0.0..=1.0).contains(&ratio) {
                problems.push(format!("{key}: must be between 0 and 1, got {ratio}"));
            }
        }
        if self.congestion_state.is_some_and(|state| state > 100) {
            problems.push("congestion_state: must be between 0 and 100".into());
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_match_the_documented_values() {
        let config = SimConfig::default();
        assert!(config.validate().is_empty());
        assert_eq!(config.system_id, "smsgw");
        assert_eq!(config.password, "secret");
        assert_eq!(config.receipt_delay, Duration::from_millis(200));
        assert!(config.receipts);
        assert!(!config.receipt_before_response);
        assert_eq!(config.throttle_above_per_second, None);
        assert_eq!(config.response_ids, IdFormat::Decimal);
        assert_eq!(config.receipt_ids, ReceiptIds::Same);
        assert!(config.receipt_tlvs);
    }

    #[test]
    fn id_formats_write_and_read_the_same_number() {
        assert_eq!(IdFormat::Hex.write(5_914_401), "5a3f21");
        assert_eq!(IdFormat::Decimal.write(5_914_401), "5914401");
        assert_eq!(IdFormat::Hex.read("5A3F21"), Some(5_914_401));
        assert_eq!(IdFormat::Decimal.read("5a3f21"), None);
        assert_eq!(ReceiptIds::Same.format(IdFormat::Hex), IdFormat::Hex);
        assert_eq!(ReceiptIds::Decimal.format(IdFormat::Hex), IdFormat::Decimal);
    }

    #[test]
    fn validate_names_every_bad_key() {
        let config = SimConfig {
            system_id: "a-much-too-long-system-id".into(),
            password: "toolongpassword".into(),
            reject_ratio: 1.5,
            undeliverable_ratio: f64::NAN,
            congestion_state: Some(101),
            ..SimConfig::default()
        };
        let problems = config.validate();
        assert_eq!(problems.len(), 5, "{problems:?}");
        for key in [
            "system_id:",
            "password:",
            "reject_ratio:",
            "undeliverable_ratio:",
            "congestion_state:",
        ] {
            assert!(
                problems.iter().any(|p| p.starts_with(key)),
                "{key} missing in {problems:?}"
            );
        }
        assert!(
            problems
                .iter()
                .any(|p| p.contains("must be between 0 and 1"))
        );
    }
}
