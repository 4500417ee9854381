//! The submit_sm PDUs of one message, in the carrier's multipart format (DOMAIN.md §2.5, §4.4):
//! a concatenation header in each part (`udh`), SAR TLVs on each part (`sar`), or the whole
//! text in one message_payload TLV (`payload`).

use rusmpp::pdus::SubmitSm;
use rusmpp::tlvs::MessageSubmissionRequestTlvValue as Tlv;
use rusmpp::types::{AnyOctetString, COctetString, OctetString};
use rusmpp::values::{DataCoding, EsmClass, MessagePayload, Npi, RegisteredDelivery, Ton};

use crate::config::Multipart;
use crate::encoding::{self, Encoding};
use crate::message::Sender;

/// esm_class bit 6: short_message starts with a user data header.
const UDHI: u8 = 0x40;

/// The submit_sm of each part of a message, numbered from 1. `parts` is what
/// `encoding::split` made: one bare payload, or several each starting with a concatenation UDH.
/// With `payload` a long message is one submit_sm (part 1), so it gets one id and one receipt.
pub fn submit_pdus(
    recipient_e164: &str,
    sender: &Sender,
    encoding: Encoding,
    format: Multipart,
    parts: Vec<Vec<u8>>,
) -> Vec<(u32, SubmitSm)> {
    let base = Base::new(recipient_e164, sender, encoding);
    if parts.len() <= 1 {
        let short_message = parts.into_iter().next().unwrap_or_default();
        return vec![(1, base.pdu(0x00, short_message, Vec::new()))];
    }
    match format {
        Multipart::Udh => numbered(parts)
            .map(|(n, part)| (n, base.pdu(UDHI, part, Vec::new())))
            .collect(),
        Multipart::Sar => numbered(parts)
            .map(|(n, part)| {
                let (concat, data) = encoding::strip_udh(&part);
                let tlvs = concat.map(sar_tlvs).unwrap_or_default();
                (n, base.pdu(0x00, data.to_vec(), tlvs))
            })
            .collect(),
        Multipart::Payload => {
            let text: Vec<u8> = parts
                .iter()
                .flat_map(|part| encoding::strip_udh(part).1.iter().copied())
                .collect();
            let payload = Tlv::MessagePayload(MessagePayload::new(AnyOctetString::from_vec(text)));
            vec![(1, base.pdu(0x00, Vec::new(), vec![payload]))]
        }
    }
}

fn numbered(parts: Vec<Vec<u8>>) -> impl Iterator<Item = (u32, Vec<u8>)> {
    (1u32..).zip(parts)
}

fn sar_tlvs(concat: encoding::Concat) -> Vec<Tlv> {
    vec![
        Tlv::SarMsgRefNum(concat.reference),
        Tlv::SarTotalSegments(concat.total),
        Tlv::SarSegmentSeqnum(concat.part),
    ]
}

/// What every part of a message shares.
struct Base {
    source_ton: Ton,
    source_npi: Npi,
    source: COctetString<1, 21>,
    destination: COctetString<1, 21>,
    data_coding: DataCoding,
}

impl Base {
    /// Numbers go out as international digits (TON 1, NPI 1); alphanumeric senders as TON 5,
    /// short codes as TON 3 (DOMAIN.md §5).
    fn new(recipient_e164: &str, sender: &Sender, encoding: Encoding) -> Base {
        let (source_ton, source_npi, source) = source_address(sender);
        Base {
            source_ton,
            source_npi,
            source,
            destination: recipient_e164
                .trim_start_matches('+')
                .parse()
                .unwrap_or_default(),
            data_coding: DataCoding::from(encoding.data_coding()),
        }
    }

    fn pdu(&self, esm_class: u8, short_message: Vec<u8>, tlvs: Vec<Tlv>) -> SubmitSm {
        SubmitSm::builder()
            .source_addr_ton(self.source_ton)
            .source_addr_npi(self.source_npi)
            .source_addr(self.source.clone())
            .dest_addr_ton(Ton::International)
            .dest_addr_npi(Npi::Isdn)
            .destination_addr(self.destination.clone())
            // rusmpp's EsmClass::default() is 0x08; always build it from the byte (CRATES.md
            // pitfall 1).
            .esm_class(EsmClass::from(esm_class))
            .registered_delivery(RegisteredDelivery::from(0x01u8))
            .data_coding(self.data_coding)
            .short_message(OctetString::from_vec(short_message).unwrap_or_default())
            .tlvs(tlvs)
            .build()
    }
}

/// The source address fields for a sender (submit_sm and query_sm name it the same way).
pub fn source_address(sender: &Sender) -> (Ton, Npi, COctetString<1, 21>) {
    let (ton, npi) = match sender {
        Sender::Alphanumeric(_) => (Ton::Alphanumeric, Npi::Unknown),
        Sender::Numeric(digits) if digits.len() <= 8 => (Ton::NetworkSpecific, Npi::Unknown),
        Sender::Numeric(_) => (Ton::International, Npi::Isdn),
    };
    (ton, npi, sender.as_str().parse().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusmpp::tlvs::TlvValue;

    fn alpha() -> Sender {
        Sender::Alphanumeric("iP1".into())
    }

    fn tlv_values(pdu: &SubmitSm) -> Vec<TlvValue> {
        pdu.tlvs()
            .iter()
            .filter_map(|t| t.value().cloned())
            .collect()
    }

    #[test]
    fn one_part_is_plain_whatever_the_format() {
        for format in [Multipart::Udh, Multipart::Sar, Multipart::Payload] {
            let pdus = submit_pdus(
                "+46701234567",
                &alpha(),
                Encoding::Gsm7,
                format,
                vec![b"hi".to_vec()],
            );
            assert_eq!(pdus.len(), 1);
            let (n, pdu) = &pdus[0];
            assert_eq!(*n, 1);
            assert_eq!(u8::from(pdu.esm_class), 0x00);
            assert_eq!(pdu.short_message().as_ref(), b"hi");
            assert!(pdu.tlvs().is_empty());
            assert_eq!(pdu.destination_addr.as_str(), "46701234567");
            assert_eq!(pdu.source_addr_ton, Ton::Alphanumeric);
        }
    }

    fn long_text() -> (Encoding, Vec<Vec<u8>>) {
        encoding::split(&"a".repeat(200), 0x2A)
    }

    #[test]
    fn udh_parts_carry_the_header_and_udhi() {
        let (encoding, parts) = long_text();
        let pdus = submit_pdus(
            "+46701234567",
            &Sender::Numeric("46700000000".into()),
            encoding,
            Multipart::Udh,
            parts,
        );
        assert_eq!(pdus.iter().map(|(n, _)| *n).collect::<Vec<_>>(), [1, 2]);
        for (n, pdu) in &pdus {
            assert_eq!(u8::from(pdu.esm_class), UDHI);
            let udh = &pdu.short_message().as_ref()[..6];
            assert_eq!(udh, [0x05, 0x00, 0x03, 0x2A, 2, *n as u8]);
            assert_eq!(pdu.source_addr_ton, Ton::International);
        }
    }

    #[test]
    fn sar_parts_carry_tlvs_and_no_header() {
        let (encoding, parts) = long_text();
        let pdus = submit_pdus("+46701234567", &alpha(), encoding, Multipart::Sar, parts);
        assert_eq!(pdus.len(), 2);
        for (n, pdu) in &pdus {
            assert_eq!(u8::from(pdu.esm_class), 0x00);
            assert!(pdu.short_message().as_ref().iter().all(|&b| b == b'a'));
            let tlvs = tlv_values(pdu);
            assert!(tlvs.contains(&TlvValue::SarMsgRefNum(0x2A)));
            assert!(tlvs.contains(&TlvValue::SarTotalSegments(2)));
            assert!(tlvs.contains(&TlvValue::SarSegmentSeqnum(*n as u8)));
        }
        let lengths: usize = pdus.iter().map(|(_, p)| p.short_message().len()).sum();
        assert_eq!(lengths, 200);
    }

    #[test]
    fn payload_is_one_submit_with_the_whole_text() {
        let (encoding, parts) = encoding::split(&"ü€".repeat(60), 1);
        assert!(parts.len() > 1);
        let pdus = submit_pdus(
            "+46701234567",
            &alpha(),
            encoding,
            Multipart::Payload,
            parts,
        );
        assert_eq!(pdus.len(), 1);
        let (n, pdu) = &pdus[0];
        assert_eq!(*n, 1);
        assert_eq!(pdu.sm_length(), 0);
        assert_eq!(u8::from(pdu.esm_class), 0x00);
        let Some(TlvValue::MessagePayload(payload)) = tlv_values(pdu).into_iter().next() else {
            panic!("no message_payload");
        };
        let text = encoding::decode(0x00, payload.value.as_ref());
        assert_eq!(text, "ü€".repeat(60));
    }
}
