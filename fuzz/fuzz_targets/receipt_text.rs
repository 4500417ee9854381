//! Delivery receipt texts (SMPP 3.4 Appendix B, and what carriers make of it) through
//! `smsgw::receipt::parse_text` and the id normalisation receipts are matched with.
#![no_main]

use libfuzzer_sys::fuzz_target;
use smsgw::receipt::{normalize_id, parse_text};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Some(receipt) = parse_text(&text) {
        // A value is one token: no whitespace, no "key:" swallowed into it.
        for value in [
            Some(&receipt.id),
            receipt.stat.as_ref(),
            receipt.err.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            assert!(!value.is_empty(), "empty value in {text:?}");
            assert!(
                !value.contains(char::is_whitespace),
                "{value:?} in {text:?}"
            );
            assert!(!value.contains(':'), "{value:?} in {text:?}");
        }
        let key = normalize_id(&receipt.id);
        assert_eq!(normalize_id(&key), key, "normalize_id is idempotent");
    }
    let key = normalize_id(&text);
    assert_eq!(normalize_id(&key), key, "normalize_id is idempotent");
});
