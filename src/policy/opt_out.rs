//! Opt-out (policy rules 1 and 2): reading inbound replies as STOP / START / HELP keywords
//! (DOMAIN §6.4) and deciding whether a message may go to an opted-out number.
//!
//! Matching is deliberately exact: the whole reply, once normalised, must equal a keyword. A
//! "contains" match would opt people out for "Please stop by tomorrow", and an opt-out is hard to
//! undo (we may not text the person to ask, DOMAIN §6.3). Normalisation is generous instead, so
//! that the ways phones and people decorate a single word ("Stop.", "STOP 👍", "ＳＴＯＰ", a
//! trailing NBSP) still count.

use crate::encoding;
use crate::message::Category;

/// Keywords and replies of one account; defaults in English and Swedish.
///
/// The operator is Swedish but recipients and carriers follow the US/UK conventions too
/// (DOMAIN §6.1), so the defaults accept both. A list given in the configuration replaces that
/// list's default whole (nothing is merged), so an account can drop a word that collides with its
/// own traffic; [`Keywords::validate`] catches the dangerous results.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Keywords {
    /// Opt out of the sender the reply was sent to.
    pub opt_out: Vec<String>,
    /// Opt out of every sender of the account: the widest scope (DOMAIN §6.4 rule 4). May be
    /// empty, then every opt-out is per sender.
    pub opt_out_all: Vec<String>,
    /// Undo an opt-out.
    pub opt_in: Vec<String>,
    /// Answered with `help_reply`.
    pub help: Vec<String>,
    /// The one confirmation of an opt-out: confirms the scope, no marketing (FCC 24-24, §6.1).
    pub opt_out_reply: String,
    pub opt_in_reply: String,
    /// Must say how to stop (it names an opt-out keyword) and whose help line this is (CTIA).
    pub help_reply: String,
}

impl Default for Keywords {
    fn default() -> Self {
        fn words(list: &[&str]) -> Vec<String> {
            list.iter().map(|w| (*w).to_owned()).collect()
        }
        Keywords {
            // FCC 24-24's reasonable-revocation words, the industry set, Twilio's additions and
            // the Swedish forms (STOPP, AVSLUTA "end", AVREGISTRERA "unsubscribe").
            opt_out: words(&[
                "STOP",
                "STOPP",
                "UNSUBSCRIBE",
                "CANCEL",
                "END",
                "QUIT",
                "AVSLUTA",
                "AVREGISTRERA",
                "OPTOUT",
                "OPT OUT",
                "REVOKE",
            ]),
            opt_out_all: words(&["STOPALL", "STOP ALL"]),
            opt_in: words(&["START", "UNSTOP", "YES", "JA"]),
            help: words(&["HELP", "INFO", "HJÄLP"]),
            opt_out_reply: "You will get no more messages from this sender. / \
                            Du får inga fler meddelanden från denna avsändare."
                .to_owned(),
            opt_in_reply: "You will get messages from this sender again. Reply STOP to stop. / \
                           Du får meddelanden från denna avsändare igen. Svara STOPP för att avsluta."
                .to_owned(),
            help_reply: "This is the SMS operator's help line. Reply STOP to get no more messages. / \
                         SMS-operatörens hjälp: svara STOPP för att avsluta."
                .to_owned(),
        }
    }
}

impl Keywords {
    /// Problems of this configuration, each naming its key (empty when it is fine). Checked at
    /// `check-config` and load time, because a bad list fails silently at run time: a keyword
    /// that is both opt-out and opt-in would make one of them unreachable, and a reply longer
    /// than one SMS costs several and may arrive out of order.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        // The order only decides on which key a duplicate is reported: the later one, naming
        // the earlier (so "opt_in: `STOP` is also an opt-out keyword").
        let lists: [(&str, &str, &Vec<String>); 4] = [
            ("opt_out", "an opt-out", &self.opt_out),
            ("opt_out_all", "an opt-out-all", &self.opt_out_all),
            ("opt_in", "an opt-in", &self.opt_in),
            ("help", "a help", &self.help),
        ];
        // Without opt-out words nobody can unsubscribe (rule 1); without opt-in words an
        // opt-out by mistake cannot be undone by the recipient; HELP is expected by carriers.
        for (key, _, list) in &lists {
            if *key != "opt_out_all" && list.is_empty() {
                problems.push(format!("{key}: must not be empty"));
            }
        }
        for (i, (key, _, list)) in lists.iter().enumerate() {
            for word in list.iter() {
                let normalized = normalize(word);
                if normalized.is_empty() {
                    problems.push(format!(
                        "{key}: `{word}` has no letters or digits, so no reply can match it"
                    ));
                    continue;
                }
                for (_, what, earlier) in &lists[..i] {
                    if earlier.iter().any(|e| normalize(e) == normalized) {
                        problems.push(format!("{key}: `{word}` is also {what} keyword"));
                    }
                }
            }
        }
        for (key, reply) in [
            ("opt_out_reply", &self.opt_out_reply),
            ("opt_in_reply", &self.opt_in_reply),
            ("help_reply", &self.help_reply),
        ] {
            if reply.trim().is_empty() {
                problems.push(format!("{key}: must not be empty"));
                continue;
            }
            // "At most 160 characters" is only true in GSM-7: one character outside it (a curly
            // quote, an emoji) makes the whole reply UCS-2 with 70 per SMS (DOMAIN §4.3).
            let plan = encoding::plan(reply);
            if plan.segments > 1 {
                let limit = match plan.encoding {
                    encoding::Encoding::Gsm7 => "160 GSM characters",
                    encoding::Encoding::Ucs2 => "70 characters, as it has characters outside GSM",
                };
                problems.push(format!(
                    "{key}: must fit in one SMS (at most {limit}); it takes {} parts",
                    plan.segments
                ));
            }
        }
        if !self.opt_out.is_empty()
            && !self.help_reply.trim().is_empty()
            && !self.opt_out.iter().any(|w| mentions(&self.help_reply, w))
        {
            problems.push(
                "help_reply: must tell how to stop, naming one of the opt_out keywords (e.g. STOP)"
                    .to_owned(),
            );
        }
        problems
    }
}

/// Whether `text` contains the keyword as whole words ("Reply STOP." mentions STOP, "STOPPED"
/// does not).
fn mentions(text: &str, keyword: &str) -> bool {
    fn words(s: &str) -> Vec<String> {
        normalize(s)
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .map(str::to_owned)
            .collect()
    }
    let text = words(text);
    let keyword = words(keyword);
    !keyword.is_empty() && text.windows(keyword.len()).any(|w| w == keyword.as_slice())
}

/// What an inbound reply asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keyword {
    OptOut,
    OptOutAll,
    OptIn,
    Help,
}

/// DOMAIN §6.4 rule 1, without a Unicode-tables crate. In order:
///
/// 1. Fullwidth ASCII (U+FF01..U+FF5E, typed by East Asian keyboards) becomes ASCII: the part of
///    NFKC that matters for keywords.
/// 2. Invisible format characters (zero-width space/joiners, soft hyphen, BOM, bidi marks,
///    emoji variation selectors) are dropped: they come from copy-paste and emoji keyboards and
///    would otherwise split a word.
/// 3. Dashes and `_` become spaces, so "OPT-OUT" (AWS's spelling) equals "OPT OUT".
/// 4. Uppercase, Unicode-aware ("hjälp" → "HJÄLP", "ß" → "SS").
/// 5. A combining accent after a letter is composed with it (phones may send "a" + U+0308),
///    then a small fold drops French accents: À Â Ç È É Ê Ë Î Ï Ô Ù Û → A C E I O U, so ARRÊT
///    matches ARRET (DOMAIN §6.1's French-Canadian keywords are typed both ways). Å Ä Ö (and
///    Ü) are kept: in Swedish they are different letters, not accented ones.
/// 6. Whitespace of any kind (NBSP, ideographic space, tabs, newlines) is trimmed and inner runs
///    collapse to one space.
/// 7. Everything that is not a letter or digit is stripped from both ends: punctuation, quotes,
///    emoji and other symbols ("Stop.", "\"stop\"", "stop 👍"). Inner punctuation stays, so
///    "S.T.O.P" is not STOP: guessing there is the review queue's job, not an automatic opt-out.
///
/// The result is idempotent: `normalize(&normalize(x)) == normalize(x)` (tested over every
/// character).
pub fn normalize(text: &str) -> String {
    let mut folded = String::with_capacity(text.len());
    for c in text.chars() {
        let c = fullwidth_to_ascii(c);
        if is_invisible(c) {
            continue;
        }
        if is_dash(c) {
            folded.push(' ');
            continue;
        }
        for upper in c.to_uppercase() {
            push_folded(&mut folded, upper);
        }
    }
    let collapsed = folded.split_whitespace().collect::<Vec<_>>().join(" ");
    collapsed
        .trim_matches(|c: char| !c.is_alphanumeric())
        .to_owned()
}

/// U+FF01..=U+FF5E are ASCII 0x21..=0x7E shifted by 0xFEE0.
fn fullwidth_to_ascii(c: char) -> char {
    match c {
        '\u{FF01}'..='\u{FF5E}' => char::from_u32(c as u32 - 0xFEE0).unwrap_or(c),
        _ => c,
    }
}

fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}' // soft hyphen
            | '\u{200B}'
            ..='\u{200F}' // zero-width space, ZWNJ, ZWJ, LRM, RLM
            | '\u{2060}' // word joiner
            | '\u{FEFF}' // byte-order mark / zero-width no-break space
            | '\u{FE0E}' | '\u{FE0F}' // text / emoji variation selectors
    )
}

fn is_dash(c: char) -> bool {
    matches!(
        c,
        '-' | '_' | '\u{2010}'..='\u{2015}' | '\u{2212}' | '\u{FE63}'
    )
}

/// Pushes an uppercase character, composing a combining accent with the letter before it and
/// folding French accents. Looking at the already folded output (not the input) is what makes
/// the whole function idempotent: "Ç" + U+0327 ends as "C" in one pass, not "C" + U+0327.
fn push_folded(out: &mut String, c: char) {
    if let Some(previous) = out.chars().next_back()
        && let Some(composed) = compose(previous, c)
    {
        out.pop();
        out.push(fold(composed));
        return;
    }
    out.push(fold(c));
}

/// The few (uppercase letter, combining mark) pairs whose precomposed form we know: the Swedish
/// and German letters we keep, and the French ones we fold.
fn compose(base: char, mark: char) -> Option<char> {
    let composed = match (base, mark) {
        ('A', '\u{0300}') => 'À',
        ('A', '\u{0302}') => 'Â',
        ('A', '\u{0308}') => 'Ä',
        ('A', '\u{030A}') => 'Å',
        ('C', '\u{0327}') => 'Ç',
        ('E', '\u{0300}') => 'È',
        ('E', '\u{0301}') => 'É',
        ('E', '\u{0302}') => 'Ê',
        ('E', '\u{0308}') => 'Ë',
        ('I', '\u{0302}') => 'Î',
        ('I', '\u{0308}') => 'Ï',
        ('O', '\u{0302}') => 'Ô',
        ('O', '\u{0308}') => 'Ö',
        ('U', '\u{0300}') => 'Ù',
        ('U', '\u{0302}') => 'Û',
        ('U', '\u{0308}') => 'Ü',
        _ => return None,
    };
    Some(composed)
}

/// French accents on uppercase letters → the bare letter. Kept small on purpose: every entry
/// merges two words, and in Swedish Å/Ä/Ö are letters of their own (HJÄLP is not HJALP).
fn fold(c: char) -> char {
    match c {
        'À' | 'Â' => 'A',
        'Ç' => 'C',
        'È' | 'É' | 'Ê' | 'Ë' => 'E',
        'Î' | 'Ï' => 'I',
        'Ô' => 'O',
        'Ù' | 'Û' => 'U',
        _ => c,
    }
}

/// DOMAIN §6.4 rule 2: the whole normalised text must equal a normalised keyword of the
/// configuration. Never "contains": "Please stop by tomorrow" is not an opt-out, and "STOP IT"
/// is not one either unless the account lists it. Opt-out-all is checked before opt-out so that
/// a list holding both "STOP" and "STOP ALL" gives the widest scope; then opt-in, then help.
pub fn match_keyword(text: &str, keywords: &Keywords) -> Option<Keyword> {
    let text = normalize(text);
    if text.is_empty() {
        return None;
    }
    [
        (Keyword::OptOutAll, &keywords.opt_out_all),
        (Keyword::OptOut, &keywords.opt_out),
        (Keyword::OptIn, &keywords.opt_in),
        (Keyword::Help, &keywords.help),
    ]
    .into_iter()
    .find(|(_, list)| list.iter().any(|word| normalize(word) == text))
    .map(|(keyword, _)| keyword)
}

/// What to do with a message to a number, as far as opt-outs go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendDecision {
    Send,
    /// A transactional (service) message to an opted-out number, for an account allowed to send
    /// service messages: sent, and the history says it overrode the opt-out.
    SendOverridingOptOut,
    Refuse,
}

/// Policy rules 1 and 2: marketing to an opted-out number is refused; transactional passes only
/// if the account has `service_messages = true`.
///
/// Rule 2 says service messages cannot be opted out of, but the gateway cannot tell a password
/// reset from an offer labelled `transactional`; so the override is a per-account permission the
/// operator grants, and every use of it is recorded (`SendOverridingOptOut`) so that misuse shows.
pub fn decide(category: Category, opted_out: bool, service_messages: bool) -> SendDecision {
    match (opted_out, category, service_messages) {
        (false, _, _) => SendDecision::Send,
        (true, Category::Marketing, _) => SendDecision::Refuse,
        (true, Category::Transactional, true) => SendDecision::SendOverridingOptOut,
        (true, Category::Transactional, false) => SendDecision::Refuse,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // (name, input, normalised)
    const NORMALIZE_CASES: &[(&str, &str, &str)] = &[
        ("empty", "", ""),
        ("only spaces", "   ", ""),
        ("only punctuation", "?!.", ""),
        ("only emoji", "👍🎉", ""),
        ("plain upper", "STOP", "STOP"),
        ("lower", "stop", "STOP"),
        ("mixed case", "sToP", "STOP"),
        ("trailing dot", "Stop.", "STOP"),
        ("exclamations", "STOP!!!", "STOP"),
        ("double quotes", "\"stop\"", "STOP"),
        ("single quotes", "'stop'", "STOP"),
        ("curly quotes", "“stop”", "STOP"),
        ("guillemets", "«stop»", "STOP"),
        ("spanish marks", "¡Stop!", "STOP"),
        ("brackets", "(stop)", "STOP"),
        ("thumbs up", "stop 👍", "STOP"),
        ("skin tone emoji", "stop 👍🏽", "STOP"),
        ("heart with variation selector", "❤️ stop ❤️", "STOP"),
        ("emoji no space", "stop👍", "STOP"),
        ("leading and trailing spaces", "  stop  ", "STOP"),
        ("tabs and newlines", "\tstop\r\n", "STOP"),
        ("nbsp", "\u{A0}stop\u{A0}", "STOP"),
        (
            "narrow nbsp and figure space",
            "\u{202F}stop\u{2007}",
            "STOP",
        ),
        ("ideographic space", "\u{3000}stop\u{3000}", "STOP"),
        ("inner spaces collapse", "stop    all", "STOP ALL"),
        ("inner nbsp collapses", "opt\u{A0}out", "OPT OUT"),
        ("inner newline collapses", "stop\nall", "STOP ALL"),
        ("zero-width space inside", "st\u{200B}op", "STOP"),
        ("zero-width joiner at end", "stop\u{200D}", "STOP"),
        ("bom at start", "\u{FEFF}stop", "STOP"),
        ("soft hyphen inside", "un\u{AD}subscribe", "UNSUBSCRIBE"),
        ("fullwidth upper", "ＳＴＯＰ", "STOP"),
        ("fullwidth lower", "ｓｔｏｐ", "STOP"),
        ("fullwidth exclamation", "ｓｔｏｐ！", "STOP"),
        ("fullwidth hyphen", "ｏｐｔ－ｏｕｔ", "OPT OUT"),
        ("hyphen to space", "opt-out", "OPT OUT"),
        ("en dash to space", "opt–out", "OPT OUT"),
        ("underscore to space", "opt_out", "OPT OUT"),
        ("trailing hyphen", "stop-", "STOP"),
        ("swedish lower", "hjälp", "HJÄLP"),
        ("swedish å", "åsa", "ÅSA"),
        ("swedish ö", "över", "ÖVER"),
        ("german ü kept", "über", "ÜBER"),
        ("sharp s", "straße", "STRASSE"),
        ("arrêt folds", "arrêt", "ARRET"),
        ("ARRÊT folds", "ARRÊT", "ARRET"),
        ("arrête folds", "Arrête!", "ARRETE"),
        ("é folds", "été", "ETE"),
        ("ç folds", "ça", "CA"),
        ("decomposed ä composes", "hja\u{308}lp", "HJÄLP"),
        ("decomposed å composes", "a\u{30A}", "Å"),
        ("decomposed ê folds", "arre\u{302}t", "ARRET"),
        ("decomposed ç folds", "c\u{327}a", "CA"),
        ("accent then mark folds", "Ç\u{327}", "C"),
        ("unknown mark kept inside", "x\u{308}y", "X\u{308}Y"),
        ("trailing unknown mark stripped", "stop\u{301}", "STOP"),
        ("digits kept", "stop 2", "STOP 2"),
        ("inner punctuation kept", "s.t.o.p", "S.T.O.P"),
        ("cyrillic", "стоп", "СТОП"),
        ("greek", "στοπ", "ΣΤΟΠ"),
    ];

    #[test]
    fn normalize_table() {
        for (name, input, expected) in NORMALIZE_CASES {
            assert_eq!(normalize(input), *expected, "case `{name}`: {input:?}");
        }
    }

    // (name, text, expected) with the default keywords.
    const MATCH_CASES: &[(&str, &str, Option<Keyword>)] = &[
        ("STOP", "STOP", Some(Keyword::OptOut)),
        ("stop", "stop", Some(Keyword::OptOut)),
        ("Stop.", "Stop.", Some(Keyword::OptOut)),
        ("STOP!", "STOP!", Some(Keyword::OptOut)),
        ("quoted", "\"stop\"", Some(Keyword::OptOut)),
        ("emoji", "stop 👍", Some(Keyword::OptOut)),
        ("nbsp", "\u{A0}Stop\u{A0}", Some(Keyword::OptOut)),
        ("fullwidth", "ＳＴＯＰ", Some(Keyword::OptOut)),
        ("stopp", "stopp", Some(Keyword::OptOut)),
        ("avsluta", "avsluta", Some(Keyword::OptOut)),
        ("Avregistrera.", "Avregistrera.", Some(Keyword::OptOut)),
        ("unsubscribe", "unsubscribe", Some(Keyword::OptOut)),
        ("cancel", "Cancel", Some(Keyword::OptOut)),
        ("end", "end", Some(Keyword::OptOut)),
        ("quit", "quit", Some(Keyword::OptOut)),
        ("revoke", "revoke", Some(Keyword::OptOut)),
        ("optout", "optout", Some(Keyword::OptOut)),
        ("opt out", "opt out", Some(Keyword::OptOut)),
        ("opt  out", "opt   out", Some(Keyword::OptOut)),
        ("Opt-Out", "Opt-Out", Some(Keyword::OptOut)),
        ("OPT_OUT", "OPT_OUT", Some(Keyword::OptOut)),
        ("STOP ALL", "STOP ALL", Some(Keyword::OptOutAll)),
        ("stop all", "stop all", Some(Keyword::OptOutAll)),
        ("Stop  All!", "Stop  All!", Some(Keyword::OptOutAll)),
        ("STOPALL", "STOPALL", Some(Keyword::OptOutAll)),
        ("stopall", "stopall", Some(Keyword::OptOutAll)),
        ("stop-all", "stop-all", Some(Keyword::OptOutAll)),
        ("start", "start", Some(Keyword::OptIn)),
        ("Unstop", "Unstop", Some(Keyword::OptIn)),
        ("yes", "yes!", Some(Keyword::OptIn)),
        ("ja", "ja", Some(Keyword::OptIn)),
        ("Ja.", "Ja.", Some(Keyword::OptIn)),
        ("help", "help", Some(Keyword::Help)),
        ("HELP?", "HELP?", Some(Keyword::Help)),
        ("info", "info", Some(Keyword::Help)),
        ("hjälp", "hjälp", Some(Keyword::Help)),
        ("Hjälp?", "Hjälp?", Some(Keyword::Help)),
        ("HJÄLP", "HJÄLP", Some(Keyword::Help)),
        ("hjälp decomposed", "hja\u{308}lp", Some(Keyword::Help)),
        // Must not match: only the whole text counts.
        ("stop it please", "stop it please", None),
        ("please cancel", "please cancel", None),
        ("Starta om", "Starta om", None),
        ("stop by tomorrow", "Please stop by tomorrow", None),
        ("STOP IT", "STOP IT", None),
        ("STOP PLEASE", "STOP PLEASE", None),
        ("stop stop", "stop stop", None),
        ("stopped", "stopped", None),
        ("unsubscribed", "unsubscribed", None),
        ("starta", "starta", None),
        ("yes please", "yes please", None),
        ("jag vill sluta", "jag vill sluta", None),
        ("spelled out", "S T O P", None),
        ("dotted", "S.T.O.P", None),
        ("zero for o", "ST0P", None),
        ("hjalp without ring", "hjalp", None),
        ("arret not default", "ARRÊT", None),
        ("stop all please", "stop all please", None),
        ("empty", "", None),
        ("spaces", "   ", None),
        ("emoji only", "👍", None),
        ("punctuation only", "!!!", None),
    ];

    #[test]
    fn match_default_table() {
        let keywords = Keywords::default();
        for (name, text, expected) in MATCH_CASES {
            assert_eq!(
                match_keyword(text, &keywords),
                *expected,
                "case `{name}`: {text:?}"
            );
        }
    }

    /// Ways one word arrives; every default keyword must survive every one of them.
    type Decorate = fn(&str) -> String;

    const DECORATIONS: &[(&str, Decorate)] = &[
        ("as is", |w| w.to_owned()),
        ("lowercase", |w| w.to_lowercase()),
        ("title case", |w| {
            let lower = w.to_lowercase();
            let mut chars = lower.chars();
            match chars.next() {
                Some(first) => first.to_uppercase().chain(chars).collect(),
                None => String::new(),
            }
        }),
        ("trailing dot", |w| format!("{w}.")),
        ("exclamation", |w| format!("{}!", w.to_lowercase())),
        ("question mark", |w| format!("{w}?")),
        ("double quotes", |w| format!("\"{}\"", w.to_lowercase())),
        ("curly quotes", |w| format!("“{w}”")),
        ("spaces", |w| format!("  {w}  ")),
        ("nbsp", |w| format!("\u{A0}{w}\u{A0}")),
        ("newline", |w| format!("{}\n", w.to_lowercase())),
        ("emoji after", |w| format!("{w} 👍")),
        ("emoji before", |w| format!("🙏{w}")),
        ("zero-width after", |w| format!("{w}\u{200B}")),
        ("inner spaces doubled", |w| w.replace(' ', "   ")),
        ("inner nbsp", |w| w.replace(' ', "\u{A0}")),
        ("fullwidth", |w| {
            w.chars()
                .map(|c| match c {
                    '!'..='~' => char::from_u32(c as u32 + 0xFEE0).unwrap_or(c),
                    _ => c,
                })
                .collect()
        }),
    ];

    #[test]
    fn every_default_keyword_in_every_decoration() {
        let keywords = Keywords::default();
        let lists = [
            (Keyword::OptOut, &keywords.opt_out),
            (Keyword::OptOutAll, &keywords.opt_out_all),
            (Keyword::OptIn, &keywords.opt_in),
            (Keyword::Help, &keywords.help),
        ];
        let mut checked = 0;
        for (expected, list) in lists {
            for word in list {
                for (decoration, decorate) in DECORATIONS {
                    let text = decorate(word);
                    assert_eq!(
                        match_keyword(&text, &keywords),
                        Some(expected),
                        "keyword `{word}`, decoration `{decoration}`: {text:?}"
                    );
                    // With a word in front or behind it is a sentence, not a keyword.
                    for sentence in [format!("please {text}"), format!("{text} now")] {
                        assert_eq!(
                            match_keyword(&sentence, &keywords),
                            None,
                            "keyword `{word}`, decoration `{decoration}`, in a sentence: {sentence:?}"
                        );
                    }
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 20 * DECORATIONS.len());
    }

    #[test]
    fn custom_lists_replace_the_defaults() {
        let keywords = Keywords {
            opt_out: vec!["SLUTA".into(), "ARRÊT".into(), "stop it".into()],
            opt_out_all: vec![],
            opt_in: vec!["BÖRJA".into()],
            help: vec!["HJÄLP".into()],
            ..Keywords::default()
        };
        // (name, text, expected)
        let cases: &[(&str, &str, Option<Keyword>)] = &[
            ("custom opt-out", "sluta", Some(Keyword::OptOut)),
            ("custom with accent", "Arrêt !", Some(Keyword::OptOut)),
            ("custom folded accent", "arret", Some(Keyword::OptOut)),
            ("custom phrase", "Stop it!", Some(Keyword::OptOut)),
            ("custom opt-in with ö", "börja", Some(Keyword::OptIn)),
            ("custom help", "hjälp", Some(Keyword::Help)),
            ("default STOP gone", "STOP", None),
            ("default STOP ALL gone", "stop all", None),
            ("default START gone", "start", None),
            ("default HELP gone", "help", None),
            ("börja without dots", "borja", None),
        ];
        for (name, text, expected) in cases {
            assert_eq!(
                match_keyword(text, &keywords),
                *expected,
                "case `{name}`: {text:?}"
            );
        }
    }

    #[test]
    fn opt_out_all_wins_over_opt_out() {
        // An account that lists the phrase in both lists gets the widest scope.
        let keywords = Keywords {
            opt_out: vec!["STOP ALL".into(), "STOP".into()],
            ..Keywords::default()
        };
        assert_eq!(
            match_keyword("stop all", &keywords),
            Some(Keyword::OptOutAll)
        );
        assert_eq!(match_keyword("stop", &keywords), Some(Keyword::OptOut));
    }

    #[test]
    fn deserialize_replaces_only_the_lists_given() {
        let keywords: Keywords = toml::from_str("opt_out = [\"SLUTA\"]").expect("valid toml");
        assert_eq!(keywords.opt_out, vec!["SLUTA".to_owned()]);
        let defaults = Keywords::default();
        assert_eq!(keywords.opt_in, defaults.opt_in);
        assert_eq!(keywords.help_reply, defaults.help_reply);
        let empty: Keywords = toml::from_str("").expect("valid toml");
        assert_eq!(empty, defaults);
        assert!(
            toml::from_str::<Keywords>("stop = [\"X\"]").is_err(),
            "unknown keys are refused"
        );
    }

    #[test]
    fn default_keywords_are_valid() {
        assert_eq!(Keywords::default().validate(), Vec::<String>::new());
    }

    /// (name, change to the defaults, expected problem; "" means none)
    type Change = fn(&mut Keywords);

    fn validate_cases() -> Vec<(&'static str, Change, &'static str)> {
        vec![
            ("defaults", |_| {}, ""),
            (
                "empty opt_out",
                |k| k.opt_out.clear(),
                "opt_out: must not be empty",
            ),
            (
                "empty opt_in",
                |k| k.opt_in.clear(),
                "opt_in: must not be empty",
            ),
            ("empty help", |k| k.help.clear(), "help: must not be empty"),
            ("empty opt_out_all is fine", |k| k.opt_out_all.clear(), ""),
            (
                "opt-in word also opt-out",
                |k| k.opt_in.push("STOP".into()),
                "opt_in: `STOP` is also an opt-out keyword",
            ),
            (
                "duplicate after normalisation",
                |k| k.help.push(" stop! ".into()),
                "help: ` stop! ` is also an opt-out keyword",
            ),
            (
                "opt-out-all word also opt-out",
                |k| k.opt_out_all.push("stopp".into()),
                "opt_out_all: `stopp` is also an opt-out keyword",
            ),
            (
                "help word also opt-in",
                |k| k.help.push("yes".into()),
                "help: `yes` is also an opt-in keyword",
            ),
            (
                "help word also opt-out-all",
                |k| k.help.push("Stop-All".into()),
                "help: `Stop-All` is also an opt-out-all keyword",
            ),
            (
                "keyword without letters",
                |k| k.opt_in.push("👍".into()),
                "opt_in: `👍` has no letters or digits",
            ),
            (
                "empty opt_out_reply",
                |k| k.opt_out_reply = "  ".into(),
                "opt_out_reply: must not be empty",
            ),
            (
                "161 GSM characters",
                |k| k.opt_in_reply = "a".repeat(161),
                "opt_in_reply: must fit in one SMS (at most 160 GSM characters); it takes 2 parts",
            ),
            (
                "160 GSM characters",
                |k| k.opt_in_reply = "a".repeat(160),
                "",
            ),
            (
                "71 UCS-2 characters",
                |k| k.opt_out_reply = format!("😀{}", "a".repeat(69)),
                "opt_out_reply: must fit in one SMS (at most 70 characters",
            ),
            (
                "help without stop",
                |k| k.help_reply = "Call us on 0771-123 456.".into(),
                "help_reply: must tell how to stop",
            ),
            (
                "help naming STOPPED is not naming STOP",
                |k| k.help_reply = "Messages are STOPPED by the operator.".into(),
                "help_reply: must tell how to stop",
            ),
            (
                "help naming a custom word",
                |k| {
                    k.opt_out = vec!["SLUTA".into()];
                    k.help_reply = "Svara sluta för att avsluta.".into();
                },
                "",
            ),
            (
                "help naming a phrase",
                |k| {
                    k.opt_out = vec!["OPT OUT".into()];
                    k.help_reply = "Reply opt-out to stop.".into();
                },
                "",
            ),
        ]
    }

    #[test]
    fn validate_table() {
        for (name, change, expected) in validate_cases() {
            let mut keywords = Keywords::default();
            change(&mut keywords);
            let problems = keywords.validate();
            if expected.is_empty() {
                assert!(problems.is_empty(), "case `{name}`: {problems:?}");
            } else {
                assert!(
                    problems.iter().any(|p| p.starts_with(expected)),
                    "case `{name}`: expected `{expected}` in {problems:?}"
                );
            }
        }
    }

    #[test]
    fn decide_every_combination() {
        use Category::{Marketing, Transactional};
        use SendDecision::{Refuse, Send, SendOverridingOptOut};
        // (name, category, opted_out, service_messages, expected)
        const CASES: &[(&str, Category, bool, bool, SendDecision)] = &[
            ("marketing, not opted out", Marketing, false, false, Send),
            (
                "marketing, not opted out, service",
                Marketing,
                false,
                true,
                Send,
            ),
            ("marketing, opted out", Marketing, true, false, Refuse),
            (
                "marketing, opted out, service",
                Marketing,
                true,
                true,
                Refuse,
            ),
            (
                "transactional, not opted out",
                Transactional,
                false,
                false,
                Send,
            ),
            (
                "transactional, not opted out, service",
                Transactional,
                false,
                true,
                Send,
            ),
            (
                "transactional, opted out",
                Transactional,
                true,
                false,
                Refuse,
            ),
            (
                "transactional, opted out, service",
                Transactional,
                true,
                true,
                SendOverridingOptOut,
            ),
        ];
        assert_eq!(CASES.len(), 8, "every combination once");
        for (name, category, opted_out, service, expected) in CASES {
            assert_eq!(
                decide(*category, *opted_out, *service),
                *expected,
                "case `{name}`"
            );
        }
    }

    #[test]
    fn normalize_is_idempotent_for_every_character() {
        // Single characters, and each after a letter and before a combining mark, so that every
        // composition and uppercase expansion is covered once.
        for c in (0..=0x10FFFFu32).filter_map(char::from_u32) {
            for text in [
                c.to_string(),
                format!("a{c}"),
                format!("{c}\u{308}"),
                format!("e{c}x"),
            ] {
                let once = normalize(&text);
                assert_eq!(normalize(&once), once, "U+{:04X} in {text:?}", c as u32);
            }
        }
    }

    fn texty() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            4 => proptest::sample::select(vec![
                "stop", "STOP", "all", "opt", "out", "hjälp", "arrêt", "ja", "start", " ", "  ",
            ])
            .prop_map(str::to_owned),
            2 => proptest::sample::select(vec![
                '\u{A0}', '\u{3000}', '\u{200B}', '\u{200D}', '\u{FEFF}', '\u{FE0F}', '\u{AD}',
                '\u{300}', '\u{301}', '\u{302}', '\u{308}', '\u{30A}', '\u{327}', '-', '_', '—',
                '.', '!', '"', '“', '👍', '🏽', 'Ｓ', 'ｓ', '！', 'ß', 'ŉ', 'ΐ', 'ǰ', 'ﬁ', 'Ç', 'ê',
            ])
            .prop_map(String::from),
            1 => any::<char>().prop_map(String::from),
        ];
        proptest::collection::vec(piece, 0..12).prop_map(|v| v.concat())
    }

    proptest! {
        #[test]
        fn normalize_never_panics_and_is_idempotent(text in any::<String>()) {
            let once = normalize(&text);
            prop_assert_eq!(normalize(&once), once.clone());
            prop_assert!(!once.contains("  "));
            prop_assert_eq!(once.trim(), once.as_str());
        }

        #[test]
        fn normalize_is_idempotent_on_keyword_like_text(text in texty()) {
            let once = normalize(&text);
            prop_assert_eq!(normalize(&once), once.clone());
            // Matching a text or its normal form is the same thing.
            let keywords = Keywords::default();
            prop_assert_eq!(match_keyword(&text, &keywords), match_keyword(&once, &keywords));
        }
    }
}
