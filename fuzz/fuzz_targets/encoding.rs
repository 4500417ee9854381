//! Text to SMS parts and back (`smsgw::encoding`): the plan the API answers agrees with the
//! parts `split` makes, every part fits one SMS, and decoding the parts as a handset would
//! gives the text back. Inbound user data (any bytes) decodes without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use smsgw::encoding::{Encoding, MAX_SEGMENTS, decode, plan, split, strip_udh};

/// Octets of one part: 140 of UCS-2; GSM-7 goes unpacked, one septet per octet, so 160.
fn max_part(encoding: Encoding) -> usize {
    match encoding {
        Encoding::Gsm7 => 160,
        Encoding::Ucs2 => 140,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&reference, rest)) = data.split_first() else {
        return;
    };
    // Any bytes as inbound user data, in every data_coding we decode.
    for data_coding in [0x00, 0x01, 0x03, 0x08, 0x04] {
        let _ = decode(data_coding, rest);
        let (_, user_data) = strip_udh(rest);
        let _ = decode(data_coding, user_data);
    }

    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let planned = plan(text);
    let (encoding, parts) = split(text, reference);
    assert_eq!(encoding, planned.encoding);
    assert_eq!(parts.len(), planned.segments, "segments for {text:?}");
    if planned.segments > MAX_SEGMENTS {
        // The API refuses such texts (`text_too_long`); the UDH numbers cannot count them.
        return;
    }
    for part in &parts {
        assert!(
            part.len() <= max_part(encoding),
            "a part of {} octets",
            part.len()
        );
    }
    let multipart = parts.len() > 1;
    let mut reassembled = String::new();
    for (n, part) in parts.iter().enumerate() {
        let payload = if multipart {
            let (concat, payload) = strip_udh(part);
            let concat = concat.expect("every part of a long message has a concatenation UDH");
            assert_eq!(usize::from(concat.part), n + 1);
            assert_eq!(usize::from(concat.total), parts.len());
            assert_eq!(concat.reference, u16::from(reference));
            payload
        } else {
            part.as_slice()
        };
        // Each part decodes alone: one that ended inside a GSM escape or a surrogate pair
        // would not come back equal.
        reassembled.push_str(&decode(encoding.data_coding(), payload));
    }
    assert_eq!(reassembled, text);
});
