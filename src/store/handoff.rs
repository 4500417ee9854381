//! Webhooks handed from the store straight to the webhook sender of this process.
//!
//! A webhook reports a status change and must survive a crash from the commit of that change
//! on. Writing it to the outbox and deleting it once posted cost the SQLite writer more than
//! the change itself. So while the sender has room, the store marks the status event as its
//! durable copy instead (`events.hook`) and, once the transaction has committed, hands the job
//! over in memory. The store keeps a cursor, `settled_through`: every handed event up to it
//! has been posted, given up, or written to the outbox by the sender's results. After a crash,
//! the handed events past it are written to the outbox when the store opens (at-least-once).
//! Without room (no sender running, or a sender that is behind) webhooks go to the outbox and
//! are claimed from there.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use tokio::sync::Notify;

use super::WebhookJob;

#[derive(Debug)]
pub struct Handoff {
    /// Jobs the sender will still take: reserved by the store per webhook handed, given back
    /// by the sender when a handed job's post is done.
    room: AtomicUsize,
    /// No sender takes jobs (before it opens, after it closes): room stays 0.
    closed: AtomicBool,
    state: Mutex<State>,
    /// Rings when jobs are handed.
    pub handed: Notify,
}

#[derive(Debug, Default)]
struct State {
    /// Handed jobs whose transaction has committed, not yet taken by the sender.
    ready: Vec<WebhookJob>,
    /// The event ids of handed jobs whose result is not recorded yet.
    unsettled: BTreeSet<i64>,
    /// The highest event id handed (ids grow with every commit).
    handed_through: i64,
}

impl Default for Handoff {
    fn default() -> Handoff {
        Handoff {
            room: AtomicUsize::new(0),
            closed: AtomicBool::new(true),
            state: Mutex::new(State::default()),
            handed: Notify::new(),
        }
    }
}

impl Handoff {
    /// The sender starts taking jobs, at most `room` at a time.
    pub fn open(&self, room: usize) {
        self.closed.store(false, Ordering::SeqCst);
        self.room.store(room, Ordering::SeqCst);
    }

    /// The sender stops: nothing more is handed; returns what was handed and not taken. A job
    /// whose transaction was still open stays unsettled: the next start posts it.
    pub fn close(&self) -> Vec<WebhookJob> {
        self.closed.store(true, Ordering::SeqCst);
        self.room.store(0, Ordering::SeqCst);
        self.take()
    }

    /// The store reserves room for one webhook: true to hand it after commit, false to write
    /// it to the outbox.
    pub fn reserve(&self) -> bool {
        self.room
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |room| {
                room.checked_sub(1)
            })
            .is_ok()
    }

    /// Gives back room reserved for jobs that will not be handed (their transaction failed),
    /// or whose post is done.
    pub fn give_back(&self, jobs: usize) {
        if jobs > 0 && !self.closed.load(Ordering::SeqCst) {
            self.room.fetch_add(jobs, Ordering::AcqRel);
        }
    }

    /// Hands over jobs whose transaction has committed, in event id order.
    pub fn hand(&self, jobs: Vec<WebhookJob>) {
        let Some(last) = jobs.last().map(|job| job.id) else {
            return;
        };
        let mut state = self.state();
        state.unsettled.extend(jobs.iter().map(|job| job.id));
        state.handed_through = state.handed_through.max(last);
        state.ready.extend(jobs);
        drop(state);
        self.handed.notify_one();
    }

    /// The handed jobs, oldest first.
    pub fn take(&self) -> Vec<WebhookJob> {
        std::mem::take(&mut self.state().ready)
    }

    /// Marks handed events settled by results about to be stored, and returns the cursor to
    /// store with them: every event handed up to it is settled. `None` before any handing.
    pub fn settle(&self, events: &[i64]) -> Option<i64> {
        let mut state = self.state();
        for id in events {
            state.unsettled.remove(id);
        }
        match state.unsettled.first() {
            Some(first) => Some(first - 1),
            None => (state.handed_through > 0).then_some(state.handed_through),
        }
    }

    /// Takes back a settlement whose results could not be stored: the cursor stays before
    /// those events, so a restart posts them again.
    pub fn unsettle(&self, events: &[i64]) {
        self.state().unsettled.extend(events);
    }

    /// Handed webhooks whose result is not stored yet.
    pub fn unsettled(&self) -> usize {
        self.state().unsettled.len()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::WebhookCopy;

    fn job(id: i64) -> WebhookJob {
        WebhookJob {
            id,
            copy: WebhookCopy::Event,
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
        assert!(!handoff.reserve());
        handoff.open(2);
        assert!(handoff.reserve());
        assert!(handoff.reserve());
        assert!(!handoff.reserve());
        handoff.give_back(1);
        assert!(handoff.reserve());
    }

    #[test]
    fn closing_stops_the_handing_and_returns_what_was_not_taken() {
        let handoff = Handoff::default();
        handoff.open(8);
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
        assert!(!handoff.reserve());
        // Posts that finish after the close give nothing back.
        handoff.give_back(3);
        assert!(!handoff.reserve());
    }

    #[test]
    fn the_cursor_stops_before_the_oldest_unsettled_event() {
        let handoff = Handoff::default();
        assert_eq!(handoff.settle(&[]), None);
        handoff.hand(vec![job(4), job(7)]);
        handoff.hand(vec![job(9)]);
        assert_eq!(handoff.settle(&[7, 9]), Some(3));
        assert_eq!(handoff.unsettled(), 1);
        handoff.unsettle(&[9]);
        assert_eq!(handoff.settle(&[4]), Some(8));
        assert_eq!(handoff.settle(&[9]), Some(9));
        assert_eq!(handoff.unsettled(), 0);
    }
}
