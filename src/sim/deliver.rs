//! The deliver_sm PDUs the simulated carrier originates: delivery receipts and mobile-originated
//! messages, plus the GSM-7 / UCS-2 encoding the MO path needs.

use std::str::FromStr;

use rusmpp::{
    pdus::DeliverSm,
    tlvs::MessageDeliveryRequestTlvValue,
    types::{AnyOctetString, COctetString, OctetString},
    values::{DataCoding, EsmClass, MessagePayload, MessageState, Npi, RegisteredDelivery, Ton},
};
use time::{OffsetDateTime, format_description::BorrowedFormatItem, macros::format_description};

use super::SimError;

/// esm_class of an SMSC delivery receipt (SMPP 3.4 §5.2.12, message type bits 5-2 = 0001).
const ESM_CLASS_RECEIPT: u8 = 0x04;
/// esm_class of a plain mobile-originated message. Set explicitly: `EsmClass::default()` encodes
/// as 0x08 in rusmpp 0.4.0 (CRATES.md §2 pitfall 1).
const ESM_CLASS_MO: u8 = 0x00;
/// Receipt dates are `YYMMDDhhmm` (SMPP 3.4 Appendix B), in UTC.
const RECEIPT_DATE: &[BorrowedFormatItem<'static>] =
    format_description!("[year repr:last_two][month][day][hour][minute]");
/// Longest text that fits `short_message`; longer MOs travel in the message_payload TLV.
const MAX_SHORT_MESSAGE: usize = 254;

/// Final state a simulated receipt reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// `stat:DELIVRD err:000`, message_state 2.
    Delivered,
    /// `stat:UNDELIV err:001`, message_state 5.
    Undeliverable,
}

impl Outcome {
    /// Whether a submit with this `registered_delivery` asked for a receipt with this outcome.
    ///
    /// Bits 1-0 select the MC delivery receipt (SMPP 3.4 §5.2.17, 5.0 §4.7.21): 01 = on success or
    /// failure, 10 = on failure only, 11 = on success only (5.0).
    pub(super) fn requested_by(self, registered_delivery: u8) -> bool {
        match registered_delivery & 0x03 {
            0x01 => true,
            0x02 => self == Outcome::Undeliverable,
            0x03 => self == Outcome::Delivered,
            _ => false,
        }
    }

    /// The message_state a query_sm answer reports once the receipt is due.
    pub(super) fn message_state(self) -> MessageState {
        self.parts().3
    }

    fn parts(self) -> (&'static str, &'static str, &'static str, MessageState) {
        match self {
            Outcome::Delivered => ("001", "DELIVRD", "000", MessageState::Delivered),
            Outcome::Undeliverable => ("000", "UNDELIV", "001", MessageState::Undeliverable),
        }
    }
}

/// What a receipt needs to remember about its submit_sm between the response and the receipt.
#[derive(Debug, Clone)]
pub(super) struct ReceiptJob {
    pub message_id: String,
    pub outcome: Outcome,
    /// The submit's source; becomes the receipt's destination.
    pub source: (Ton, Npi, COctetString<1, 21>),
    /// The submit's destination (the handset); becomes the receipt's source.
    pub destination: (Ton, Npi, COctetString<1, 21>),
    pub submitted_at: OffsetDateTime,
    /// Send receipted_message_id and message_state TLVs besides the text.
    pub tlvs: bool,
}

/// The de-facto receipt text (SMPP 3.4 Appendix B). `text:` stays empty so that no message
/// content travels back, as with carriers that strip it for privacy.
pub(super) fn receipt_text(
    message_id: &str,
    outcome: Outcome,
    submitted_at: OffsetDateTime,
    done_at: OffsetDateTime,
) -> String {
    let (dlvrd, stat, err, _) = outcome.parts();
    let submit = submitted_at.format(RECEIPT_DATE).unwrap_or_default();
    let done = done_at.format(RECEIPT_DATE).unwrap_or_default();
    format!(
        "id:{message_id} sub:001 dlvrd:{dlvrd} submit date:{submit} done date:{done} stat:{stat} err:{err} text:"
    )
}

impl ReceiptJob {
    /// The receipt deliver_sm, dated `done_at`.
    pub(super) fn to_deliver_sm(&self, done_at: OffsetDateTime) -> DeliverSm {
        let (_, _, _, state) = self.outcome.parts();
        let text = receipt_text(&self.message_id, self.outcome, self.submitted_at, done_at);
        let mut builder = DeliverSm::builder()
            .source_addr_ton(self.destination.0)
            .source_addr_npi(self.destination.1)
            .source_addr(self.destination.2.clone())
            .dest_addr_ton(self.source.0)
            .dest_addr_npi(self.source.1)
            .destination_addr(self.source.2.clone())
            .esm_class(EsmClass::from(ESM_CLASS_RECEIPT))
            .registered_delivery(RegisteredDelivery::from(0u8))
            .data_coding(DataCoding::McSpecific);
        // The id is ASCII digits of at most 20 characters, so both conversions always succeed.
        if let Ok(short_message) = OctetString::from_string(text) {
            builder = builder.short_message(short_message);
        }
        if !self.tlvs {
            return builder.build();
        }
        builder = builder.push_tlv(MessageDeliveryRequestTlvValue::MessageState(state));
        if let Ok(id) = COctetString::from_str(&self.message_id) {
            builder = builder.push_tlv(MessageDeliveryRequestTlvValue::ReceiptedMessageId(id));
        }
        builder.build()
    }
}

/// A mobile-originated deliver_sm (esm_class 0x00) from `from` to `to`.
///
/// The text goes as unpacked GSM-7 (data_coding 0x00) if every character is in the GSM 03.38
/// default alphabet or its extension table, otherwise as UCS-2 (0x08, UTF-16BE, surrogate pairs
/// passed through). Text longer than `short_message` allows goes in message_payload.
pub(super) fn mo_deliver_sm(from: &str, to: &str, text: &str) -> Result<DeliverSm, SimError> {
    let (source_ton, source_npi, source) = address("from", from)?;
    let (dest_ton, dest_npi, destination) = address("to", to)?;
    let (data_coding, bytes) = match gsm7_unpacked(text) {
        Some(bytes) => (DataCoding::McSpecific, bytes),
        None => (
            DataCoding::Ucs2,
            text.encode_utf16().flat_map(u16::to_be_bytes).collect(),
        ),
    };
    let builder = DeliverSm::builder()
        .source_addr_ton(source_ton)
        .source_addr_npi(source_npi)
        .source_addr(source)
        .dest_addr_ton(dest_ton)
        .dest_addr_npi(dest_npi)
        .destination_addr(destination)
        .esm_class(EsmClass::from(ESM_CLASS_MO))
        .registered_delivery(RegisteredDelivery::from(0u8))
        .data_coding(data_coding);
    let builder = if bytes.len() <= MAX_SHORT_MESSAGE {
        let short_message = OctetString::from_vec(bytes).map_err(|_| SimError::TextTooLong)?;
        builder.short_message(short_message)
    } else if bytes.len() <= usize::from(u16::MAX) {
        builder.push_tlv(MessageDeliveryRequestTlvValue::MessagePayload(
            MessagePayload::new(AnyOctetString::from_vec(bytes)),
        ))
    } else {
        return Err(SimError::TextTooLong);
    };
    Ok(builder.build())
}

/// Splits an address into TON/NPI and digits: `+4917…` is international ISDN (the `+` is
/// dropped, SMPP carries bare digits), other digit strings are unknown-TON ISDN, anything else
/// is alphanumeric.
fn address(field: &'static str, raw: &str) -> Result<(Ton, Npi, COctetString<1, 21>), SimError> {
    let (ton, npi, value) = match raw.strip_prefix('+') {
        Some(digits) if is_digits(digits) => (Ton::International, Npi::Isdn, digits),
        _ if is_digits(raw) => (Ton::Unknown, Npi::Isdn, raw),
        _ => (Ton::Alphanumeric, Npi::Unknown, raw),
    };
    let value = COctetString::from_str(value).map_err(|_| SimError::InvalidAddress { field })?;
    Ok((ton, npi, value))
}

fn is_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// GSM 03.38 default alphabet, indexed by septet value. 0x1B is the escape to the extension
/// table and never matches a character (it is a placeholder here).
const GSM7_BASIC: [char; 128] = [
    '@', '£', '$', '¥', 'è', 'é', 'ù', 'ì', 'ò', 'Ç', '\n', 'Ø', 'ø', '\r', 'Å', 'å', //
    'Δ', '_', 'Φ', 'Γ', 'Λ', 'Ω', 'Π', 'Ψ', 'Σ', 'Θ', 'Ξ', '\u{1B}', 'Æ', 'æ', 'ß', 'É', //
    ' ', '!', '"', '#', '¤', '%', '&', '\'', '(', ')', '*', '+', ',', '-', '.', '/', //
    '0', '1', '2', '3', '4', '5', '6', '7', '8', '9', ':', ';', '<', '=', '>', '?', //
    '¡', 'A', 'B', 'C', 'D', 'E', 'F', 'G', 'H', 'I', 'J', 'K', 'L', 'M', 'N', 'O', //
    'P', 'Q', 'R', 'S', 'T', 'U', 'V', 'W', 'X', 'Y', 'Z', 'Ä', 'Ö', 'Ñ', 'Ü', '§', //
    '¿', 'a', 'b', 'c', 'd', 'e', 'f', 'g', 'h', 'i', 'j', 'k', 'l', 'm', 'n', 'o', //
    'p', 'q', 'r', 's', 't', 'u', 'v', 'w', 'x', 'y', 'z', 'ä', 'ö', 'ñ', 'ü', 'à', //
];

/// GSM 03.38 extension table: characters sent as 0x1B followed by this septet.
const GSM7_EXTENSION: [(char, u8); 10] = [
    ('\u{0C}', 0x0A),
    ('^', 0x14),
    ('{', 0x28),
    ('}', 0x29),
    ('\\', 0x2F),
    ('[', 0x3C),
    ('~', 0x3D),
    (']', 0x3E),
    ('|', 0x40),
    ('€', 0x65),
];

/// `text` as unpacked GSM-7 septets (one per octet), or `None` if a character is outside the
/// default alphabet and its extension table.
fn gsm7_unpacked(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        if c == '\u{1B}' {
            return None;
        }
        if let Some(septet) = GSM7_BASIC.iter().position(|&g| g == c) {
            out.push(septet as u8);
        } else if let Some(&(_, septet)) = GSM7_EXTENSION.iter().find(|(g, _)| *g == c) {
            out.extend_from_slice(&[0x1B, septet]);
        } else {
            return None;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn receipt_text_follows_appendix_b_without_message_text() {
        let at = datetime!(2026-11-28 09:05 UTC);
        let done = datetime!(2026-11-28 09:06 UTC);
        assert_eq!(
            receipt_text("123456789", Outcome::Delivered, at, done),
            "id:123456789 sub:001 dlvrd:001 submit date:2611280905 done date:2611280906 stat:DELIVRD err:000 text:"
        );
        assert!(
            receipt_text("1", Outcome::Undeliverable, at, done).contains(
                "dlvrd:000 submit date:2611280905 done date:2611280906 stat:UNDELIV err:001"
            )
        );
    }

    #[test]
    fn receipts_follow_registered_delivery_bits() {
        assert!(!Outcome::Delivered.requested_by(0x00));
        assert!(Outcome::Delivered.requested_by(0x01));
        assert!(Outcome::Undeliverable.requested_by(0x01));
        assert!(!Outcome::Delivered.requested_by(0x02));
        assert!(Outcome::Undeliverable.requested_by(0x02));
        assert!(Outcome::Delivered.requested_by(0x03));
        assert!(!Outcome::Undeliverable.requested_by(0x03));
        // Higher bits (SME acks, intermediate notifications) do not change the MC receipt.
        assert!(Outcome::Delivered.requested_by(0x11));
    }

    #[test]
    fn receipt_esm_class_round_trips_as_0x04() {
        assert_eq!(u8::from(EsmClass::from(ESM_CLASS_RECEIPT)), 0x04);
        assert_eq!(u8::from(EsmClass::from(ESM_CLASS_MO)), 0x00);
    }

    #[test]
    fn gsm7_maps_to_03_38_code_points_not_ascii() {
        assert_eq!(gsm7_unpacked("A@_$").unwrap(), vec![0x41, 0x00, 0x11, 0x02]);
        assert_eq!(gsm7_unpacked("€[").unwrap(), vec![0x1B, 0x65, 0x1B, 0x3C]);
        assert!(
            gsm7_unpacked("Grüße").is_some(),
            "ü and ß are in the default alphabet"
        );
        assert_eq!(gsm7_unpacked("façade"), None, "only the capital Ç is GSM");
    }

    #[test]
    fn mo_text_picks_gsm7_or_ucs2() {
        let gsm = mo_deliver_sm("+491701234567", "12345", "Hi there").unwrap();
        assert_eq!(gsm.data_coding, DataCoding::McSpecific);
        assert_eq!(gsm.short_message().as_ref(), b"Hi there");
        assert_eq!(gsm.source_addr.as_str(), "491701234567");
        assert_eq!(gsm.source_addr_ton, Ton::International);
        assert_eq!(u8::from(gsm.esm_class), 0x00);

        let ucs2 = mo_deliver_sm("491701234567", "ACME", "Привет 👍").unwrap();
        assert_eq!(ucs2.data_coding, DataCoding::Ucs2);
        let expected: Vec<u8> = "Привет 👍"
            .encode_utf16()
            .flat_map(u16::to_be_bytes)
            .collect();
        assert_eq!(ucs2.short_message().as_ref(), expected.as_slice());
        assert_eq!(ucs2.dest_addr_ton, Ton::Alphanumeric);
    }

    #[test]
    fn long_mo_text_travels_in_message_payload() {
        let text = "x".repeat(400);
        let pdu = mo_deliver_sm("1", "2", &text).unwrap();
        assert!(pdu.short_message().as_ref().is_empty());
        assert_eq!(pdu.tlvs().len(), 1);
    }

    #[test]
    fn addresses_longer_than_twenty_characters_are_refused() {
        let err = mo_deliver_sm("123456789012345678901", "2", "x").unwrap_err();
        assert!(matches!(err, SimError::InvalidAddress { field: "from" }));
    }
}
