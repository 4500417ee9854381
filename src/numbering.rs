//! Is a phone number valid in its country's numbering plan?
//!
//! The decision of `phonenumber::is_valid`, made without that crate's regex cache. It matches
//! each of a region's patterns (about a dozen) through one process-wide cache of 100 compiled
//! regexes behind a mutex, hashing the pattern's text on every use: that was a fifth of the API
//! threads' time in the e2e bench, and traffic to more than a handful of countries evicts and
//! recompiles patterns all the time. Here a region's patterns are compiled once, when its first
//! number is checked, and kept; the metadata still comes from `phonenumber`.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, PoisonError, RwLock};

use phonenumber::PhoneNumber;
use phonenumber::metadata::{DATABASE, Descriptor, Metadata};
use regex::{Regex, RegexBuilder};

/// Loads `phonenumber`'s metadata (every region's plan, decoded from the crate's embedded
/// database: ~70 ms of CPU), which would otherwise happen inside the first request that
/// carries a number. The patterns of each region are still compiled at its first number.
pub fn load() {
    let _ = DATABASE.by_code(&1);
}

/// Whether `number` is a valid number of the region its country code and digits point to:
/// it matches the region's general pattern and the pattern of at least one type of number
/// (fixed line, mobile, toll free, ...), each with its possible lengths.
pub fn is_valid(number: &PhoneNumber) -> bool {
    let national = number.national().to_string();
    region_of(number.country().code(), &national).is_some_and(|plan| plan.has_a_type(&national))
}

/// The region whose plan applies, chosen as `phonenumber` chooses it: the only region of the
/// country code; else the first of its regions whose leading digits match (or, for a region
/// without them, whose plan knows the number).
fn region_of(code: u16, national: &str) -> Option<Arc<Plan>> {
    let regions = DATABASE.region(&code)?;
    if let [region] = regions[..] {
        let meta = if region == "001" {
            DATABASE.by_code(&code)?.into_iter().next()?
        } else {
            let id: phonenumber::country::Id = region.parse().ok()?;
            DATABASE.by_id(id.as_ref())?
        };
        return plan(meta);
    }
    regions.into_iter().find_map(|region| {
        let plan = plan(DATABASE.by_id(region)?)?;
        let chosen = match &plan.leading_digits {
            Some(leading) => leading.is_match(national),
            None => plan.has_a_type(national),
        };
        chosen.then_some(plan)
    })
}

/// The compiled plans, by region id ("SE", "001" for non-geographic codes, ...).
static PLANS: LazyLock<RwLock<HashMap<String, Arc<Plan>>>> = LazyLock::new(Default::default);

fn plan(meta: &Metadata) -> Option<Arc<Plan>> {
    let known = PLANS.read().unwrap_or_else(PoisonError::into_inner);
    if let Some(plan) = known.get(meta.id()) {
        return Some(Arc::clone(plan));
    }
    drop(known);
    let plan = Arc::new(Plan::compile(meta)?);
    PLANS
        .write()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(meta.id().to_owned(), Arc::clone(&plan));
    Some(plan)
}

/// One region's patterns.
struct Plan {
    general: Pattern,
    /// The types `phonenumber::validator::number_type` tries; a number of none is invalid.
    types: Vec<Pattern>,
    /// Picks this region among those that share its country code.
    leading_digits: Option<Regex>,
}

impl Plan {
    fn compile(meta: &Metadata) -> Option<Plan> {
        let d = meta.descriptors();
        let types = [
            d.premium_rate(),
            d.toll_free(),
            d.shared_cost(),
            d.voip(),
            d.personal_number(),
            d.pager(),
            d.uan(),
            d.voicemail(),
            d.fixed_line(),
            d.mobile(),
        ];
        Some(Plan {
            general: Pattern::compile(d.general())?,
            types: types
                .into_iter()
                .flatten()
                .map(Pattern::compile)
                .collect::<Option<_>>()?,
            leading_digits: match meta.leading_digits() {
                Some(leading) => Some(anchored(leading.as_str())?),
                None => None,
            },
        })
    }

    fn has_a_type(&self, national: &str) -> bool {
        self.general.matches(national) && self.types.iter().any(|t| t.matches(national))
    }
}

/// A descriptor's pattern and possible lengths.
struct Pattern {
    regex: Regex,
    lengths: Vec<u16>,
}

impl Pattern {
    fn compile(descriptor: &Descriptor) -> Option<Pattern> {
        Some(Pattern {
            regex: anchored(descriptor.national_number().as_str())?,
            lengths: descriptor.possible_length().to_vec(),
        })
    }

    /// As `Descriptor::is_match`: a possible length (when the plan lists them), and a match
    /// that starts at the first digit.
    fn matches(&self, national: &str) -> bool {
        let length = u16::try_from(national.len()).unwrap_or(u16::MAX);
        (self.lengths.is_empty() || self.lengths.contains(&length)) && self.regex.is_match(national)
    }
}

/// The metadata's pattern (written with insignificant white space, as `phonenumber` compiles
/// it), matching from the start of the text only.
fn anchored(pattern: &str) -> Option<Regex> {
    RegexBuilder::new(&format!("^(?:{pattern})"))
        .ignore_whitespace(true)
        .build()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every example number of every region's metadata, and near misses of each (a digit
    /// less, a digit more, a digit changed), get the same answer as `phonenumber::is_valid`,
    /// and the valid ones the same E.164 form as its formatter.
    #[test]
    fn agrees_with_phonenumber_on_every_example_number_and_its_near_misses() {
        let mut checked = 0;
        let mut valid = 0;
        for meta in DATABASE.iter() {
            let d = meta.descriptors();
            let descriptors = [
                Some(d.general()),
                d.fixed_line(),
                d.mobile(),
                d.toll_free(),
                d.premium_rate(),
                d.shared_cost(),
                d.personal_number(),
                d.voip(),
                d.pager(),
                d.uan(),
                d.voicemail(),
            ];
            for example in descriptors
                .into_iter()
                .flatten()
                .filter_map(|d| d.example())
            {
                let mut variants = vec![
                    example.to_owned(),
                    example[..example.len() - 1].to_owned(),
                    format!("{example}7"),
                ];
                for (i, digit) in example.char_indices() {
                    let other = if digit == '9' { '1' } else { '9' };
                    variants.push(format!("{}{other}{}", &example[..i], &example[i + 1..]));
                }
                for digits in variants {
                    let text = format!("+{}{digits}", meta.country_code());
                    let Ok(number) = phonenumber::parse(None, &text) else {
                        continue;
                    };
                    let expected = phonenumber::is_valid(&number);
                    assert_eq!(is_valid(&number), expected, "{text} (region {})", meta.id());
                    if expected {
                        // And the E.164 form `Msisdn` writes is the crate's.
                        let e164 = number.format().mode(phonenumber::Mode::E164).to_string();
                        let parsed = crate::message::Msisdn::parse(&text);
                        assert_eq!(parsed.as_ref().map(|m| m.as_str()), Ok(e164.as_str()));
                    }
                    checked += 1;
                    valid += usize::from(expected);
                }
            }
        }
        // Both answers are well represented: the test cannot pass by always saying one.
        assert!(checked > 10_000, "{checked} numbers checked");
        assert!(
            valid > 2_000 && checked - valid > 2_000,
            "{valid} of {checked} valid"
        );
    }
}
