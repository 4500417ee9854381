//! Receipts that matched no message, kept for diagnosis: the last [`KEEP_PER_CARRIER`] of each
//! carrier, in memory, shown by `GET /admin/receipts/unmatched` (`smsgw receipts unmatched`).
//!
//! A receipt is unmatched when it cannot be read (no id, no state) or when it waited
//! `unmatched_after` for its submit_sm_resp in the store's parking table and none came
//! ([`sweep`] takes those out of the store). The handset's number is kept only as its keyed
//! pseudonym; the receipt text is not kept (it can quote the message).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::message::{Pseudonymizer, now_ms, rfc3339};
use crate::store::Store;

use super::id::{IdForm, to_response_form};

/// Unmatched receipts listed per carrier; older ones are forgotten.
pub const KEEP_PER_CARRIER: usize = 100;
/// Parked receipts whose handset pseudonym is remembered, per carrier, until they match or
/// are given up. Beyond this the oldest lose it (the entry is still listed, without it).
const PARKED_PER_CARRIER: usize = 10_000;

/// One receipt that matched nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnmatchedReceipt {
    pub carrier: String,
    /// The id as matched (normalised, in the response's form), or None if it had none.
    pub id: Option<String>,
    /// The same number read in the other bases, to spot a hex/decimal quirk at a glance.
    pub id_as_hex: Option<String>,
    pub id_as_decimal: Option<String>,
    pub state: Option<String>,
    pub error_code: Option<String>,
    /// Keyed pseudonym of the handset (the receipt's source address), when known.
    pub handset: Option<String>,
    pub received_at: String,
    pub given_up_at: String,
    pub reason: String,
}

#[derive(Default)]
struct Lists {
    unmatched: HashMap<String, VecDeque<UnmatchedReceipt>>,
    /// carrier → (id key, handset pseudonym), oldest first.
    parked: HashMap<String, VecDeque<(String, String)>>,
}

/// The bounded lists; shared by the receipt handlers, the sweeper and the admin API.
pub struct UnmatchedLog {
    pseudonyms: Pseudonymizer,
    lists: Mutex<Lists>,
}

impl UnmatchedLog {
    pub fn new(pseudonyms: Pseudonymizer) -> UnmatchedLog {
        UnmatchedLog {
            pseudonyms,
            lists: Mutex::new(Lists::default()),
        }
    }

    fn lists(&self) -> std::sync::MutexGuard<'_, Lists> {
        self.lists.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The unmatched receipts, newest first, of one carrier or all.
    pub fn list(&self, carrier: Option<&str>) -> Vec<UnmatchedReceipt> {
        let lists = self.lists();
        let mut all: Vec<UnmatchedReceipt> = lists
            .unmatched
            .iter()
            .filter(|(name, _)| carrier.is_none_or(|c| c == name.as_str()))
            .flat_map(|(_, list)| list.iter().cloned())
            .collect();
        all.sort_by(|a, b| b.given_up_at.cmp(&a.given_up_at));
        all
    }

    /// A receipt that could not be read: unmatched at once.
    pub fn unreadable(&self, carrier: &str, handset: &str, reason: String) {
        let now = rfc3339(now_ms());
        self.push(UnmatchedReceipt {
            carrier: carrier.to_owned(),
            id: None,
            id_as_hex: None,
            id_as_decimal: None,
            state: None,
            error_code: None,
            handset: self.handset(handset),
            received_at: now.clone(),
            given_up_at: now,
            reason,
        });
    }

    /// A receipt the store parked: remembers its handset, in case it is given up.
    pub fn parked(&self, carrier: &str, key: &str, handset: &str) {
        let Some(handset) = self.handset(handset) else {
            return;
        };
        let mut lists = self.lists();
        let parked = lists.parked.entry(carrier.to_owned()).or_default();
        if parked.len() >= PARKED_PER_CARRIER {
            parked.pop_front();
        }
        parked.push_back((key.to_owned(), handset));
    }

    /// A parked receipt that its submit_sm_resp never claimed.
    pub fn given_up(&self, carrier: &str, parked: &crate::store::ParkedReceipt, waited: Duration) {
        let handset = {
            let mut lists = self.lists();
            lists.parked.get_mut(carrier).and_then(|list| {
                let at = list
                    .iter()
                    .position(|(k, _)| *k == parked.carrier_message_id)?;
                list.remove(at).map(|(_, handset)| handset)
            })
        };
        let id = &parked.carrier_message_id;
        self.push(UnmatchedReceipt {
            carrier: carrier.to_owned(),
            id: Some(id.clone()),
            id_as_hex: to_response_form(id, IdForm::Decimal),
            id_as_decimal: to_response_form(id, IdForm::Hex),
            state: Some(parked.state.clone()),
            error_code: parked.error_code.clone(),
            handset,
            received_at: rfc3339(parked.received_at),
            given_up_at: rfc3339(now_ms()),
            reason: format!(
                "no message of this carrier has this id (waited {})",
                humantime::format_duration(waited)
            ),
        });
    }

    fn handset(&self, number: &str) -> Option<String> {
        (!number.is_empty()).then(|| self.pseudonyms.pseudonym(number))
    }

    fn push(&self, entry: UnmatchedReceipt) {
        let mut lists = self.lists();
        let list = lists.unmatched.entry(entry.carrier.clone()).or_default();
        if list.len() >= KEEP_PER_CARRIER {
            list.pop_front();
        }
        list.push_back(entry);
    }
}

/// Gives up, every so often, the receipts of `carrier` parked longer than `after`: they leave
/// the store and join the unmatched list. Runs until `stop`.
pub async fn sweep(
    store: Arc<dyn Store>,
    carrier: String,
    after: Duration,
    log: Arc<UnmatchedLog>,
    stop: CancellationToken,
) {
    let every = (after / 4).clamp(Duration::from_millis(250), Duration::from_secs(10));
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => return,
        }
        let before = now_ms() - after.as_millis() as i64;
        match store.take_unmatched_receipts(&carrier, before).await {
            Ok(receipts) => {
                for parked in &receipts {
                    log.given_up(&carrier, parked, after);
                }
                if !receipts.is_empty() {
                    crate::metrics::receipt_given_up(&carrier, "no_match", receipts.len());
                    tracing::warn!(
                        carrier,
                        receipts = receipts.len(),
                        "receipts matched no message and were given up (see `smsgw receipts unmatched`)"
                    );
                }
            }
            Err(error) => tracing::warn!(carrier, %error, "giving up unmatched receipts failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ParkedReceipt;

    fn log() -> UnmatchedLog {
        UnmatchedLog::new(Pseudonymizer::new(b"0123456789abcdef"))
    }

    fn parked(id: &str) -> ParkedReceipt {
        ParkedReceipt {
            carrier_message_id: id.to_owned(),
            state: "delivered".to_owned(),
            error_code: None,
            received_at: 1_000,
        }
    }

    #[test]
    fn a_given_up_receipt_is_listed_with_its_handset_as_a_pseudonym() {
        let log = log();
        log.parked("acme", "5914401", "46701234567");
        log.given_up("acme", &parked("5914401"), Duration::from_secs(60));
        let listed = log.list(None);
        assert_eq!(listed.len(), 1);
        let entry = &listed[0];
        assert_eq!(entry.id.as_deref(), Some("5914401"));
        assert_eq!(entry.id_as_hex.as_deref(), Some("5A3F21"));
        let handset = entry.handset.as_deref().unwrap();
        assert_eq!(handset.len(), 16);
        let shown = serde_json::to_string(&listed).unwrap();
        assert!(!shown.contains("46701234567"), "{shown}");
        assert!(entry.reason.contains("1m"), "{}", entry.reason);
    }

    #[test]
    fn the_list_is_bounded_per_carrier_and_filtered_by_carrier() {
        let log = log();
        for n in 0..KEEP_PER_CARRIER + 5 {
            log.unreadable("acme", "46701234567", format!("bad {n}"));
        }
        log.unreadable("other", "", "bad".into());
        assert_eq!(log.list(Some("acme")).len(), KEEP_PER_CARRIER);
        assert_eq!(log.list(Some("other")).len(), 1);
        assert_eq!(log.list(None).len(), KEEP_PER_CARRIER + 1);
        assert!(log.list(Some("acme")).iter().all(|e| e.reason != "bad 0"));
        assert_eq!(log.list(Some("other"))[0].handset, None);
    }
}
