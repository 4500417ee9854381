//! Webhooks handed from the store straight to the webhook sender of this process.
//!
//! A webhook is written to the outbox in the transaction of the change it reports. Claiming it
//! back (an UPDATE through an index, a trip through the writer) cost more than writing it. So
//! while the sender has room, the store writes the row already leased to this process and,
//! once the transaction has committed, hands the job over in memory. The row stays the durable
//! copy: if the process dies before posting, the lease ends and the webhook is claimed again,
//! as a claimed one would be. Without room (no sender running, or a sender that is behind) rows
//! are written unleased and claimed as before.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};

use tokio::sync::Notify;

use super::WebhookJob;

#[derive(Debug)]
pub struct Handoff {
    /// Jobs the sender will still take: reserved by the store per webhook written leased,
    /// given back by the sender when a handed job's post is done.
    room: AtomicUsize,
    /// No sender takes jobs (before it opens, after it closes): room stays 0.
    closed: AtomicBool,
    /// The lease a handed row is written with, in milliseconds (the sender's choice).
    lease_ms: AtomicI64,
    /// Handed jobs whose transaction has committed, not yet taken by the sender.
    ready: Mutex<Vec<WebhookJob>>,
    /// Rings when `ready` gets jobs.
    pub handed: Notify,
}

impl Default for Handoff {
    fn default() -> Handoff {
        Handoff {
            room: AtomicUsize::new(0),
            closed: AtomicBool::new(true),
            lease_ms: AtomicI64::new(0),
            ready: Mutex::new(Vec::new()),
            handed: Notify::new(),
        }
    }
}

impl Handoff {
    /// The sender starts taking jobs: at most `room` at a time, leased for `lease_ms`.
    pub fn open(&self, room: usize, lease_ms: i64) {
        self.lease_ms.store(lease_ms, Ordering::SeqCst);
        self.closed.store(false, Ordering::SeqCst);
        self.room.store(room, Ordering::SeqCst);
    }

    /// The sender stops: nothing more is handed; returns what was handed and not taken. A job
    /// whose transaction was still open stays leased and is claimed when its lease ends.
    pub fn close(&self) -> Vec<WebhookJob> {
        self.closed.store(true, Ordering::SeqCst);
        self.room.store(0, Ordering::SeqCst);
        self.take()
    }

    /// The store reserves room for one webhook: `Some(lease_until)` to write it leased and
    /// hand it after commit, `None` to write it for a claim.
    pub fn reserve(&self, now: i64) -> Option<i64> {
        self.room
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |room| {
                room.checked_sub(1)
            })
            .ok()
            .map(|_| now + self.lease_ms.load(Ordering::Acquire))
    }

    /// Gives back room reserved for jobs that will not be handed (their transaction failed),
    /// or whose post is done.
    pub fn give_back(&self, jobs: usize) {
        if jobs > 0 && !self.closed.load(Ordering::SeqCst) {
            self.room.fetch_add(jobs, Ordering::AcqRel);
        }
    }

    /// Hands over jobs whose transaction has committed.
    pub fn hand(&self, jobs: Vec<WebhookJob>) {
        if jobs.is_empty() {
            return;
        }
        self.ready
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .extend(jobs);
        self.handed.notify_one();
    }

    /// The handed jobs, oldest first.
    pub fn take(&self) -> Vec<WebhookJob> {
        std::mem::take(
            &mut *self
                .ready
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: i64) -> WebhookJob {
        WebhookJob {
            id,
            account: "a".into(),
            url: "http://127.0.0.1:9/".into(),
            payload: "{}".into(),
            attempts: 1,
            created_at: 0,
        }
    }

    #[test]
    fn nothing_is_handed_until_a_sender_opens_and_then_only_its_room() {
        let handoff = Handoff::default();
        assert_eq!(handoff.reserve(1_000), None);
        handoff.open(2, 30_000);
        assert_eq!(handoff.reserve(1_000), Some(31_000));
        assert_eq!(handoff.reserve(1_000), Some(31_000));
        assert_eq!(handoff.reserve(1_000), None);
        handoff.give_back(1);
        assert_eq!(handoff.reserve(1_000), Some(31_000));
    }

    #[test]
    fn closing_stops_the_handing_and_returns_what_was_not_taken() {
        let handoff = Handoff::default();
        handoff.open(8, 30_000);
        handoff.hand(vec![job(1), job(2)]);
        assert_eq!(
            handoff.take().iter().map(|j| j.id).collect::<Vec<_>>(),
            [1, 2]
        );
        handoff.hand(vec![job(3)]);
        assert_eq!(
            handoff.close().iter().map(|j| j.id).collect::<Vec<_>>(),
            [3]
        );
        assert_eq!(handoff.reserve(0), None);
        // Posts that finish after the close give nothing back.
        handoff.give_back(3);
        assert_eq!(handoff.reserve(0), None);
    }
}
