//! Receipt ids that write the submit_sm_resp's number another way (DOMAIN.md §3.5 quirks 1–2).
//!
//! A carrier may answer submit_sm with `5A3F21` and write `id:5914401` in the receipt: the same
//! number, in hex and in decimal. [`to_response_form`] turns a receipt's id into the form the
//! response used, so that the store matches it by [`normalize_id`] as usual. With
//! `receipt_id = "auto"`, [`Learner`] finds the rule from the first receipts that match under
//! exactly one of them. Pure: no I/O, no locks.

use crate::config::ReceiptIdRule;

use super::normalize_id;

/// One way a receipt can write the response's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdForm {
    /// As the response wrote it (up to case and leading zeros).
    AsIs,
    /// The response's decimal number, written in hex.
    Hex,
    /// The response's hex number, written in decimal.
    Decimal,
}

impl IdForm {
    pub const ALL: [IdForm; 3] = [IdForm::AsIs, IdForm::Decimal, IdForm::Hex];

    /// The configuration word, for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            IdForm::AsIs => "as_is",
            IdForm::Hex => "hex",
            IdForm::Decimal => "decimal",
        }
    }

    /// The configured rule as a form; `None` for `auto`.
    pub fn configured(rule: ReceiptIdRule) -> Option<IdForm> {
        match rule {
            ReceiptIdRule::AsIs => Some(IdForm::AsIs),
            ReceiptIdRule::Hex => Some(IdForm::Hex),
            ReceiptIdRule::Decimal => Some(IdForm::Decimal),
            ReceiptIdRule::Auto => None,
        }
    }
}

/// The receipt id `id`, read as `form`, written the way the response wrote it and normalised
/// ([`normalize_id`]). `None` when `id` is not a number of that base that fits 64 bits.
///
/// `Decimal`: `5914401` → `5A3F21`. `Hex`: `5a3f21` → `5914401`. Leading zeros and surrounding
/// space are ignored; a sign, a `0x` prefix or anything else is not a number.
pub fn to_response_form(id: &str, form: IdForm) -> Option<String> {
    let id = id.trim();
    match form {
        IdForm::AsIs => Some(normalize_id(id)),
        IdForm::Decimal => parse(id, 10).map(|n| format!("{n:X}")),
        IdForm::Hex => parse(id, 16).map(|n| n.to_string()),
    }
}

/// Digits of `radix` only (no sign: `u64::from_str_radix` would take a leading `+`).
fn parse(digits: &str, radix: u32) -> Option<u64> {
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u64::from_str_radix(digits, radix).ok()
}

/// The keys to look a receipt up by, one per form it can be read as, `preferred` first; forms
/// that give the same key as an earlier one are left out.
pub fn candidates(id: &str, preferred: Option<IdForm>) -> Vec<(IdForm, String)> {
    let order = preferred
        .into_iter()
        .chain(IdForm::ALL.into_iter().filter(|f| Some(*f) != preferred));
    let mut keys: Vec<(IdForm, String)> = Vec::with_capacity(3);
    for form in order {
        if let Some(key) = to_response_form(id, form)
            && !keys.iter().any(|(_, k)| *k == key)
        {
            keys.push((form, key));
        }
    }
    keys
}

/// How many receipts in a row must match under one form, and under no other, before `auto`
/// settles on it.
pub const SETTLE_AFTER: u32 = 5;

/// Learns a carrier's form from receipts that matched under exactly one form.
#[derive(Debug, Default, Clone)]
pub struct Learner {
    settled: Option<IdForm>,
    streak: Option<(IdForm, u32)>,
}

impl Learner {
    /// The form settled on, once there is one.
    pub fn settled(&self) -> Option<IdForm> {
        self.settled
    }

    /// The form to try first: the settled one, else the one the current streak favours.
    pub fn preferred(&self) -> Option<IdForm> {
        self.settled.or(self.streak.map(|(form, _)| form))
    }

    /// Records that a receipt matched under `form` and no other. Returns the form when this
    /// observation settles it (once).
    pub fn observe(&mut self, form: IdForm) -> Option<IdForm> {
        if self.settled.is_some() {
            return None;
        }
        let count = match self.streak {
            Some((current, n)) if current == form => n + 1,
            _ => 1,
        };
        self.streak = Some((form, count));
        if count >= SETTLE_AFTER {
            self.settled = Some(form);
            return Some(form);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_documented_examples() {
        assert_eq!(
            to_response_form("5914401", IdForm::Decimal).as_deref(),
            Some("5A3F21")
        );
        assert_eq!(
            to_response_form("5a3f21", IdForm::Hex).as_deref(),
            Some("5914401")
        );
        assert_eq!(
            to_response_form(" 0e999f21 ", IdForm::AsIs).as_deref(),
            Some("E999F21")
        );
    }

    #[test]
    fn leading_zeros_and_space_do_not_change_the_number() {
        assert_eq!(
            to_response_form("0005914401", IdForm::Decimal).as_deref(),
            Some("5A3F21")
        );
        assert_eq!(
            to_response_form(" 005A3F21\t", IdForm::Hex).as_deref(),
            Some("5914401")
        );
        assert_eq!(to_response_form("0", IdForm::Decimal).as_deref(), Some("0"));
        assert_eq!(to_response_form("000", IdForm::Hex).as_deref(), Some("0"));
    }

    #[test]
    fn the_64_bit_range_converts_and_beyond_it_does_not() {
        let max = u64::MAX.to_string();
        assert_eq!(
            to_response_form(&max, IdForm::Decimal).as_deref(),
            Some("FFFFFFFFFFFFFFFF")
        );
        assert_eq!(to_response_form("ffffffffffffffff", IdForm::Hex), Some(max));
        // One more than u64::MAX: refused rather than wrapped into another message's id.
        assert_eq!(
            to_response_form("18446744073709551616", IdForm::Decimal),
            None
        );
        assert_eq!(to_response_form("10000000000000000", IdForm::Hex), None);
        // ...unless the extra digits are leading zeros.
        assert_eq!(
            to_response_form("00000000000000000001", IdForm::Decimal).as_deref(),
            Some("1")
        );
    }

    #[test]
    fn what_is_not_a_number_of_the_base_is_refused() {
        for id in ["", " ", "+12", "-12", "0x1F", "12a", "1 2", "٣"] {
            assert_eq!(to_response_form(id, IdForm::Decimal), None, "{id:?}");
        }
        for id in ["", "+1F", "0x1F", "1G", "abc-def"] {
            assert_eq!(to_response_form(id, IdForm::Hex), None, "{id:?}");
        }
        // As given, any id is a key: an opaque id is compared as a string.
        assert_eq!(
            to_response_form("abc-def", IdForm::AsIs).as_deref(),
            Some("ABC-DEF")
        );
    }

    #[test]
    fn candidates_put_the_preferred_form_first_and_skip_duplicates() {
        let keys = candidates("5914401", Some(IdForm::Decimal));
        assert_eq!(
            keys,
            vec![
                (IdForm::Decimal, "5A3F21".to_owned()),
                (IdForm::AsIs, "5914401".to_owned()),
                (IdForm::Hex, "93406209".to_owned()),
            ]
        );
        // A one-digit id reads the same in every base: one key.
        assert_eq!(candidates("7", None), vec![(IdForm::AsIs, "7".to_owned())]);
        // Not a number: only as given.
        assert_eq!(
            candidates("msg-1", None),
            vec![(IdForm::AsIs, "MSG-1".to_owned())]
        );
    }

    #[test]
    fn the_learner_settles_after_a_streak_and_says_so_once() {
        let mut learner = Learner::default();
        for _ in 1..SETTLE_AFTER {
            assert_eq!(learner.observe(IdForm::Decimal), None);
        }
        assert_eq!(learner.preferred(), Some(IdForm::Decimal));
        assert_eq!(learner.settled(), None);
        assert_eq!(learner.observe(IdForm::Decimal), Some(IdForm::Decimal));
        assert_eq!(learner.settled(), Some(IdForm::Decimal));
        assert_eq!(learner.observe(IdForm::Decimal), None, "said once");
        assert_eq!(learner.observe(IdForm::Hex), None);
        assert_eq!(learner.settled(), Some(IdForm::Decimal));
    }

    #[test]
    fn a_contradiction_restarts_the_streak() {
        let mut learner = Learner::default();
        for _ in 1..SETTLE_AFTER {
            learner.observe(IdForm::Hex);
        }
        learner.observe(IdForm::AsIs);
        for _ in 1..SETTLE_AFTER {
            assert_eq!(learner.observe(IdForm::Hex), None);
        }
        assert_eq!(learner.observe(IdForm::Hex), Some(IdForm::Hex));
    }

    proptest! {
        #[test]
        fn hex_and_decimal_round_trip(n in any::<u64>()) {
            let decimal = n.to_string();
            let hex = format!("{n:x}");
            prop_assert_eq!(to_response_form(&decimal, IdForm::Decimal), Some(format!("{n:X}")));
            prop_assert_eq!(to_response_form(&hex, IdForm::Hex), Some(decimal.clone()));
            // There and back again.
            let there = to_response_form(&decimal, IdForm::Decimal).unwrap();
            prop_assert_eq!(to_response_form(&there, IdForm::Hex), Some(decimal));
        }

        #[test]
        fn leading_zeros_never_matter(n in any::<u64>(), zeros in 0usize..12) {
            let pad = "0".repeat(zeros);
            let decimal = format!("{pad}{n}");
            let hex = format!("{pad}{n:X}");
            prop_assert_eq!(to_response_form(&decimal, IdForm::Decimal), Some(format!("{n:X}")));
            prop_assert_eq!(to_response_form(&hex, IdForm::Hex), Some(n.to_string()));
            prop_assert_eq!(
                to_response_form(&hex, IdForm::AsIs),
                to_response_form(&format!("{n:x}"), IdForm::AsIs)
            );
        }

        #[test]
        fn the_result_is_already_normalised(n in any::<u64>()) {
            for form in IdForm::ALL {
                if let Some(key) = to_response_form(&n.to_string(), form) {
                    prop_assert_eq!(normalize_id(&key), key);
                }
            }
        }

        #[test]
        fn garbage_never_panics(id in "\\PC{0,80}", bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            let lossy = String::from_utf8_lossy(&bytes).into_owned();
            for text in [id.as_str(), lossy.as_str()] {
                for form in IdForm::ALL {
                    let _ = to_response_form(text, form);
                }
                let keys = candidates(text, Some(IdForm::Hex));
                prop_assert!(keys.len() <= 3);
            }
        }
    }
}
