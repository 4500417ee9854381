//! Which carrier takes a message. A pure choice over the carriers' state, so it can be tested
//! without a network.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::smpp::Carrier;

pub struct Router {
    carriers: Vec<Arc<Carrier>>,
    next: AtomicUsize,
}

impl Router {
    pub fn new(carriers: Vec<Arc<Carrier>>) -> Router {
        Router {
            carriers,
            next: AtomicUsize::new(0),
        }
    }

    pub fn carriers(&self) -> &[Arc<Carrier>] {
        &self.carriers
    }

    /// Some carrier can take messages now.
    pub fn any_usable(&self) -> bool {
        self.carriers.iter().any(|c| c.is_usable())
    }

    pub fn find(&self, name: &str) -> Option<&Arc<Carrier>> {
        self.carriers.iter().find(|c| c.name == name)
    }

    /// A carrier with a live bind that is not paused, taking turns between them; `None` when none is bound, so
    /// the message waits in the store rather than in a dead link's queue.
    pub fn route(&self) -> Option<&Arc<Carrier>> {
        let bound: Vec<bool> = self.carriers.iter().map(|c| c.is_usable()).collect();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        pick(&bound, start).map(|i| &self.carriers[i])
    }
}

/// The first bound carrier at or after `start` (modulo their number).
fn pick(bound: &[bool], start: usize) -> Option<usize> {
    let n = bound.len();
    (0..n).map(|k| (start + k) % n).find(|&i| bound[i])
}

#[cfg(test)]
mod tests {
    use super::pick;

    #[test]
    fn only_bound_carriers_are_chosen_in_turn() {
        assert_eq!(pick(&[true, true], 0), Some(0));
        assert_eq!(pick(&[true, true], 1), Some(1));
        assert_eq!(pick(&[false, true], 0), Some(1));
        assert_eq!(pick(&[true, false], 1), Some(0));
        assert_eq!(pick(&[false, false], 0), None);
        assert_eq!(pick(&[], 0), None);
    }
}
