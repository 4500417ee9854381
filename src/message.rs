//! The vocabulary of the gateway: message ids, phone numbers, senders, statuses and the outcome
//! of one submission attempt.

use std::fmt;
use std::str::FromStr;

use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use uuid::Uuid;

/// A message id: a UUIDv7, so ids sort by creation time (the list API pages by id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(pub Uuid);

impl MessageId {
    pub fn new() -> MessageId {
        MessageId(Uuid::now_v7())
    }

    /// The smallest id created at `ms`: a bound for "created since" queries.
    pub fn first_at(ms: i64) -> MessageId {
        let ms = ms.clamp(0, (1 << 48) - 1) as u64;
        let mut bytes = [0u8; 16];
        bytes[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
        bytes[6] = 0x70; // version 7
        bytes[8] = 0x80; // RFC 4122 variant
        MessageId(Uuid::from_bytes(bytes))
    }

    /// The 8-bit concatenation reference of this message: stable across attempts, so that parts
    /// resubmitted after a failure still join the parts that were accepted before.
    pub fn concat_reference(&self) -> u8 {
        let bytes = self.0.as_bytes();
        bytes[15] ^ bytes[14] ^ bytes[13]
    }
}

impl Default for MessageId {
    fn default() -> Self {
        MessageId::new()
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.as_hyphenated().fmt(f)
    }
}

impl FromStr for MessageId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(MessageId)
    }
}

/// A phone number in E.164 form (`+46701234567`). Personal data: never log it, log
/// [`Pseudonymizer::pseudonym`] instead.
#[derive(Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct Msisdn(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MsisdnError {
    #[error("must be in international format, starting with + and the country code")]
    NotInternational,
    #[error("is not a valid phone number")]
    Invalid,
}

impl Msisdn {
    /// Parses a number written in international form (spaces, dashes and brackets allowed) and
    /// checks it against the numbering plan of its country.
    pub fn parse(input: &str) -> Result<Msisdn, MsisdnError> {
        let trimmed = input.trim();
        if !trimmed.starts_with('+') && !trimmed.starts_with("00") {
            return Err(MsisdnError::NotInternational);
        }
        let international = match trimmed.strip_prefix("00") {
            Some(rest) => format!("+{rest}"),
            None => trimmed.to_owned(),
        };
        let number = phonenumber::parse(None, &international).map_err(|_| MsisdnError::Invalid)?;
        if !crate::numbering::is_valid(&number) {
            return Err(MsisdnError::Invalid);
        }
        // E.164 is the country code and the national number (with its leading zeros): what
        // `number.format()` writes, without first looking up a display format it does not use.
        Ok(Msisdn(format!(
            "+{}{}",
            number.country().code(),
            number.national()
        )))
    }

    /// Trusts a value that was normalised before it was stored.
    pub fn from_stored(e164: String) -> Msisdn {
        Msisdn(e164)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The digits without `+`, as SMPP sends international numbers (TON 1, NPI 1).
    pub fn digits(&self) -> &str {
        self.0.trim_start_matches('+')
    }
}

impl fmt::Debug for Msisdn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Msisdn(***)")
    }
}

/// Who a message appears to come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sender {
    /// Letters and digits, at most 11 (GSM 03.40), e.g. `iP1`. Recipients cannot reply.
    Alphanumeric(String),
    /// A short code or long number, digits only (an optional leading + is dropped).
    Numeric(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SenderError {
    #[error("must not be empty")]
    Empty,
    #[error("an alphanumeric sender has at most 11 characters")]
    TooLongAlphanumeric,
    #[error("a numeric sender has at most 15 digits")]
    TooLongNumeric,
    #[error("may contain only letters A-Z, digits, space and . - _ & +")]
    BadCharacter,
    #[error("an alphanumeric sender needs at least one letter")]
    NoLetter,
    #[error("a numeric sender needs at least one digit")]
    NoDigit,
}

impl Sender {
    pub fn parse(input: &str) -> Result<Sender, SenderError> {
        let s = input.trim();
        if s.is_empty() {
            return Err(SenderError::Empty);
        }
        let digits = s.strip_prefix('+').unwrap_or(s);
        if digits.chars().all(|c| c.is_ascii_digit()) {
            // A bare `+` is a numeric sender of no digits: the SMS would go out from nobody.
            if digits.is_empty() {
                return Err(SenderError::NoDigit);
            }
            if digits.len() > 15 {
                return Err(SenderError::TooLongNumeric);
            }
            return Ok(Sender::Numeric(digits.to_owned()));
        }
        if !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || " .-_&+".contains(c))
        {
            return Err(SenderError::BadCharacter);
        }
        if !s.chars().any(|c| c.is_ascii_alphabetic()) {
            return Err(SenderError::NoLetter);
        }
        if s.chars().count() > 11 {
            return Err(SenderError::TooLongAlphanumeric);
        }
        Ok(Sender::Alphanumeric(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        match self {
            Sender::Alphanumeric(s) | Sender::Numeric(s) => s,
        }
    }

    /// Stored senders are what `parse` accepted; parsing again only restores the kind.
    pub fn from_stored(stored: &str) -> Sender {
        Sender::parse(stored).unwrap_or_else(|_| Sender::Alphanumeric(stored.to_owned()))
    }
}

/// Why a message is sent; the opt-out rules treat the two differently (DESIGN.md, rule 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Category {
    #[default]
    Transactional,
    Marketing,
}

impl Category {
    pub fn as_str(self) -> &'static str {
        match self {
            Category::Transactional => "transactional",
            Category::Marketing => "marketing",
        }
    }
}

impl FromStr for Category {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "transactional" => Ok(Category::Transactional),
            "marketing" => Ok(Category::Marketing),
            _ => Err(()),
        }
    }
}

/// The life of a message. The message row holds the latest; every change is also an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Waiting for its turn (or for a retry).
    Queued,
    /// Waiting for its `send_at`.
    Scheduled,
    /// Claimed by the dispatcher; submit_sm written or about to be.
    Sending,
    /// Every part accepted by the carrier (submit_sm_resp OK).
    Sent,
    /// The carrier reports every part delivered to the handset.
    Delivered,
    /// The carrier reports a part could not be delivered.
    Undelivered,
    /// The validity period ended before delivery, at the gateway or at the carrier.
    Expired,
    /// The carrier refused the message permanently.
    Failed,
    /// Canceled through the API before it was sent.
    Canceled,
    /// Submitted, but the carrier never answered, and the policy is not to resubmit.
    Unknown,
    /// Held because carriers keep reporting the number unknown: waits for the account or the
    /// operator to clear the number (then queued) or confirm it gone (then refused).
    HeldSuspect,
    RefusedOptedOut,
    RefusedNumberChanged,
    RefusedInvalid,
}

impl Status {
    pub const ALL: [Status; 14] = [
        Status::Queued,
        Status::Scheduled,
        Status::Sending,
        Status::Sent,
        Status::Delivered,
        Status::Undelivered,
        Status::Expired,
        Status::Failed,
        Status::Canceled,
        Status::Unknown,
        Status::HeldSuspect,
        Status::RefusedOptedOut,
        Status::RefusedNumberChanged,
        Status::RefusedInvalid,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Scheduled => "scheduled",
            Status::Sending => "sending",
            Status::Sent => "sent",
            Status::Delivered => "delivered",
            Status::Undelivered => "undelivered",
            Status::Expired => "expired",
            Status::Failed => "failed",
            Status::Canceled => "canceled",
            Status::Unknown => "unknown",
            Status::HeldSuspect => "held_suspect",
            Status::RefusedOptedOut => "refused_opted_out",
            Status::RefusedNumberChanged => "refused_number_changed",
            Status::RefusedInvalid => "refused_invalid",
        }
    }

    /// A final status never changes again.
    pub fn is_final(self) -> bool {
        !matches!(
            self,
            Status::Queued
                | Status::Scheduled
                | Status::Sending
                | Status::Sent
                | Status::HeldSuspect
        )
    }
}

impl FromStr for Status {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        Status::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or(())
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Turns phone numbers into stable, unlinkable tokens for logs: HMAC-SHA256 under a secret key,
/// so that a number cannot be found by hashing every possible number (DOMAIN.md §8.3).
#[derive(Clone)]
pub struct Pseudonymizer {
    mac: Hmac<Sha256>,
}

impl Pseudonymizer {
    pub fn new(key: &[u8]) -> Pseudonymizer {
        Pseudonymizer {
            mac: Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length"),
        }
    }

    /// 16 hex digits: enough to follow one number through the logs, useless to reverse.
    pub fn pseudonym(&self, number: &str) -> String {
        self.key(number)[..16].to_owned()
    }

    /// The whole HMAC in hex: a key under which a number can be found again (opt-outs) without
    /// keeping the number.
    pub fn key(&self, number: &str) -> String {
        let mut mac = self.mac.clone();
        mac.update(number.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }
}

impl fmt::Debug for Pseudonymizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pseudonymizer")
    }
}

/// Milliseconds since the Unix epoch: the one time unit of the store.
pub fn now_ms() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    now.as_millis() as i64
}

/// Formats store milliseconds as RFC 3339 for the API.
pub fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_sort_by_creation_time_and_first_at_bounds_them() {
        let before = now_ms();
        let id = MessageId::new();
        assert!(MessageId::first_at(before) <= id);
        assert!(MessageId::first_at(before + 2) > id);
        assert!(MessageId::first_at(before).to_string() <= id.to_string());
    }

    #[test]
    fn numbers_are_normalised_to_e164() {
        for input in [
            "+46 70-123 45 67",
            "+46701234567",
            "0046701234567",
            " +46 (70) 1234567 ",
        ] {
            assert_eq!(
                Msisdn::parse(input).unwrap().as_str(),
                "+46701234567",
                "{input}"
            );
        }
        assert_eq!(
            Msisdn::parse("+46701234567").unwrap().digits(),
            "46701234567"
        );
    }

    #[test]
    fn bad_numbers_are_refused_with_a_reason() {
        assert_eq!(
            Msisdn::parse("0701234567"),
            Err(MsisdnError::NotInternational)
        );
        assert_eq!(Msisdn::parse("+46 12"), Err(MsisdnError::Invalid));
        assert_eq!(Msisdn::parse("+hello"), Err(MsisdnError::Invalid));
        assert_eq!(Msisdn::parse(""), Err(MsisdnError::NotInternational));
    }

    #[test]
    fn numbers_never_show_in_debug_output() {
        let n = Msisdn::parse("+46701234567").unwrap();
        assert!(!format!("{n:?}").contains("4670"));
    }

    #[test]
    fn senders_follow_the_gsm_rules() {
        assert_eq!(Sender::parse("iP1"), Ok(Sender::Alphanumeric("iP1".into())));
        assert_eq!(
            Sender::parse("+4670123"),
            Ok(Sender::Numeric("4670123".into()))
        );
        assert_eq!(Sender::parse("72345"), Ok(Sender::Numeric("72345".into())));
        assert_eq!(
            Sender::parse("TwelveLetter"),
            Err(SenderError::TooLongAlphanumeric)
        );
        assert_eq!(
            Sender::parse("1234567890123456"),
            Err(SenderError::TooLongNumeric)
        );
        assert_eq!(Sender::parse("Hej!"), Err(SenderError::BadCharacter));
        assert_eq!(Sender::parse(" "), Err(SenderError::Empty));
        assert_eq!(Sender::parse("+"), Err(SenderError::NoDigit));
        assert_eq!(Sender::parse(" + "), Err(SenderError::NoDigit));
        assert_eq!(Sender::parse("12 34"), Err(SenderError::NoLetter));
    }

    #[test]
    fn statuses_round_trip_through_their_names() {
        for status in Status::ALL {
            assert_eq!(status.as_str().parse::<Status>(), Ok(status));
            let json = serde_json::to_string(&status).unwrap();
            assert_eq!(json, format!("\"{}\"", status.as_str()));
        }
    }

    #[test]
    fn pseudonyms_are_stable_keyed_and_hide_the_number() {
        let a = Pseudonymizer::new(b"key one");
        let b = Pseudonymizer::new(b"key two");
        let p = a.pseudonym("+46701234567");
        assert_eq!(p, a.pseudonym("+46701234567"));
        assert_ne!(p, b.pseudonym("+46701234567"));
        assert_ne!(p, a.pseudonym("+46701234568"));
        assert!(!p.contains("4670"));
        assert_eq!(p.len(), 16);
    }
}
