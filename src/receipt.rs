//! Inbound deliver_sm: tell a delivery receipt (DLR) from a mobile-originated SMS, and read
//! receipts the many ways SMSCs write them (DOMAIN §3).
//!
//! Classifying and parsing are pure functions over rusmpp's owned `DeliverSm`; [`handler`]
//! stores what they find (the store matches a receipt to its message by `normalize_id`, after
//! the carrier's `receipt_id` rule turned the id into its response's form, see [`id`]) before
//! the session acknowledges the PDU.

pub mod id;
pub mod query;
pub mod unmatched;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::FutureExt;
use rusmpp::pdus::DeliverSm;
use rusmpp::tlvs::TlvValue;

use crate::config::{CarrierConfig, ReceiptIdRule};
use crate::encoding::{self, Concat};
use crate::smpp::status::{ESME_ROK, ESME_RX_T_APPN};
use crate::store::{InboundOwner, Store, StoreError};
use id::{IdForm, Learner};
use unmatched::UnmatchedLog;

/// Message state as reported by a receipt: message_state TLV values 0..=9 (DOMAIN §3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiptState {
    Scheduled,
    Enroute,
    Delivered,
    Expired,
    Deleted,
    Undeliverable,
    Accepted,
    Unknown,
    Rejected,
    Skipped,
}

impl ReceiptState {
    /// Every state, in the order of their message_state values (0..=9).
    pub const ALL: [ReceiptState; 10] = [
        ReceiptState::Scheduled,
        ReceiptState::Enroute,
        ReceiptState::Delivered,
        ReceiptState::Expired,
        ReceiptState::Deleted,
        ReceiptState::Undeliverable,
        ReceiptState::Accepted,
        ReceiptState::Unknown,
        ReceiptState::Rejected,
        ReceiptState::Skipped,
    ];

    /// Appendix-B `stat:` words, case-insensitive. BUFFRED/BUFFERD/ACKED are non-standard words
    /// Kannel treats as buffered, so they map to Enroute. The spelled-out state names are
    /// accepted too: some SMSCs write them and they are unambiguous.
    pub fn from_stat_word(word: &str) -> Option<Self> {
        let state = match word.trim().to_ascii_uppercase().as_str() {
            "SCHEDULED" => Self::Scheduled,
            "ENROUTE" | "BUFFRED" | "BUFFERD" | "BUFFERED" | "ACKED" => Self::Enroute,
            "DELIVRD" | "DELIVERED" => Self::Delivered,
            "EXPIRED" => Self::Expired,
            "DELETED" => Self::Deleted,
            "UNDELIV" | "UNDELIVERABLE" => Self::Undeliverable,
            "ACCEPTD" | "ACCEPTED" => Self::Accepted,
            "UNKNOWN" => Self::Unknown,
            "REJECTD" | "REJECTED" => Self::Rejected,
            "SKIPPED" => Self::Skipped,
            _ => return None,
        };
        Some(state)
    }

    /// message_state TLV (0x0427) value; anything above 9 is not a state we can act on.
    pub fn from_message_state(v: u8) -> Option<Self> {
        let state = match v {
            0 => Self::Scheduled,
            1 => Self::Enroute,
            2 => Self::Delivered,
            3 => Self::Expired,
            4 => Self::Deleted,
            5 => Self::Undeliverable,
            6 => Self::Accepted,
            7 => Self::Unknown,
            8 => Self::Rejected,
            9 => Self::Skipped,
            _ => return None,
        };
        Some(state)
    }

    /// Final states close the message; Enroute/Accepted/Scheduled only add to its history (DOMAIN §3.5.5).
    ///
    /// ACCEPTD is final by the spec, but carriers use it for "accepted by the next hop", so a
    /// later DELIVRD must still be able to close the message.
    pub fn is_final(self) -> bool {
        !matches!(self, Self::Scheduled | Self::Enroute | Self::Accepted)
    }

    /// Lowercase word for the API, webhooks and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Scheduled => "scheduled",
            Self::Enroute => "enroute",
            Self::Delivered => "delivered",
            Self::Expired => "expired",
            Self::Deleted => "deleted",
            Self::Undeliverable => "undeliverable",
            Self::Accepted => "accepted",
            Self::Unknown => "unknown",
            Self::Rejected => "rejected",
            Self::Skipped => "skipped",
        }
    }
}

/// A delivery receipt, reduced to what matching and status updates need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// The id as the SMSC wrote it (trimmed); match with [`normalize_id`].
    pub carrier_message_id: String,
    pub state: ReceiptState,
    /// network_error_code TLV as "type:code", else the text `err:` value as written.
    pub error_code: Option<String>,
}

/// A mobile-originated SMS (one segment of it, if `concat` is set).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundSms {
    pub from: String,
    pub to: String,
    pub text: String,
    pub concat: Option<Concat>,
}

/// What an inbound deliver_sm carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivered {
    Receipt(Receipt),
    Inbound(InboundSms),
}

/// A PDU flagged as a receipt that we cannot read. The caller should still ack it (DOMAIN §3.5.6)
/// and keep it for inspection.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReceiptError {
    #[error("delivery receipt has neither a receipted_message_id TLV nor an id: in its text")]
    MissingId,
    #[error(
        "delivery receipt for id {id:?} has neither a message_state TLV nor a stat: in its text"
    )]
    MissingState { id: String },
    #[error("delivery receipt for id {id:?} has an unrecognised state {state:?}")]
    UnknownState { id: String, state: String },
}

/// esm_class & 0x3C in {0x04, 0x08, 0x20} (or, fallback, text with both id: and stat:) → receipt; else inbound SMS.
/// Receipt: id from receipted_message_id TLV else text `id:`; state from message_state TLV else text `stat:`
/// (prefer TLVs; a TLV id without message_state falls back to the text stat). err: from network_error_code TLV (format "type:code") else text `err:`.
/// Text may be in short_message or, when sm_length is 0, in the message_payload TLV. Inbound SMS text decoded with
/// crate::encoding::decode(data_coding byte, bytes) after strip_udh when esm_class UDHI bit (0x40) is set.
///
/// A PDU carrying both receipted_message_id and message_state TLVs is also a receipt (Jasmin's
/// rule): no handset sends those, and some routes omit the esm_class bit. The text fallback
/// needs a recognised `stat:` word, so an unflagged MO that merely mentions "id:" and "stat:"
/// stays an SMS instead of becoming an unreadable receipt.
pub fn classify(pdu: &DeliverSm) -> Result<Delivered, ReceiptError> {
    let esm_class = u8::from(pdu.esm_class);
    let data_coding = u8::from(pdu.data_coding);
    let (concat, data) = if esm_class & UDHI != 0 {
        encoding::strip_udh(user_data(pdu))
    } else {
        (None, user_data(pdu))
    };
    let tlvs = ReceiptTlvs::of(pdu);
    let text = receipt_text(data_coding, data);
    let parsed = parse_text(&text);

    let flagged = matches!(esm_class & 0x3C, 0x04 | 0x08 | 0x20);
    let tlv_receipt = tlvs.id.is_some() && tlvs.state.is_some();
    let text_receipt = parsed
        .as_ref()
        .and_then(|r| r.stat.as_deref())
        .is_some_and(|stat| ReceiptState::from_stat_word(stat).is_some());
    if flagged || tlv_receipt || text_receipt {
        return receipt(tlvs, parsed).map(Delivered::Receipt);
    }
    Ok(Delivered::Inbound(InboundSms {
        from: c_string(pdu.source_addr.as_ref()),
        to: c_string(pdu.destination_addr.as_ref()),
        text: encoding::decode(data_coding, data),
        concat,
    }))
}

/// esm_class bit 6: short_message starts with a user data header.
const UDHI: u8 = 0x40;

/// The user data: short_message, or the message_payload TLV when short_message is empty
/// (some SMSCs send DLRs and MOs that way, DOMAIN §3.2).
fn user_data(pdu: &DeliverSm) -> &[u8] {
    if pdu.sm_length() > 0 {
        return pdu.short_message().as_ref();
    }
    pdu.tlvs()
        .iter()
        .find_map(|tlv| match tlv.value() {
            Some(TlvValue::MessagePayload(payload)) => Some(payload.value.as_ref()),
            _ => None,
        })
        .unwrap_or_default()
}

/// Receipt text is ASCII in practice even with data_coding 0; decoding it as GSM would turn
/// '_' or '@' in an id into other characters. Only UCS-2 is honoured.
fn receipt_text(data_coding: u8, data: &[u8]) -> String {
    if data_coding == 0x08 {
        encoding::decode(data_coding, data)
    } else {
        String::from_utf8_lossy(data).into_owned()
    }
}

/// Receipt fields found in TLVs. `state` keeps the raw byte so an out-of-range value can be
/// reported if the text cannot fill in.
#[derive(Default)]
struct ReceiptTlvs {
    id: Option<String>,
    state: Option<u8>,
    error: Option<String>,
}

impl ReceiptTlvs {
    fn of(pdu: &DeliverSm) -> Self {
        let mut found = Self::default();
        for tlv in pdu.tlvs() {
            match tlv.value() {
                Some(TlvValue::ReceiptedMessageId(id)) => {
                    found.id = non_empty(c_string(id.as_ref()));
                }
                Some(TlvValue::MessageState(state)) => found.state = Some(u8::from(*state)),
                Some(TlvValue::NetworkErrorCode(code)) => {
                    let kind = u8::from(code.network_type);
                    found.error = Some(format!("{kind}:{}", code.error_code));
                }
                _ => {}
            }
        }
        found
    }
}

/// Combines TLVs and text, TLVs first (DOMAIN §3.4).
fn receipt(tlvs: ReceiptTlvs, parsed: Option<TextReceipt>) -> Result<Receipt, ReceiptError> {
    let (text_id, text_stat, text_err) = match parsed {
        Some(r) => (Some(r.id), r.stat, r.err),
        None => (None, None, None),
    };
    let id = tlvs.id.or(text_id).ok_or(ReceiptError::MissingId)?;
    let state = receipt_state(&id, tlvs.state, text_stat)?;
    Ok(Receipt {
        carrier_message_id: id,
        state,
        error_code: tlvs.error.or(text_err),
    })
}

/// message_state TLV when it holds a known value, else the text `stat:` word.
fn receipt_state(
    id: &str,
    tlv: Option<u8>,
    text: Option<String>,
) -> Result<ReceiptState, ReceiptError> {
    if let Some(state) = tlv.and_then(ReceiptState::from_message_state) {
        return Ok(state);
    }
    let unknown = |state: String| ReceiptError::UnknownState {
        id: id.to_owned(),
        state,
    };
    match (text, tlv) {
        (Some(word), _) => ReceiptState::from_stat_word(&word).ok_or_else(|| unknown(word)),
        (None, Some(v)) => Err(unknown(format!("message_state {v}"))),
        (None, None) => Err(ReceiptError::MissingState { id: id.to_owned() }),
    }
}

/// A C-octet string's bytes (with or without the NUL) as text; lossy so a bad byte never fails.
fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).trim().to_owned()
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

/// Fields of an Appendix-B receipt text that matching needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextReceipt {
    pub id: String,
    pub stat: Option<String>,
    pub err: Option<String>,
}

/// Tolerant Appendix-B text parser: fields in any order, case-insensitive keys, `submit date`/`done date` with 10/12/14 digit dates, `Text:`/`text:`, missing fields, err decimal or alnum.
///
/// Only `id`, `stat` and `err` are extracted; each value is the token after the colon up to the
/// next whitespace, so dates of any width never matter. Keys are looked for before `text:` first,
/// because the quoted message text may itself contain "id:" or "stat:". None when there is no id.
pub fn parse_text(text: &str) -> Option<TextReceipt> {
    let lower = text.to_ascii_lowercase();
    let head_end = find_key(&lower, "text:").unwrap_or(lower.len());
    let value =
        |key: &str| field(text, &lower[..head_end], key).or_else(|| field(text, &lower, key));
    Some(TextReceipt {
        id: value("id:")?,
        stat: value("stat:"),
        err: value("err:"),
    })
}

/// Value of `key` found in `haystack` (a lower-cased prefix of `original`, same byte offsets).
fn field(original: &str, haystack: &str, key: &str) -> Option<String> {
    let start = find_key(haystack, key)? + key.len();
    let rest = original.get(start..)?.trim_start_matches([' ', '\t']);
    let token = rest.split_whitespace().next()?;
    // "id: sub:001" means an empty id, not an id of "sub:001".
    if token.contains(':') {
        return None;
    }
    Some(token.to_owned())
}

/// First occurrence of `key` that starts a word, so "id:" does not match inside "msgid:".
fn find_key(haystack: &str, key: &str) -> Option<usize> {
    haystack.match_indices(key).map(|(i, _)| i).find(|&i| {
        haystack[..i]
            .chars()
            .next_back()
            .is_none_or(|c| !c.is_alphanumeric() && c != '_')
    })
}

/// Key used to match a receipt to a submit_sm_resp id: trim, upper-case, strip leading zeros when all hex digits (DOMAIN §3.6). "" stays "".
///
/// An all-zero id keeps one "0" so it does not collide with the empty id.
pub fn normalize_id(id: &str) -> String {
    let upper = id.trim().to_ascii_uppercase();
    if upper.is_empty() || !upper.bytes().all(|b| b.is_ascii_hexdigit()) {
        return upper;
    }
    let stripped = upper.trim_start_matches('0');
    if stripped.is_empty() {
        "0".to_owned()
    } else {
        stripped.to_owned()
    }
}

/// How one carrier's receipt ids are matched: its configured rule, and what `auto` learned.
pub struct IdMatching {
    rule: ReceiptIdRule,
    learner: Mutex<Learner>,
}

impl IdMatching {
    pub fn new(rule: ReceiptIdRule) -> IdMatching {
        IdMatching {
            rule,
            learner: Mutex::new(Learner::default()),
        }
    }

    fn learner(&self) -> std::sync::MutexGuard<'_, Learner> {
        self.learner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The key to match `id` by: converted by the configured (or learned) rule; under `auto`
    /// before it settles, the one reading of the id that a part of this carrier has.
    async fn key(&self, store: &dyn Store, carrier: &str, id: &str) -> Result<String, StoreError> {
        let fixed = IdForm::configured(self.rule).or_else(|| self.learner().settled());
        if let Some(form) = fixed {
            // An id that is not a number of that base is compared as given.
            return Ok(id::to_response_form(id, form).unwrap_or_else(|| normalize_id(id)));
        }
        let preferred = self.learner().preferred();
        let mut candidates = id::candidates(id, preferred);
        if candidates.len() == 1 {
            return Ok(candidates.swap_remove(0).1);
        }
        let keys: Vec<String> = candidates.iter().map(|(_, key)| key.clone()).collect();
        // A receipt that beat its submit_sm_resp matches nothing yet, and parked under the
        // wrong reading it would never match: give the response a moment first.
        for wait in EARLY_RECEIPT_WAITS
            .iter()
            .map(|&ms| Duration::from_millis(ms))
        {
            tokio::time::sleep(wait).await;
            let known = store.known_carrier_ids(carrier, &keys).await?;
            let matching: Vec<_> = candidates
                .iter()
                .filter(|(_, key)| known.contains(key))
                .collect();
            match matching.as_slice() {
                [] => continue,
                [(form, key)] => {
                    self.settle(carrier, *form);
                    return Ok(key.clone());
                }
                // Ambiguous: no evidence, the preferred reading.
                _ => break,
            }
        }
        Ok(candidates.swap_remove(0).1)
    }

    fn settle(&self, carrier: &str, form: IdForm) {
        if let Some(settled) = self.learner().observe(form) {
            tracing::info!(
                carrier,
                receipt_id = settled.as_str(),
                "receipt ids learned: this carrier's receipts match its responses read as `{}`; set receipt_id to it to skip the learning",
                settled.as_str()
            );
        }
    }
}

/// While `auto` learns, the waits (ms) before each lookup of a receipt's readings; one that
/// still matches none is then parked under the preferred one.
const EARLY_RECEIPT_WAITS: [u64; 4] = [0, 250, 500, 1000];

/// The deliver_sm handler of one carrier's binds: stores the receipt or inbound SMS, and only
/// then lets the session acknowledge it (so a crash makes the carrier send it again).
pub fn handler(
    store: Arc<dyn Store>,
    carrier: &CarrierConfig,
    live: crate::reload::Live,
    unmatched: Arc<UnmatchedLog>,
) -> crate::smpp::DeliverHandler {
    let name = carrier.name.clone();
    let ids = Arc::new(IdMatching::new(carrier.receipt_id));
    Arc::new(move |pdu: DeliverSm| {
        let store = store.clone();
        let carrier = name.clone();
        let live = live.clone();
        let ids = ids.clone();
        let unmatched = unmatched.clone();
        async move {
            let context = Context {
                store: &*store,
                carrier: &carrier,
                ids: &ids,
                unmatched: &unmatched,
            };
            handle(&context, &live.load().inbound, &pdu).await
        }
        .boxed()
    })
}

/// What handling one carrier's deliver_sm needs.
struct Context<'a> {
    store: &'a dyn Store,
    carrier: &'a str,
    ids: &'a IdMatching,
    unmatched: &'a UnmatchedLog,
}

async fn handle(
    context: &Context<'_>,
    inbound: &HashMap<String, InboundOwner>,
    pdu: &DeliverSm,
) -> u32 {
    let carrier = context.carrier;
    let stored = match classify(pdu) {
        Ok(Delivered::Receipt(receipt)) => store_receipt(context, receipt, pdu).await,
        Ok(Delivered::Inbound(sms)) => {
            crate::metrics::inbound(carrier);
            let owner = inbound.get(sms.to.trim_start_matches('+')).cloned();
            context.store.store_inbound(carrier, sms, owner).await
        }
        Err(error) => {
            // Acknowledged all the same: refusing it would only make the carrier resend it.
            tracing::warn!(carrier, %error, "unreadable delivery receipt dropped");
            crate::metrics::receipt_given_up(carrier, "unreadable", 1);
            let handset = c_string(pdu.source_addr.as_ref());
            context
                .unmatched
                .unreadable(carrier, &handset, error.to_string());
            Ok(())
        }
    };
    match stored {
        Ok(()) => ESME_ROK,
        Err(error) => {
            // Not stored: ask the carrier to send it again later rather than lose it.
            tracing::error!(carrier, %error, "storing a deliver_sm failed");
            ESME_RX_T_APPN
        }
    }
}

/// Matches the receipt's id by the carrier's rule and stores it.
async fn store_receipt(
    context: &Context<'_>,
    receipt: Receipt,
    pdu: &DeliverSm,
) -> Result<(), StoreError> {
    let carrier = context.carrier;
    let state = receipt.state;
    let key = context
        .ids
        .key(context.store, carrier, &receipt.carrier_message_id)
        .await?;
    let receipt = Receipt {
        carrier_message_id: key.clone(),
        ..receipt
    };
    let matched = context.store.apply_receipt(carrier, receipt).await?;
    let found = matched == crate::store::ReceiptMatch::Matched;
    crate::metrics::receipt(carrier, state.as_str(), found);
    tracing::debug!(carrier, state = state.as_str(), ?matched, "receipt");
    if !found {
        let handset = c_string(pdu.source_addr.as_ref());
        context.unmatched.parked(carrier, &key, &handset);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusmpp::tlvs::MessageDeliveryRequestTlvValue as Tlv;
    use rusmpp::types::{AnyOctetString, COctetString, OctetString};
    use rusmpp::values::{
        DataCoding, ErrorCodeNetworkType, EsmClass, MessagePayload, MessageState, NetworkErrorCode,
    };
    use std::str::FromStr;

    const DLR_TEXT: &str = "id:0e999f21 sub:001 dlvrd:001 submit date:2501311200 \
                            done date:2501311201 stat:DELIVRD err:000 text:Hello there";

    fn pdu(esm_class: u8, data_coding: u8, short_message: &[u8], tlvs: Vec<Tlv>) -> DeliverSm {
        DeliverSm::builder()
            .source_addr(COctetString::from_str("46701234567").unwrap())
            .destination_addr(COctetString::from_str("ACME").unwrap())
            .esm_class(EsmClass::from(esm_class))
            .data_coding(DataCoding::from(data_coding))
            .short_message(OctetString::from_slice(short_message).unwrap())
            .tlvs(tlvs)
            .build()
    }

    fn receipted_id(id: &str) -> Tlv {
        Tlv::ReceiptedMessageId(COctetString::from_str(id).unwrap())
    }

    fn receipt(id: &str, state: ReceiptState, err: Option<&str>) -> Delivered {
        Delivered::Receipt(Receipt {
            carrier_message_id: id.to_owned(),
            state,
            error_code: err.map(str::to_owned),
        })
    }

    #[test]
    fn state_words() {
        let cases = [
            ("DELIVRD", Some(ReceiptState::Delivered)),
            ("delivrd", Some(ReceiptState::Delivered)),
            ("UNDELIV", Some(ReceiptState::Undeliverable)),
            ("EXPIRED", Some(ReceiptState::Expired)),
            ("DELETED", Some(ReceiptState::Deleted)),
            ("ACCEPTD", Some(ReceiptState::Accepted)),
            ("UNKNOWN", Some(ReceiptState::Unknown)),
            ("REJECTD", Some(ReceiptState::Rejected)),
            ("ENROUTE", Some(ReceiptState::Enroute)),
            ("BUFFRED", Some(ReceiptState::Enroute)),
            ("BUFFERD", Some(ReceiptState::Enroute)),
            ("acked", Some(ReceiptState::Enroute)),
            (" DELIVRD ", Some(ReceiptState::Delivered)),
            ("SENT", None),
            ("", None),
        ];
        for (word, want) in cases {
            assert_eq!(ReceiptState::from_stat_word(word), want, "{word:?}");
        }
    }

    #[test]
    fn message_state_values() {
        for (v, state) in (0u8..).zip(ReceiptState::ALL) {
            assert_eq!(ReceiptState::from_message_state(v), Some(state));
        }
        assert_eq!(ReceiptState::from_message_state(10), None);
        assert_eq!(ReceiptState::from_message_state(255), None);
    }

    #[test]
    fn finality_and_names() {
        let non_final = [
            ReceiptState::Scheduled,
            ReceiptState::Enroute,
            ReceiptState::Accepted,
        ];
        for v in 0u8..=9 {
            let state = ReceiptState::from_message_state(v).unwrap();
            assert_eq!(state.is_final(), !non_final.contains(&state), "{state:?}");
        }
        assert_eq!(ReceiptState::Delivered.as_str(), "delivered");
        assert_eq!(ReceiptState::Undeliverable.as_str(), "undeliverable");
        assert_eq!(ReceiptState::Enroute.as_str(), "enroute");
        assert_eq!(ReceiptState::Skipped.as_str(), "skipped");
    }

    #[test]
    fn parse_text_variants() {
        let t = |id: &str, stat: Option<&str>, err: Option<&str>| {
            Some(TextReceipt {
                id: id.to_owned(),
                stat: stat.map(str::to_owned),
                err: err.map(str::to_owned),
            })
        };
        let cases = [
            // Appendix B as written.
            (
                "id:1234567890 sub:001 dlvrd:001 submit date:2501311200 done date:2501311201 stat:DELIVRD err:000 text:Hello",
                t("1234567890", Some("DELIVRD"), Some("000")),
            ),
            // 12-digit dates, capital Text:.
            (
                "id:5914401 sub:001 dlvrd:000 submit date:250131120059 done date:250131120105 stat:UNDELIV err:001 Text:Hi",
                t("5914401", Some("UNDELIV"), Some("001")),
            ),
            // 14-digit dates, upper-case keys, no text.
            (
                "ID:abc123 SUB:001 DLVRD:001 SUBMIT DATE:20250131120059 DONE DATE:20250131120105 STAT:EXPIRED ERR:0",
                t("abc123", Some("EXPIRED"), Some("0")),
            ),
            // Fields in another order.
            (
                "stat:REJECTD err:0B id:77 sub:001 dlvrd:000",
                t("77", Some("REJECTD"), Some("0B")),
            ),
            // Hex-like / alphanumeric err.
            (
                "id:0e999f21 stat:UNDELIV err:X1F",
                t("0e999f21", Some("UNDELIV"), Some("X1F")),
            ),
            // Missing stat and err.
            ("id:42 sub:001 dlvrd:000", t("42", None, None)),
            // The quoted text mentions keys of its own: the header wins.
            (
                "id:9 stat:DELIVRD err:000 text:my id:1 stat:EXPIRED",
                t("9", Some("DELIVRD"), Some("000")),
            ),
            // text: first, fields after it.
            (
                "text:hello id:5 stat:ENROUTE",
                t("5", Some("ENROUTE"), None),
            ),
            // A space after the colon.
            ("id: 31 stat: DELIVRD", t("31", Some("DELIVRD"), None)),
            // No id at all.
            ("sub:001 dlvrd:001 stat:DELIVRD", None),
            // Empty id followed by another key.
            ("id: sub:001 stat:DELIVRD", None),
            // "id:" inside another word is not the id.
            ("msgid:5 stat:DELIVRD", None),
            ("", None),
            ("just a normal text message", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_text(text), want, "{text:?}");
        }
    }

    #[test]
    fn normalize_id_cases() {
        let cases = [
            ("0e999f21", "E999F21"),
            ("E999F21", "E999F21"),
            ("  00123 ", "123"),
            ("000", "0"),
            ("", ""),
            ("   ", ""),
            ("abc-0012", "ABC-0012"),
            ("0abc-def", "0ABC-DEF"),
            ("5a3f21", "5A3F21"),
        ];
        for (id, want) in cases {
            assert_eq!(normalize_id(id), want, "{id:?}");
        }
        assert_eq!(normalize_id("0e999f21"), normalize_id("E999F21"));
    }

    #[test]
    fn tlv_receipt_prefers_tlvs() {
        let tlvs = vec![
            receipted_id("ABC123"),
            Tlv::MessageState(MessageState::Undeliverable),
            Tlv::NetworkErrorCode(NetworkErrorCode::new(ErrorCodeNetworkType::Gsm, 34)),
        ];
        // The text disagrees on every field; the TLVs win.
        let pdu = pdu(0x04, 0x00, DLR_TEXT.as_bytes(), tlvs);
        let want = receipt("ABC123", ReceiptState::Undeliverable, Some("3:34"));
        assert_eq!(classify(&pdu), Ok(want));
    }

    #[test]
    fn text_only_receipt() {
        let pdu = pdu(0x04, 0x00, DLR_TEXT.as_bytes(), vec![]);
        let want = receipt("0e999f21", ReceiptState::Delivered, Some("000"));
        assert_eq!(classify(&pdu), Ok(want));
    }

    #[test]
    fn payload_only_receipt() {
        let payload = MessagePayload::new(AnyOctetString::from_static_str(DLR_TEXT));
        let pdu = pdu(0x04, 0x00, b"", vec![Tlv::MessagePayload(payload)]);
        assert_eq!(pdu.sm_length(), 0);
        let want = receipt("0e999f21", ReceiptState::Delivered, Some("000"));
        assert_eq!(classify(&pdu), Ok(want));
    }

    #[test]
    fn tlv_id_without_message_state_uses_text_stat() {
        let text = b"id:111 sub:001 dlvrd:000 stat:EXPIRED err:027 text:";
        let pdu = pdu(0x04, 0x00, text, vec![receipted_id("6F")]);
        let want = receipt("6F", ReceiptState::Expired, Some("027"));
        assert_eq!(classify(&pdu), Ok(want));
    }

    #[test]
    fn intermediate_notification_and_sme_ack_are_receipts() {
        // No stat: word and no TLV id, so only esm_class makes these receipts.
        let state = || vec![Tlv::MessageState(MessageState::Enroute)];
        for esm in [0x04, 0x08, 0x20, 0x07, 0x44] {
            let got = classify(&pdu(esm, 0x00, b"id:5", state()));
            assert_eq!(
                got,
                Ok(receipt("5", ReceiptState::Enroute, None)),
                "{esm:#x}"
            );
        }
        for esm in [0x00, 0x10, 0x18, 0x03] {
            let got = classify(&pdu(esm, 0x00, b"id:5", state()));
            assert!(
                matches!(got, Ok(Delivered::Inbound(_))),
                "{esm:#x}: {got:?}"
            );
        }
    }

    #[test]
    fn unflagged_receipt_is_found_by_text_or_tlvs() {
        let got = classify(&pdu(0x00, 0x00, DLR_TEXT.as_bytes(), vec![]));
        let want = receipt("0e999f21", ReceiptState::Delivered, Some("000"));
        assert_eq!(got, Ok(want));

        let tlvs = vec![
            receipted_id("X9"),
            Tlv::MessageState(MessageState::Delivered),
        ];
        let got = classify(&pdu(0x00, 0x00, b"", tlvs));
        assert_eq!(got, Ok(receipt("X9", ReceiptState::Delivered, None)));
    }

    #[test]
    fn unreadable_receipts_are_errors() {
        let got = classify(&pdu(0x04, 0x00, b"stat:DELIVRD", vec![]));
        assert_eq!(got, Err(ReceiptError::MissingId));

        let got = classify(&pdu(0x04, 0x00, b"id:12 sub:001", vec![]));
        let id = "12".to_owned();
        assert_eq!(got, Err(ReceiptError::MissingState { id: id.clone() }));

        let got = classify(&pdu(0x04, 0x00, b"id:12 stat:SENT", vec![]));
        let state = "SENT".to_owned();
        assert_eq!(got, Err(ReceiptError::UnknownState { id, state }));

        let tlvs = vec![
            receipted_id("7"),
            Tlv::MessageState(MessageState::Other(42)),
        ];
        let got = classify(&pdu(0x04, 0x00, b"", tlvs));
        let (id, state) = ("7".to_owned(), "message_state 42".to_owned());
        assert_eq!(got, Err(ReceiptError::UnknownState { id, state }));

        let tlvs = vec![
            receipted_id("7"),
            Tlv::MessageState(MessageState::Other(42)),
        ];
        let got = classify(&pdu(0x04, 0x00, b"id:7 stat:DELIVRD", tlvs));
        assert_eq!(got, Ok(receipt("7", ReceiptState::Delivered, None)));
    }

    #[test]
    fn mo_sms_gsm() {
        // "Hej @ € å" in unpacked GSM-7.
        let bytes = [b'H', b'e', b'j', b' ', 0x00, b' ', 0x1B, 0x65, b' ', 0x0F];
        let got = classify(&pdu(0x00, 0x00, &bytes, vec![]));
        let want = Delivered::Inbound(InboundSms {
            from: "46701234567".to_owned(),
            to: "ACME".to_owned(),
            text: "Hej @ € å".to_owned(),
            concat: None,
        });
        assert_eq!(got, Ok(want));
    }

    #[test]
    fn mo_sms_ucs2() {
        let bytes: Vec<u8> = "Привет 👋"
            .encode_utf16()
            .flat_map(u16::to_be_bytes)
            .collect();
        let Ok(Delivered::Inbound(sms)) = classify(&pdu(0x00, 0x08, &bytes, vec![])) else {
            panic!("not an inbound SMS");
        };
        assert_eq!(sms.text, "Привет 👋");
        assert_eq!(sms.concat, None);
    }

    #[test]
    fn mo_sms_with_udh() {
        let mut bytes = vec![0x05, 0x00, 0x03, 0x7F, 0x02, 0x01];
        bytes.extend_from_slice(b"part one");
        let Ok(Delivered::Inbound(sms)) = classify(&pdu(0x40, 0x00, &bytes, vec![])) else {
            panic!("not an inbound SMS");
        };
        assert_eq!(sms.text, "part one");
        let concat = Concat {
            reference: 0x7F,
            total: 2,
            part: 1,
        };
        assert_eq!(sms.concat, Some(concat));
    }

    #[test]
    fn mo_sms_in_message_payload() {
        let payload = MessagePayload::new(AnyOctetString::from_static_str("long hello"));
        let got = classify(&pdu(0x00, 0x00, b"", vec![Tlv::MessagePayload(payload)]));
        let Ok(Delivered::Inbound(sms)) = got else {
            panic!("not an inbound SMS");
        };
        assert_eq!(sms.text, "long hello");
    }

    #[test]
    fn mo_mentioning_id_and_stat_stays_an_sms() {
        let got = classify(&pdu(0x00, 0x00, b"my id:42 stat:happy", vec![]));
        assert!(matches!(got, Ok(Delivered::Inbound(_))), "{got:?}");
    }

    proptest::proptest! {
        #[test]
        fn classify_and_parse_never_panic(
            esm in proptest::prelude::any::<u8>(),
            dc in proptest::prelude::any::<u8>(),
            sm in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..255),
            text in ".{0,200}",
        ) {
            let _ = classify(&pdu(esm, dc, &sm, vec![]));
            let _ = parse_text(&text);
            let _ = parse_text(&format!("id:{text} stat:{text}"));
            let _ = normalize_id(&text);
        }
    }

    #[test]
    fn classify_after_wire_round_trip() {
        use rusmpp::tokio_codec::CommandCodec;
        use rusmpp::{Command, CommandStatus};
        use tokio_util::codec::{Decoder, Encoder};

        let tlvs = vec![
            receipted_id("0A1B"),
            Tlv::MessageState(MessageState::Delivered),
        ];
        let sent = Command::builder()
            .status(CommandStatus::EsmeRok)
            .sequence_number(7)
            .pdu(pdu(0x04, 0x00, DLR_TEXT.as_bytes(), tlvs));
        let mut buf = bytes::BytesMut::new();
        CommandCodec::new().encode(&sent, &mut buf).unwrap();
        let back = CommandCodec::new().decode(&mut buf).unwrap().unwrap();
        let Some(rusmpp::Pdu::DeliverSm(dsm)) = back.pdu() else {
            panic!("not a deliver_sm");
        };
        let want = receipt("0A1B", ReceiptState::Delivered, Some("000"));
        assert_eq!(classify(dsm), Ok(want));
    }
}
