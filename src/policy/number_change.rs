//! Number changes (policy rule 3, DOMAIN §7): a number that was deactivated or changed after the
//! recipient consented may now belong to someone else, who must not get the message.
//!
//! The registry holds events per number (reported by customers through the API or CLI, imported
//! from disconnection lists, or inferred from carrier errors); these functions decide from the
//! events the caller fetched. Times are unix milliseconds, as stored.

use std::time::Duration;

/// What happened to a number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeKind {
    /// The number is no longer the customer's and has no successor we know of.
    Deactivated,
    /// The customer moved to `new_number` (E.164).
    Changed { new_number: String },
}

impl ChangeKind {
    /// Stable name for the database, the API and refusal reasons.
    pub fn as_str(&self) -> &'static str {
        match self {
            ChangeKind::Deactivated => "deactivated",
            ChangeKind::Changed { .. } => "changed",
        }
    }
}

/// One registry entry of a number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeEvent {
    pub kind: ChangeKind,
    /// When the number stopped being the customer's (unix ms); may be before the report.
    pub effective_at: i64,
}

/// What to do with a message to a number, as far as number changes go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NumberDecision {
    Send,
    /// `kind` is [`ChangeKind::as_str`] of the deciding event.
    Refuse {
        kind: &'static str,
        effective_at: i64,
    },
    /// The account follows number changes and the number was changed to `to` after consent.
    Redirect {
        to: String,
        effective_at: i64,
    },
}

/// Rule 3: the latest event that is effective (`effective_at <= now`) and later than consent
/// decides. Deactivated → Refuse; Changed → Redirect when `follow`, else Refuse.
///
/// - `consent_at` None means "no consent time known": every effective event counts. This is the
///   strict reading: never text a number that may have changed hands.
/// - An event exactly at `consent_at` does not count: consent given at that instant was given by
///   the number's new holder (as the US RND answers "disconnected on or after" a date, §7.1, a
///   change must be strictly after consent to void it).
/// - Future-dated events (`effective_at > now`) are ignored until they take effect: the customer
///   still holds the number until then.
/// - Events may come in any order. The latest one wins because it is the number's current
///   state: changed-then-deactivated refuses, an older change superseded by a newer one
///   redirects to the newer number.
/// - Several events at the same latest instant: deactivated wins over changed, and two changes
///   to different numbers refuse (as `changed`) rather than guess where the person went. The
///   result never depends on the slice order.
/// - A change without a new number (never accepted by [`check_report`], but imports are not
///   checked) refuses: there is nowhere to redirect to.
///
/// A redirect is for this number only; the caller decides the new number again (it may itself
/// have changed) with the same consent time, since the consent belongs to the person who moved,
/// and should bound the chain of redirects.
pub fn decide(
    events: &[ChangeEvent],
    consent_at: Option<i64>,
    now: i64,
    follow: bool,
) -> NumberDecision {
    let counts = |event: &&ChangeEvent| {
        event.effective_at <= now && consent_at.is_none_or(|consent| event.effective_at > consent)
    };
    let Some(latest) = events.iter().filter(counts).map(|e| e.effective_at).max() else {
        return NumberDecision::Send;
    };
    let deciding: Vec<&ChangeEvent> = events
        .iter()
        .filter(counts)
        .filter(|e| e.effective_at == latest)
        .collect();
    let refuse = |kind: &ChangeKind| NumberDecision::Refuse {
        kind: kind.as_str(),
        effective_at: latest,
    };
    if deciding
        .iter()
        .any(|e| matches!(e.kind, ChangeKind::Deactivated))
    {
        return refuse(&ChangeKind::Deactivated);
    }
    let mut targets = deciding.iter().filter_map(|e| match &e.kind {
        ChangeKind::Changed { new_number } => Some(new_number),
        ChangeKind::Deactivated => None,
    });
    let Some(first) = targets.next() else {
        // Unreachable: at least one event is at `latest` and none is deactivated.
        return NumberDecision::Send;
    };
    let unanimous = targets.all(|other| other == first);
    if follow && unanimous && !first.trim().is_empty() {
        NumberDecision::Redirect {
            to: first.clone(),
            effective_at: latest,
        }
    } else {
        refuse(&ChangeKind::Changed {
            new_number: first.clone(),
        })
    }
}

/// Why a reported change is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    #[error(
        "effective_at is more than {max_hours} hours in the past; reports may be backdated at most that far"
    )]
    TooOld { max_hours: u64 },
    #[error("effective_at is more than 1 year in the future")]
    TooFarAhead,
    #[error("a changed number needs new_number, different from the number")]
    BadNewNumber,
}

/// How far ahead a change may be scheduled: farther is almost surely a typo in the year.
const MAX_AHEAD_MS: i128 = 365 * 24 * 3600 * 1000;

/// Checks a report made through the API or CLI; bulk imports of disconnection lists are not
/// limited (they are historical by nature).
///
/// `effective_at` may be at most `max_backdate` before `now` (policy: 48 h, configurable; exactly
/// 48 h is accepted). The limit exists because backdating cancels queued messages and rewrites
/// which past sends were allowed; the policy gives customers 48 hours to report, so an older
/// date is a mistake or an attempt to void consents wholesale. At most a year ahead.
///
/// `number` and `new_number` are expected in E.164 (parsed by the caller, which also checks that
/// `new_number` is a valid number); they are compared by their digits, so formatting does not
/// hide a change to the same number. The new number is checked first: it is wrong whatever the
/// time. `max_hours` in [`ReportError::TooOld`] is the limit in whole hours (rounded down).
pub fn check_report(
    kind: &ChangeKind,
    number: &str,
    effective_at: i64,
    now: i64,
    max_backdate: Duration,
) -> Result<(), ReportError> {
    if let ChangeKind::Changed { new_number } = kind {
        let new_digits = digits(new_number);
        if new_digits.is_empty() || new_digits == digits(number) {
            return Err(ReportError::BadNewNumber);
        }
    }
    // i128: neither the difference of two i64 nor a Duration in ms can overflow it.
    let age = i128::from(now) - i128::from(effective_at);
    let max_age = i128::try_from(max_backdate.as_millis()).unwrap_or(i128::MAX);
    if age > max_age {
        return Err(ReportError::TooOld {
            max_hours: max_backdate.as_secs() / 3600,
        });
    }
    if -age > MAX_AHEAD_MS {
        return Err(ReportError::TooFarAhead);
    }
    Ok(())
}

fn digits(number: &str) -> String {
    number.chars().filter(char::is_ascii_digit).collect()
}

/// Carrier feedback (DOMAIN §7.4): a number is suspect once `failures` permanent "unknown
/// subscriber"-type results reached `threshold`; threshold 0 disables. One failure is not
/// enough by default because carriers also return these codes for transient HLR trouble; a
/// suspect number's messages are held for review, not refused, for the same reason.
pub fn is_suspect(failures: u32, threshold: u32) -> bool {
    threshold > 0 && failures >= threshold
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONSENT: i64 = 1_000_000;
    const NOW: i64 = 10_000_000;

    fn deactivated(at: i64) -> ChangeEvent {
        ChangeEvent {
            kind: ChangeKind::Deactivated,
            effective_at: at,
        }
    }

    fn changed(at: i64, to: &str) -> ChangeEvent {
        ChangeEvent {
            kind: ChangeKind::Changed {
                new_number: to.to_owned(),
            },
            effective_at: at,
        }
    }

    fn refuse(kind: &'static str, at: i64) -> NumberDecision {
        NumberDecision::Refuse {
            kind,
            effective_at: at,
        }
    }

    fn redirect(to: &str, at: i64) -> NumberDecision {
        NumberDecision::Redirect {
            to: to.to_owned(),
            effective_at: at,
        }
    }

    const B: &str = "+46701111111";
    const C: &str = "+46702222222";

    /// (name, events, consent_at, now, follow, expected)
    type DecideCase = (
        &'static str,
        Vec<ChangeEvent>,
        Option<i64>,
        i64,
        bool,
        NumberDecision,
    );

    fn decide_cases() -> Vec<DecideCase> {
        use NumberDecision::Send;
        vec![
            ("no events", vec![], Some(CONSENT), NOW, false, Send),
            ("no events, no consent", vec![], None, NOW, true, Send),
            // Deactivated relative to consent.
            (
                "deactivated before consent",
                vec![deactivated(CONSENT - 1)],
                Some(CONSENT),
                NOW,
                false,
                Send,
            ),
            (
                "deactivated at consent",
                vec![deactivated(CONSENT)],
                Some(CONSENT),
                NOW,
                false,
                Send,
            ),
            (
                "deactivated 1 ms after consent",
                vec![deactivated(CONSENT + 1)],
                Some(CONSENT),
                NOW,
                false,
                refuse("deactivated", CONSENT + 1),
            ),
            (
                "deactivated after consent, follow does not matter",
                vec![deactivated(CONSENT + 1)],
                Some(CONSENT),
                NOW,
                true,
                refuse("deactivated", CONSENT + 1),
            ),
            // Effective time relative to now.
            (
                "deactivated exactly now",
                vec![deactivated(NOW)],
                Some(CONSENT),
                NOW,
                false,
                refuse("deactivated", NOW),
            ),
            (
                "deactivated 1 ms in the future",
                vec![deactivated(NOW + 1)],
                Some(CONSENT),
                NOW,
                false,
                Send,
            ),
            (
                "deactivated in the future, no consent",
                vec![deactivated(NOW + 1)],
                None,
                NOW,
                false,
                Send,
            ),
            // No consent time: every effective event counts.
            (
                "no consent, old deactivation",
                vec![deactivated(0)],
                None,
                NOW,
                false,
                refuse("deactivated", 0),
            ),
            (
                "no consent, negative time",
                vec![deactivated(-5)],
                None,
                NOW,
                false,
                refuse("deactivated", -5),
            ),
            (
                "no consent, changed, follow",
                vec![changed(5, B)],
                None,
                NOW,
                true,
                redirect(B, 5),
            ),
            (
                "no consent, changed, no follow",
                vec![changed(5, B)],
                None,
                NOW,
                false,
                refuse("changed", 5),
            ),
            // Changed: redirect or refuse by follow.
            (
                "changed after consent, follow",
                vec![changed(CONSENT + 1, B)],
                Some(CONSENT),
                NOW,
                true,
                redirect(B, CONSENT + 1),
            ),
            (
                "changed after consent, no follow",
                vec![changed(CONSENT + 1, B)],
                Some(CONSENT),
                NOW,
                false,
                refuse("changed", CONSENT + 1),
            ),
            (
                "changed at consent",
                vec![changed(CONSENT, B)],
                Some(CONSENT),
                NOW,
                true,
                Send,
            ),
            (
                "changed before consent",
                vec![changed(CONSENT - 1, B)],
                Some(CONSENT),
                NOW,
                true,
                Send,
            ),
            (
                "changed in the future",
                vec![changed(NOW + 1, B)],
                Some(CONSENT),
                NOW,
                true,
                Send,
            ),
            (
                "changed to blank, follow",
                vec![changed(CONSENT + 1, " ")],
                Some(CONSENT),
                NOW,
                true,
                refuse("changed", CONSENT + 1),
            ),
            // Several events: the latest effective one after consent wins.
            (
                "changed then deactivated",
                vec![changed(CONSENT + 1, B), deactivated(CONSENT + 2)],
                Some(CONSENT),
                NOW,
                true,
                refuse("deactivated", CONSENT + 2),
            ),
            (
                "changed then deactivated, reversed slice",
                vec![deactivated(CONSENT + 2), changed(CONSENT + 1, B)],
                Some(CONSENT),
                NOW,
                true,
                refuse("deactivated", CONSENT + 2),
            ),
            (
                "deactivated then changed",
                vec![deactivated(CONSENT + 1), changed(CONSENT + 2, B)],
                Some(CONSENT),
                NOW,
                true,
                redirect(B, CONSENT + 2),
            ),
            (
                "two changes, latest wins",
                vec![changed(CONSENT + 2, C), changed(CONSENT + 1, B)],
                Some(CONSENT),
                NOW,
                true,
                redirect(C, CONSENT + 2),
            ),
            (
                "deactivated before consent, changed after",
                vec![deactivated(CONSENT - 10), changed(CONSENT + 1, B)],
                Some(CONSENT),
                NOW,
                true,
                redirect(B, CONSENT + 1),
            ),
            (
                "changed before consent, deactivated after",
                vec![changed(CONSENT - 10, B), deactivated(CONSENT + 1)],
                Some(CONSENT),
                NOW,
                true,
                refuse("deactivated", CONSENT + 1),
            ),
            (
                "changed after consent, deactivated in the future",
                vec![changed(CONSENT + 1, B), deactivated(NOW + 1)],
                Some(CONSENT),
                NOW,
                true,
                redirect(B, CONSENT + 1),
            ),
            (
                "all events before consent",
                vec![
                    changed(CONSENT - 2, B),
                    deactivated(CONSENT - 1),
                    changed(CONSENT, C),
                ],
                Some(CONSENT),
                NOW,
                true,
                Send,
            ),
            // Ties at the latest instant.
            (
                "same instant changed and deactivated",
                vec![changed(CONSENT + 1, B), deactivated(CONSENT + 1)],
                Some(CONSENT),
                NOW,
                true,
                refuse("deactivated", CONSENT + 1),
            ),
            (
                "same instant deactivated and changed",
                vec![deactivated(CONSENT + 1), changed(CONSENT + 1, B)],
                Some(CONSENT),
                NOW,
                true,
                refuse("deactivated", CONSENT + 1),
            ),
            (
                "same instant, two different new numbers",
                vec![changed(CONSENT + 1, B), changed(CONSENT + 1, C)],
                Some(CONSENT),
                NOW,
                true,
                refuse("changed", CONSENT + 1),
            ),
            (
                "same instant, the same new number twice",
                vec![changed(CONSENT + 1, B), changed(CONSENT + 1, B)],
                Some(CONSENT),
                NOW,
                true,
                redirect(B, CONSENT + 1),
            ),
            // Extreme times do not overflow.
            (
                "event at i64::MIN, no consent",
                vec![deactivated(i64::MIN)],
                None,
                i64::MAX,
                false,
                refuse("deactivated", i64::MIN),
            ),
            (
                "consent at i64::MAX",
                vec![deactivated(i64::MAX)],
                Some(i64::MAX),
                i64::MAX,
                false,
                Send,
            ),
            (
                "event at i64::MAX, now i64::MAX",
                vec![deactivated(i64::MAX)],
                Some(0),
                i64::MAX,
                false,
                refuse("deactivated", i64::MAX),
            ),
        ]
    }

    #[test]
    fn decide_table() {
        for (name, events, consent_at, now, follow, expected) in decide_cases() {
            assert_eq!(
                decide(&events, consent_at, now, follow),
                expected,
                "case `{name}`"
            );
            // Order independence: the reversed slice decides the same.
            let reversed: Vec<ChangeEvent> = events.iter().rev().cloned().collect();
            assert_eq!(
                decide(&reversed, consent_at, now, follow),
                expected,
                "case `{name}`, events reversed"
            );
        }
    }

    const H: i64 = 3600 * 1000;
    const DAY: i64 = 24 * H;
    const REPORT_NOW: i64 = 1_750_000_000_000;
    const NUMBER: &str = "+46701234567";
    const NUMBER_B: &str = "+46709876543";

    /// (name, kind, effective_at, now, max_backdate, expected)
    type ReportCase = (
        &'static str,
        ChangeKind,
        i64,
        i64,
        Duration,
        Result<(), ReportError>,
    );

    #[test]
    fn check_report_table() {
        let policy = Duration::from_secs(48 * 3600);
        let too_old = Err(ReportError::TooOld { max_hours: 48 });
        let to = |n: &str| ChangeKind::Changed {
            new_number: n.to_owned(),
        };
        let cases: Vec<ReportCase> = vec![
            (
                "now",
                ChangeKind::Deactivated,
                REPORT_NOW,
                REPORT_NOW,
                policy,
                Ok(()),
            ),
            (
                "1 h ago",
                ChangeKind::Deactivated,
                REPORT_NOW - H,
                REPORT_NOW,
                policy,
                Ok(()),
            ),
            (
                "47h59m ago",
                ChangeKind::Deactivated,
                REPORT_NOW - 47 * H - 59 * 60_000,
                REPORT_NOW,
                policy,
                Ok(()),
            ),
            (
                "exactly 48 h ago",
                ChangeKind::Deactivated,
                REPORT_NOW - 48 * H,
                REPORT_NOW,
                policy,
                Ok(()),
            ),
            (
                "48 h + 1 ms ago",
                ChangeKind::Deactivated,
                REPORT_NOW - 48 * H - 1,
                REPORT_NOW,
                policy,
                too_old.clone(),
            ),
            (
                "49 h ago",
                ChangeKind::Deactivated,
                REPORT_NOW - 49 * H,
                REPORT_NOW,
                policy,
                too_old.clone(),
            ),
            (
                "a year ago",
                ChangeKind::Deactivated,
                REPORT_NOW - 365 * DAY,
                REPORT_NOW,
                policy,
                too_old.clone(),
            ),
            (
                "changed 49 h ago",
                to(NUMBER_B),
                REPORT_NOW - 49 * H,
                REPORT_NOW,
                policy,
                too_old.clone(),
            ),
            (
                "1 ms ahead",
                ChangeKind::Deactivated,
                REPORT_NOW + 1,
                REPORT_NOW,
                policy,
                Ok(()),
            ),
            (
                "a month ahead",
                to(NUMBER_B),
                REPORT_NOW + 30 * DAY,
                REPORT_NOW,
                policy,
                Ok(()),
            ),
            (
                "364 days ahead",
                ChangeKind::Deactivated,
                REPORT_NOW + 364 * DAY,
                REPORT_NOW,
                policy,
                Ok(()),
            ),
            (
                "exactly 365 days ahead",
                ChangeKind::Deactivated,
                REPORT_NOW + 365 * DAY,
                REPORT_NOW,
                policy,
                Ok(()),
            ),
            (
                "365 days + 1 ms ahead",
                ChangeKind::Deactivated,
                REPORT_NOW + 365 * DAY + 1,
                REPORT_NOW,
                policy,
                Err(ReportError::TooFarAhead),
            ),
            (
                "i64::MAX ahead",
                ChangeKind::Deactivated,
                i64::MAX,
                REPORT_NOW,
                policy,
                Err(ReportError::TooFarAhead),
            ),
            (
                "i64::MIN",
                ChangeKind::Deactivated,
                i64::MIN,
                REPORT_NOW,
                policy,
                too_old.clone(),
            ),
            (
                "now i64::MIN, effective i64::MAX",
                ChangeKind::Deactivated,
                i64::MAX,
                i64::MIN,
                policy,
                Err(ReportError::TooFarAhead),
            ),
            // Configurable limit.
            (
                "1 h limit, 61 min ago",
                ChangeKind::Deactivated,
                REPORT_NOW - 61 * 60_000,
                REPORT_NOW,
                Duration::from_secs(3600),
                Err(ReportError::TooOld { max_hours: 1 }),
            ),
            (
                "1 h limit, 59 min ago",
                ChangeKind::Deactivated,
                REPORT_NOW - 59 * 60_000,
                REPORT_NOW,
                Duration::from_secs(3600),
                Ok(()),
            ),
            (
                "zero limit, now",
                ChangeKind::Deactivated,
                REPORT_NOW,
                REPORT_NOW,
                Duration::ZERO,
                Ok(()),
            ),
            (
                "zero limit, 1 ms ago",
                ChangeKind::Deactivated,
                REPORT_NOW - 1,
                REPORT_NOW,
                Duration::ZERO,
                Err(ReportError::TooOld { max_hours: 0 }),
            ),
            (
                "72 h limit, 49 h ago",
                ChangeKind::Deactivated,
                REPORT_NOW - 49 * H,
                REPORT_NOW,
                Duration::from_secs(72 * 3600),
                Ok(()),
            ),
            (
                "unbounded limit, i64::MIN",
                ChangeKind::Deactivated,
                i64::MIN,
                REPORT_NOW,
                Duration::MAX,
                Ok(()),
            ),
            // The new number.
            (
                "changed to another number",
                to(NUMBER_B),
                REPORT_NOW,
                REPORT_NOW,
                policy,
                Ok(()),
            ),
            (
                "changed to empty",
                to(""),
                REPORT_NOW,
                REPORT_NOW,
                policy,
                Err(ReportError::BadNewNumber),
            ),
            (
                "changed to blank",
                to("  "),
                REPORT_NOW,
                REPORT_NOW,
                policy,
                Err(ReportError::BadNewNumber),
            ),
            (
                "changed to no digits",
                to("+abc"),
                REPORT_NOW,
                REPORT_NOW,
                policy,
                Err(ReportError::BadNewNumber),
            ),
            (
                "changed to the same number",
                to(NUMBER),
                REPORT_NOW,
                REPORT_NOW,
                policy,
                Err(ReportError::BadNewNumber),
            ),
            (
                "changed to the same number, formatted",
                to("+46 70-123 45 67"),
                REPORT_NOW,
                REPORT_NOW,
                policy,
                Err(ReportError::BadNewNumber),
            ),
            (
                "bad new number wins over too old",
                to(""),
                REPORT_NOW - 49 * H,
                REPORT_NOW,
                policy,
                Err(ReportError::BadNewNumber),
            ),
            (
                "bad new number wins over too far ahead",
                to(NUMBER),
                i64::MAX,
                REPORT_NOW,
                policy,
                Err(ReportError::BadNewNumber),
            ),
        ];
        for (name, kind, effective_at, now, max_backdate, expected) in cases {
            assert_eq!(
                check_report(&kind, NUMBER, effective_at, now, max_backdate),
                expected,
                "case `{name}`"
            );
        }
    }

    #[test]
    fn report_error_messages() {
        // (name, error, message)
        let cases = [
            (
                "too old",
                ReportError::TooOld { max_hours: 48 },
                "effective_at is more than 48 hours in the past; reports may be backdated at most that far",
            ),
            (
                "too far ahead",
                ReportError::TooFarAhead,
                "effective_at is more than 1 year in the future",
            ),
            (
                "bad new number",
                ReportError::BadNewNumber,
                "a changed number needs new_number, different from the number",
            ),
        ];
        for (name, error, message) in cases {
            assert_eq!(error.to_string(), message, "case `{name}`");
        }
    }

    #[test]
    fn change_kind_names() {
        // (name, kind, as_str)
        let cases = [
            ("deactivated", ChangeKind::Deactivated, "deactivated"),
            (
                "changed",
                ChangeKind::Changed {
                    new_number: NUMBER_B.into(),
                },
                "changed",
            ),
        ];
        for (name, kind, expected) in cases {
            assert_eq!(kind.as_str(), expected, "case `{name}`");
        }
    }

    #[test]
    fn is_suspect_table() {
        // (name, failures, threshold, suspect)
        const CASES: &[(&str, u32, u32, bool)] = &[
            ("disabled, none", 0, 0, false),
            ("disabled, many", 5, 0, false),
            ("disabled, max", u32::MAX, 0, false),
            ("threshold 1, none", 0, 1, false),
            ("threshold 1, one", 1, 1, true),
            ("threshold 3, none", 0, 3, false),
            ("threshold 3, two", 2, 3, false),
            ("threshold 3, three", 3, 3, true),
            ("threshold 3, four", 4, 3, true),
            ("threshold max, one below", u32::MAX - 1, u32::MAX, false),
            ("threshold max, reached", u32::MAX, u32::MAX, true),
        ];
        for (name, failures, threshold, expected) in CASES {
            assert_eq!(
                is_suspect(*failures, *threshold),
                *expected,
                "case `{name}`"
            );
        }
    }
}
