//! Text encoding for SMS: GSM-7 or UCS-2 choice, segment counting and splitting, UDH parsing and
//! decoding of inbound user data.
//!
//! This module knows nothing of SMPP: it turns text into `short_message` payloads and back.
//! GSM-7 is sent **unpacked** (one septet per octet) because that is what SMPP carriers expect
//! with data_coding 0x00 (DOMAIN §4.6). UCS-2 is really UTF-16BE so emoji survive as surrogate
//! pairs (DOMAIN §4.2); rusmpp-extra rejects those, which is why we encode ourselves.

/// Which alphabet a message is sent in. The whole message uses one: a single character outside
/// GSM 03.38 (+ extension table) turns all of it into UCS-2 (DOMAIN §4.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    Gsm7,
    Ucs2,
}

impl Encoding {
    /// The SMPP data_coding byte: 0x00 is "SMSC default alphabet", which carriers read as
    /// unpacked GSM 03.38; 0x08 is UCS-2.
    pub fn data_coding(self) -> u8 {
        match self {
            Encoding::Gsm7 => 0x00,
            Encoding::Ucs2 => 0x08,
        }
    }

    /// Stable name for the API and the database (matches the serde form).
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Gsm7 => "gsm7",
            Encoding::Ucs2 => "ucs2",
        }
    }

    /// (single-part limit, per-part limit with an 8-bit concatenation UDH) in units.
    /// The UDH takes 6 octets: 7 septets in GSM, 3 code units in UCS-2 (DOMAIN §4.3).
    fn limits(self) -> (usize, usize) {
        match self {
            Encoding::Gsm7 => (160, 153),
            Encoding::Ucs2 => (70, 67),
        }
    }

    /// Units one character costs: escape characters take 2 septets, non-BMP characters take
    /// 2 UTF-16 code units. Unencodable characters in GSM cost 1 (they become '?').
    fn cost(self, c: char) -> usize {
        match self {
            Encoding::Gsm7 => match gsm_septet(c) {
                Some(Septet::Ext(_)) => 2,
                _ => 1,
            },
            Encoding::Ucs2 => c.len_utf16(),
        }
    }
}

/// How a text will be sent: what the HTTP API reports and prices before anything is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub encoding: Encoding,
    pub segments: usize,
    /// Septets (escape characters count 2) for GSM-7, UTF-16 code units for UCS-2.
    pub units: usize,
}

/// Most parts one message can have: the UDH counters are one octet. Callers must reject texts
/// whose plan exceeds this; `split` does not fail but the UDH numbers would be wrong.
pub const MAX_SEGMENTS: usize = 255;

/// Length of the 8-bit-reference concatenation UDH `05 00 03 RR TT NN`.
const UDH_LEN: usize = 6;

/// Cheap: no allocation. Used by the HTTP API to answer `segments`/`encoding` and validate length.
pub fn plan(text: &str) -> Plan {
    let encoding = choose(text);
    let units = text.chars().map(|c| encoding.cost(c)).sum();
    let segments = count_parts(text, encoding, units);
    Plan {
        encoding,
        segments,
        units,
    }
}

/// GSM-7 when every character is in the default or extension table, else UCS-2.
fn choose(text: &str) -> Encoding {
    if text.chars().all(|c| gsm_septet(c).is_some()) {
        Encoding::Gsm7
    } else {
        Encoding::Ucs2
    }
}

/// Number of parts `split` will produce. Mirrors its greedy packing exactly (a 2-unit character
/// that does not fit moves whole to the next part), so plain division would undercount.
fn count_parts(text: &str, encoding: Encoding, units: usize) -> usize {
    let (single, multi) = encoding.limits();
    if units <= single {
        return 1;
    }
    let mut parts = 1;
    let mut used = 0;
    for c in text.chars() {
        let cost = encoding.cost(c);
        if used + cost > multi {
            parts += 1;
            used = 0;
        }
        used += cost;
    }
    parts
}

/// Every short_message payload to send, in order. One part: the bare payload. Several parts: each is
/// a concatenation UDH `05 00 03 <reference> <total> <n>` (n 1-based) followed by the payload.
/// GSM-7 is UNPACKED (one septet per octet, extension chars as 0x1B + code, an escape pair never split);
/// UCS-2 is UTF-16BE (emoji as surrogate pairs, a pair never split across parts).
/// Limits: single part 160 septets / 70 units; multipart 153 septets / 67 units per part.
/// parts.len() == plan(text).segments always. Empty text → one empty part.
pub fn split(text: &str, reference: u8) -> (Encoding, Vec<Vec<u8>>) {
    let plan = plan(text);
    let (single, multi) = plan.encoding.limits();
    if plan.units <= single {
        return (plan.encoding, vec![encode_all(text, plan.encoding)]);
    }
    let payloads = pack(text, plan.encoding, multi);
    let total = udh_counter(payloads.len());
    let parts = payloads
        .into_iter()
        .enumerate()
        .map(|(i, payload)| with_udh(reference, total, udh_counter(i + 1), &payload))
        .collect();
    (plan.encoding, parts)
}

/// Greedy packing of whole characters into payloads of at most `capacity` units.
fn pack(text: &str, encoding: Encoding, capacity: usize) -> Vec<Vec<u8>> {
    let mut parts = Vec::new();
    let mut current = Vec::new();
    let mut used = 0;
    for c in text.chars() {
        let cost = encoding.cost(c);
        if used + cost > capacity {
            parts.push(std::mem::take(&mut current));
            used = 0;
        }
        used += cost;
        encode_char(c, encoding, &mut current);
    }
    parts.push(current);
    parts
}

/// UDH counters are one octet; beyond 255 parts (rejected upstream) we saturate, never panic.
fn udh_counter(n: usize) -> u8 {
    u8::try_from(n).unwrap_or(u8::MAX)
}

fn with_udh(reference: u8, total: u8, part: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(UDH_LEN + payload.len());
    out.extend_from_slice(&[0x05, 0x00, 0x03, reference, total, part]);
    out.extend_from_slice(payload);
    out
}

fn encode_all(text: &str, encoding: Encoding) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() * 2);
    for c in text.chars() {
        encode_char(c, encoding, &mut out);
    }
    out
}

fn encode_char(c: char, encoding: Encoding, out: &mut Vec<u8>) {
    match encoding {
        Encoding::Gsm7 => match gsm_septet(c) {
            Some(Septet::Basic(code)) => out.push(code),
            Some(Septet::Ext(code)) => out.extend_from_slice(&[ESC, code]),
            None => out.push(b'?'),
        },
        Encoding::Ucs2 => {
            let mut buf = [0u16; 2];
            for unit in c.encode_utf16(&mut buf) {
                out.extend_from_slice(&unit.to_be_bytes());
            }
        }
    }
}

/// Concatenation info found in a UDH.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Concat {
    pub reference: u16,
    pub total: u8,
    pub part: u8,
}

/// Splits a short_message that has a UDH (caller knows UDHI is set) into (concat info if IEI 0x00
/// or 0x08 present, user data after the UDH). Malformed UDH → None, and the whole input as data.
///
/// A concat IE with the wrong length or impossible numbers (total 0, part 0, part > total) is
/// ignored, as TS 23.040 tells receivers to do, but the UDH is still stripped.
pub fn strip_udh(bytes: &[u8]) -> (Option<Concat>, &[u8]) {
    let Some((&udhl, rest)) = bytes.split_first() else {
        return (None, bytes);
    };
    let Some((header, data)) = rest.split_at_checked(usize::from(udhl)) else {
        return (None, bytes);
    };
    match concat_in(header) {
        Ok(concat) => (concat, data),
        Err(Malformed) => (None, bytes),
    }
}

struct Malformed;

/// Walks the information elements `IEI IEDL data…`; the last valid concat IE wins.
fn concat_in(mut header: &[u8]) -> Result<Option<Concat>, Malformed> {
    let mut found = None;
    while let [iei, iedl, rest @ ..] = header {
        let (data, next) = rest.split_at_checked(usize::from(*iedl)).ok_or(Malformed)?;
        if let Some(concat) = concat_ie(*iei, data) {
            found = Some(concat);
        }
        header = next;
    }
    if header.is_empty() {
        Ok(found)
    } else {
        Err(Malformed)
    }
}

fn concat_ie(iei: u8, data: &[u8]) -> Option<Concat> {
    let concat = match (iei, data) {
        (0x00, &[reference, total, part]) => Concat {
            reference: u16::from(reference),
            total,
            part,
        },
        (0x08, &[hi, lo, total, part]) => Concat {
            reference: u16::from_be_bytes([hi, lo]),
            total,
            part,
        },
        _ => return None,
    };
    let plausible = concat.total > 0 && concat.part > 0 && concat.part <= concat.total;
    plausible.then_some(concat)
}

/// Decodes inbound user data for display/storage: 0x00 GSM-7 unpacked (with escapes; unknown codes → '?'),
/// 0x01 ASCII, 0x03 Latin-1, 0x08 UTF-16BE (lossy; odd trailing byte ignored), anything else → lossy UTF-8. Never panics.
pub fn decode(data_coding: u8, bytes: &[u8]) -> String {
    match data_coding {
        0x00 => decode_gsm(bytes),
        0x01 => bytes
            .iter()
            .map(|&b| if b.is_ascii() { char::from(b) } else { '?' })
            .collect(),
        0x03 => bytes.iter().map(|&b| char::from(b)).collect(),
        0x08 => decode_utf16be(bytes),
        _ => String::from_utf8_lossy(bytes).into_owned(),
    }
}

fn decode_utf16be(bytes: &[u8]) -> String {
    let units = bytes
        .chunks_exact(2)
        .map(|pair| u16::from_be_bytes([pair[0], pair[1]]));
    char::decode_utf16(units)
        .map(|r| r.unwrap_or(char::REPLACEMENT_CHARACTER))
        .collect()
}

/// Unpacked septets. An escape followed by a code missing from the extension table (or by
/// nothing) becomes one '?': showing the base-table character, as handsets do, would hide
/// that something was lost.
fn decode_gsm(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    let mut iter = bytes.iter();
    while let Some(&b) = iter.next() {
        let c = if b == ESC {
            iter.next()
                .and_then(|&code| gsm_ext_char(code))
                .unwrap_or('?')
        } else {
            GSM_BASIC.get(usize::from(b)).copied().unwrap_or('?')
        };
        out.push(c);
    }
    out
}

/// Escape to the GSM extension table.
const ESC: u8 = 0x1B;

/// One character in GSM 03.38: a default-table code, or an extension code sent after ESC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Septet {
    Basic(u8),
    Ext(u8),
}

/// GSM 03.38 default alphabet + extension table (DOMAIN §4.1). A match, so `plan()` needs no
/// allocation or hashing; the ASCII ranges that share their code with GSM come first.
fn gsm_septet(c: char) -> Option<Septet> {
    use Septet::{Basic, Ext};
    let septet = match c {
        ' '..='#' | '%'..='?' | 'A'..='Z' | 'a'..='z' => Basic(c as u8),
        '@' => Basic(0x00),
        '£' => Basic(0x01),
        '$' => Basic(0x02),
        '¥' => Basic(0x03),
        'è' => Basic(0x04),
        'é' => Basic(0x05),
        'ù' => Basic(0x06),
        'ì' => Basic(0x07),
        'ò' => Basic(0x08),
        'Ç' => Basic(0x09),
        '\n' => Basic(0x0A),
        'Ø' => Basic(0x0B),
        'ø' => Basic(0x0C),
        '\r' => Basic(0x0D),
        'Å' => Basic(0x0E),
        'å' => Basic(0x0F),
        '\u{0394}' => Basic(0x10), // Δ
        '_' => Basic(0x11),
        '\u{03A6}' => Basic(0x12), // Φ
        '\u{0393}' => Basic(0x13), // Γ
        '\u{039B}' => Basic(0x14), // Λ
        '\u{03A9}' => Basic(0x15), // Ω
        '\u{03A0}' => Basic(0x16), // Π
        '\u{03A8}' => Basic(0x17), // Ψ
        '\u{03A3}' => Basic(0x18), // Σ
        '\u{0398}' => Basic(0x19), // Θ
        '\u{039E}' => Basic(0x1A), // Ξ
        'Æ' => Basic(0x1C),
        'æ' => Basic(0x1D),
        'ß' => Basic(0x1E),
        'É' => Basic(0x1F),
        '¤' => Basic(0x24),
        '¡' => Basic(0x40),
        'Ä' => Basic(0x5B),
        'Ö' => Basic(0x5C),
        'Ñ' => Basic(0x5D),
        'Ü' => Basic(0x5E),
        '§' => Basic(0x5F),
        '¿' => Basic(0x60),
        'ä' => Basic(0x7B),
        'ö' => Basic(0x7C),
        'ñ' => Basic(0x7D),
        'ü' => Basic(0x7E),
        'à' => Basic(0x7F),
        '\u{0C}' => Ext(0x0A), // form feed
        '^' => Ext(0x14),
        '{' => Ext(0x28),
        '}' => Ext(0x29),
        '\\' => Ext(0x2F),
        '[' => Ext(0x3C),
        '~' => Ext(0x3D),
        ']' => Ext(0x3E),
        '|' => Ext(0x40),
        '€' => Ext(0x65),
        _ => return None,
    };
    Some(septet)
}

fn gsm_ext_char(code: u8) -> Option<char> {
    let c = match code {
        0x0A => '\u{0C}',
        0x14 => '^',
        0x28 => '{',
        0x29 => '}',
        0x2F => '\\',
        0x3C => '[',
        0x3D => '~',
        0x3E => ']',
        0x40 => '|',
        0x65 => '€',
        _ => return None,
    };
    Some(c)
}

/// Default table indexed by septet. 0x1B (ESC) is never looked up here; '?' fills its slot.
#[rustfmt::skip]
const GSM_BASIC: [char; 128] = [
    '@', '£', '$', '¥', 'è', 'é', 'ù', 'ì', 'ò', 'Ç', '\n', 'Ø', 'ø', '\r', 'Å', 'å',
    '\u{0394}', '_', '\u{03A6}', '\u{0393}', '\u{039B}', '\u{03A9}', '\u{03A0}', '\u{03A8}',
    '\u{03A3}', '\u{0398}', '\u{039E}', '?', 'Æ', 'æ', 'ß', 'É',
    ' ', '!', '"', '#', '¤', '%', '&', '\'', '(', ')', '*', '+', ',', '-', '.', '/',
    '0', '1', '2', '3', '4', '5', '6', '7', '8', '9', ':', ';', '<', '=', '>', '?',
    '¡', 'A', 'B', 'C', 'D', 'E', 'F', 'G', 'H', 'I', 'J', 'K', 'L', 'M', 'N', 'O',
    'P', 'Q', 'R', 'S', 'T', 'U', 'V', 'W', 'X', 'Y', 'Z', 'Ä', 'Ö', 'Ñ', 'Ü', '§',
    '¿', 'a', 'b', 'c', 'd', 'e', 'f', 'g', 'h', 'i', 'j', 'k', 'l', 'm', 'n', 'o',
    'p', 'q', 'r', 's', 't', 'u', 'v', 'w', 'x', 'y', 'z', 'ä', 'ö', 'ñ', 'ü', 'à',
];

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Decodes parts the way a handset would, to check `split` loses nothing.
    fn reassemble(encoding: Encoding, parts: &[Vec<u8>]) -> String {
        let multipart = parts.len() > 1;
        parts
            .iter()
            .map(|part| {
                let data = if multipart { strip_udh(part).1 } else { part };
                decode(encoding.data_coding(), data)
            })
            .collect()
    }

    #[test]
    fn encoding_names_and_data_coding() {
        assert_eq!(Encoding::Gsm7.data_coding(), 0x00);
        assert_eq!(Encoding::Ucs2.data_coding(), 0x08);
        assert_eq!(Encoding::Gsm7.as_str(), "gsm7");
        assert_eq!(Encoding::Ucs2.as_str(), "ucs2");
        let json = serde_json::to_string(&Encoding::Ucs2).unwrap();
        assert_eq!(json, "\"ucs2\"");
        let back: Encoding = serde_json::from_str("\"gsm7\"").unwrap();
        assert_eq!(back, Encoding::Gsm7);
    }

    #[test]
    fn gsm_tables_are_consistent() {
        for code in 0u8..128 {
            if code == ESC {
                continue;
            }
            let c = GSM_BASIC[usize::from(code)];
            assert_eq!(gsm_septet(c), Some(Septet::Basic(code)), "code {code:#04x}");
        }
        for code in 0u8..=255 {
            if let Some(c) = gsm_ext_char(code) {
                assert_eq!(gsm_septet(c), Some(Septet::Ext(code)), "ext {code:#04x}");
            }
        }
    }

    #[test]
    fn gsm_table_spot_checks() {
        assert_eq!(gsm_septet('@'), Some(Septet::Basic(0x00)));
        assert_eq!(gsm_septet('§'), Some(Septet::Basic(0x5F)));
        assert_eq!(gsm_septet('Ç'), Some(Septet::Basic(0x09)));
        assert_eq!(gsm_septet('ç'), None);
        assert_eq!(gsm_septet('`'), None);
        assert_eq!(gsm_septet('\u{1B}'), None);
        assert_eq!(gsm_septet('€'), Some(Septet::Ext(0x65)));
        assert_eq!(plan("åäöÅÄÖÉé").encoding, Encoding::Gsm7);
    }

    #[test]
    fn empty_text_is_one_empty_part() {
        assert_eq!(
            plan(""),
            Plan {
                encoding: Encoding::Gsm7,
                segments: 1,
                units: 0
            }
        );
        assert_eq!(split("", 7), (Encoding::Gsm7, vec![Vec::new()]));
    }

    #[test]
    fn gsm_160_is_one_part_161_is_two() {
        let text = "a".repeat(160);
        assert_eq!(plan(&text).segments, 1);
        let (enc, parts) = split(&text, 1);
        assert_eq!(enc, Encoding::Gsm7);
        assert_eq!(parts, vec![vec![b'a'; 160]]);

        let text = "a".repeat(161);
        assert_eq!(plan(&text).segments, 2);
        let (_, parts) = split(&text, 1);
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].len(), 6 + 153);
        assert_eq!(parts[1].len(), 6 + 8);
    }

    #[test]
    fn gsm_153_per_part_math() {
        for (len, segments) in [(306, 2), (307, 3), (459, 3), (460, 4)] {
            let p = plan(&"x".repeat(len));
            assert_eq!((p.units, p.segments), (len, segments), "len {len}");
        }
    }

    #[test]
    fn extension_chars_count_two() {
        let p = plan("€[]");
        assert_eq!((p.encoding, p.units, p.segments), (Encoding::Gsm7, 6, 1));
        let text = "€".repeat(80);
        assert_eq!(plan(&text).segments, 1);
        assert_eq!(plan(&(text + "a")).segments, 2);
    }

    #[test]
    fn extension_char_at_part_boundary_moves_whole() {
        // 152 septets, then '€' (2) would end the first part on ESC: it must move.
        let text = format!("{}€{}", "a".repeat(152), "b".repeat(10));
        let p = plan(&text);
        assert_eq!((p.units, p.segments), (164, 2));
        let (_, parts) = split(&text, 9);
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].len(), 6 + 152);
        assert_ne!(parts[0].last(), Some(&ESC));
        assert_eq!(&parts[1][6..9], &[ESC, 0x65, b'b']);
        assert_eq!(reassemble(Encoding::Gsm7, &parts), text);
    }

    #[test]
    fn extension_moves_can_add_a_part() {
        // 306 septets fit 2×153 by division, but 152 'a' + 77 '€' cannot pack that tightly.
        let text = format!("{}{}", "a".repeat(152), "€".repeat(77));
        let p = plan(&text);
        assert_eq!(p.units, 306);
        assert_eq!(p.segments, 3);
        assert_eq!(split(&text, 0).1.len(), 3);
    }

    #[test]
    fn udh_bytes_exact() {
        let (_, parts) = split(&"a".repeat(200), 0xAB);
        assert_eq!(parts.len(), 2);
        assert_eq!(&parts[0][..6], &[0x05, 0x00, 0x03, 0xAB, 0x02, 0x01]);
        assert_eq!(&parts[1][..6], &[0x05, 0x00, 0x03, 0xAB, 0x02, 0x02]);
        assert_eq!(parts[0].len(), 159);
        assert_eq!(parts[1].len(), 6 + 47);
    }

    #[test]
    fn ucs2_70_is_one_part_71_is_two() {
        let text = "Ж".repeat(70);
        let p = plan(&text);
        assert_eq!((p.encoding, p.units, p.segments), (Encoding::Ucs2, 70, 1));
        let (enc, parts) = split(&text, 3);
        assert_eq!(enc, Encoding::Ucs2);
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].len(), 140);
        assert_eq!(&parts[0][..2], &[0x04, 0x16]);

        let text = "Ж".repeat(71);
        assert_eq!(plan(&text).segments, 2);
        let (_, parts) = split(&text, 3);
        assert_eq!(parts[0].len(), 6 + 134);
        assert_eq!(parts[1].len(), 6 + 8);
    }

    #[test]
    fn one_non_gsm_char_makes_everything_ucs2() {
        let text = format!("{}ç", "a".repeat(100));
        let p = plan(&text);
        assert_eq!((p.encoding, p.units, p.segments), (Encoding::Ucs2, 101, 2));
    }

    #[test]
    fn emoji_is_a_surrogate_pair() {
        let (enc, parts) = split("👍", 0);
        assert_eq!(enc, Encoding::Ucs2);
        assert_eq!(parts, vec![vec![0xD8, 0x3D, 0xDC, 0x4D]]);
        assert_eq!(plan("👍").units, 2);
    }

    #[test]
    fn emoji_at_67_boundary_moves_whole() {
        let text = format!("{}😀{}", "Ж".repeat(66), "Ж".repeat(10));
        let p = plan(&text);
        assert_eq!((p.units, p.segments), (78, 2));
        let (_, parts) = split(&text, 5);
        assert_eq!(parts[0].len(), 6 + 132);
        assert_eq!(&parts[1][6..10], &[0xD8, 0x3D, 0xDE, 0x00]);
        assert_eq!(reassemble(Encoding::Ucs2, &parts), text);
    }

    #[test]
    fn five_part_ucs2_text_with_emoji() {
        // 300 + 2 = 302 units: 5 parts of at most 67 units.
        let text = format!("{}🎉{}", "Ж".repeat(150), "Ж".repeat(150));
        let p = plan(&text);
        assert_eq!((p.encoding, p.units, p.segments), (Encoding::Ucs2, 302, 5));
        let (_, parts) = split(&text, 42);
        assert_eq!(parts.len(), 5);
        for (i, part) in parts.iter().enumerate() {
            assert_eq!(&part[..6], &[0x05, 0x00, 0x03, 42, 5, i as u8 + 1]);
            assert!(part.len() <= 140);
        }
        assert_eq!(reassemble(Encoding::Ucs2, &parts), text);
    }

    #[test]
    fn strip_udh_8bit_and_16bit() {
        let pdu = [0x05, 0x00, 0x03, 0x2A, 0x03, 0x02, b'h', b'i'];
        let concat = Concat {
            reference: 0x2A,
            total: 3,
            part: 2,
        };
        assert_eq!(strip_udh(&pdu), (Some(concat), &b"hi"[..]));

        let pdu = [0x06, 0x08, 0x04, 0x12, 0x34, 0x02, 0x01, b'x'];
        let concat = Concat {
            reference: 0x1234,
            total: 2,
            part: 1,
        };
        assert_eq!(strip_udh(&pdu), (Some(concat), &b"x"[..]));
    }

    #[test]
    fn strip_udh_other_ies_and_malformed() {
        // Port addressing IE only: stripped, no concat.
        let pdu = [0x06, 0x05, 0x04, 0x0B, 0x84, 0x23, 0xF0, b'z'];
        assert_eq!(strip_udh(&pdu), (None, &b"z"[..]));
        // Port IE then concat IE.
        let pdu = [
            0x0B, 0x05, 0x04, 0x0B, 0x84, 0x23, 0xF0, 0x00, 0x03, 0x01, 0x02, 0x01, b'z',
        ];
        let (concat, data) = strip_udh(&pdu);
        assert_eq!(concat.map(|c| (c.total, c.part)), Some((2, 1)));
        assert_eq!(data, b"z");
        // UDHL longer than the input.
        let pdu = [0x09, 0x00, 0x03, 0x01];
        assert_eq!(strip_udh(&pdu), (None, &pdu[..]));
        // IE length overruns the UDH.
        let pdu = [0x03, 0x00, 0x05, 0x01, b'a'];
        assert_eq!(strip_udh(&pdu), (None, &pdu[..]));
        // Dangling IEI byte.
        let pdu = [0x01, 0x00, b'a'];
        assert_eq!(strip_udh(&pdu), (None, &pdu[..]));
        assert_eq!(strip_udh(&[]), (None, &[][..]));
        // Impossible numbering is ignored but the UDH still goes.
        let pdu = [0x05, 0x00, 0x03, 0x01, 0x02, 0x03, b'q'];
        assert_eq!(strip_udh(&pdu), (None, &b"q"[..]));
    }

    #[test]
    fn decode_each_data_coding() {
        assert_eq!(
            decode(0x00, &[0x00, 0x5F, 0x11, b'A', ESC, 0x65, 0x7B]),
            "@§_A€ä"
        );
        assert_eq!(decode(0x00, &[ESC, 0x41, b'a', ESC]), "?a?");
        assert_eq!(decode(0x00, &[0x80, 0xFF]), "??");
        assert_eq!(decode(0x01, b"Hi@\xE9"), "Hi@?");
        assert_eq!(decode(0x03, b"caf\xE9"), "café");
        assert_eq!(
            decode(0x08, &[0x00, 0x48, 0xD8, 0x3D, 0xDC, 0x4D, 0x00]),
            "H👍"
        );
        assert_eq!(decode(0x08, &[0xD8, 0x3D]), "\u{FFFD}");
        assert_eq!(decode(0x04, "hé".as_bytes()), "hé");
        assert_eq!(decode(0x02, b"a\xFFb"), "a\u{FFFD}b");
    }

    fn gsm_char() -> impl Strategy<Value = char> {
        prop_oneof![
            4 => proptest::sample::select(GSM_BASIC.iter().copied().filter(|&c| c != '?').collect::<Vec<_>>()),
            1 => proptest::sample::select(vec!['€', '[', ']', '{', '}', '~', '^', '|', '\\', '\u{0C}']),
            1 => proptest::sample::select(vec!['å', 'ä', 'ö', 'Å', 'Ä', 'Ö']),
        ]
    }

    fn any_text_char() -> impl Strategy<Value = char> {
        prop_oneof![
            6 => gsm_char(),
            1 => proptest::sample::select(vec!['😀', '👍', '🎉', '𝄞', 'ç', 'Ж', '中', '`']),
            1 => any::<char>(),
        ]
    }

    fn text(ch: impl Strategy<Value = char>) -> impl Strategy<Value = String> {
        proptest::collection::vec(ch, 0..700).prop_map(|v| v.into_iter().collect())
    }

    fn check_split(text: &str, reference: u8) -> Result<(), TestCaseError> {
        let p = plan(text);
        let (enc, parts) = split(text, reference);
        prop_assert_eq!(enc, p.encoding);
        prop_assert_eq!(parts.len(), p.segments);
        let limit = match (enc, parts.len()) {
            (Encoding::Ucs2, _) => 140,
            (Encoding::Gsm7, 1) => 160,
            (Encoding::Gsm7, _) => 159,
        };
        for part in &parts {
            prop_assert!(part.len() <= limit, "part of {} > {}", part.len(), limit);
            match enc {
                Encoding::Gsm7 => prop_assert_ne!(part.last(), Some(&ESC)),
                Encoding::Ucs2 => {
                    prop_assert_eq!(part.len() % 2, 0);
                    let last = part.len().checked_sub(2).map(|i| part[i]);
                    prop_assert!(!matches!(last, Some(0xD8..=0xDB)), "ends on high surrogate");
                }
            }
        }
        prop_assert_eq!(reassemble(enc, &parts), text);
        Ok(())
    }

    proptest! {
        #[test]
        fn split_round_trips_mixed_text(s in text(any_text_char()), reference in any::<u8>()) {
            check_split(&s, reference)?;
        }

        #[test]
        fn split_round_trips_gsm_text(s in text(gsm_char()), reference in any::<u8>()) {
            prop_assert_eq!(plan(&s).encoding, Encoding::Gsm7);
            check_split(&s, reference)?;
        }

        #[test]
        fn split_round_trips_emoji_heavy_text(
            s in text(prop_oneof![Just('😀'), Just('Ж'), Just('ö')]),
            reference in any::<u8>(),
        ) {
            check_split(&s, reference)?;
        }

        #[test]
        fn decode_and_strip_udh_never_panic(dc in any::<u8>(), bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(dc, &bytes);
            let (_, data) = strip_udh(&bytes);
            prop_assert!(data.len() <= bytes.len());
        }
    }
}
