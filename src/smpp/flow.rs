//! Flow control of one carrier's link, shared by all its binds: the effective rate, and the
//! carrier's per-minute/hour/day quotas. Pure types with the time passed in, so that they can be
//! tested without a clock or a network.
//!
//! The effective rate follows AIMD: a throttling answer (ESME_RTHROTTLED, ESME_RMSGQFUL) or an
//! SMSC saying it is nearing congestion (the SMPP 5.0 `congestion_state` TLV, DOMAIN.md §1.6)
//! halves it; every accepted submit adds back a hundredth of the configured rate, so the link
//! climbs back to full speed after about a hundred successes. A burst of throttling answers to one
//! window of submits halves the rate once, not once per answer.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// The rate never drops below one segment per second: slower than that, the carrier would
/// better be paused by an operator.
const FLOOR: f64 = 1.0;
/// After a decrease, further throttling answers within this time are the same event (the rest
/// of the window that was in flight) and do not decrease again.
const DECREASE_HOLD: Duration = Duration::from_millis(250);
/// Share of the configured rate one accepted submit adds back.
const INCREASE_SHARE: f64 = 0.01;
/// `congestion_state` from which the SMSC asks us to slow down (90–99 "nearing congestion",
/// 100 "congested"); 80–89 is where a sender should keep it, so there the rate holds.
const CONGESTED_FROM: u8 = 90;
const OPTIMUM_FROM: u8 = 80;

/// The effective rate of a link, in segments per second.
#[derive(Debug, Clone)]
pub struct Aimd {
    configured: f64,
    effective: f64,
    last_decrease: Option<Instant>,
}

impl Aimd {
    pub fn new(configured_per_second: u32) -> Aimd {
        let configured = f64::from(configured_per_second.max(1));
        Aimd {
            configured,
            effective: configured,
            last_decrease: None,
        }
    }

    pub fn effective(&self) -> f64 {
        self.effective
    }

    /// Below the configured rate: the carrier has pushed back recently.
    pub fn is_reduced(&self) -> bool {
        self.effective < self.configured
    }

    /// A new configured rate (a reload); a reduced rate stays where it is if lower.
    pub fn set_configured(&mut self, per_second: u32) {
        self.configured = f64::from(per_second.max(1));
        self.effective = self.effective.min(self.configured);
    }

    /// The carrier refused a submit for load: halve the rate, once per burst.
    pub fn on_throttled(&mut self, now: Instant) {
        if self
            .last_decrease
            .is_some_and(|at| now.duration_since(at) < DECREASE_HOLD)
        {
            return;
        }
        self.last_decrease = Some(now);
        self.effective = (self.effective / 2.0).max(FLOOR);
    }

    /// The carrier accepted a submit, and said how loaded it is if it speaks SMPP 5.0.
    pub fn on_accepted(&mut self, congestion_state: Option<u8>, now: Instant) {
        match congestion_state {
            Some(state) if state >= CONGESTED_FROM => self.on_throttled(now),
            Some(state) if state >= OPTIMUM_FROM => {}
            _ => {
                self.effective =
                    (self.effective + self.configured * INCREASE_SHARE).min(self.configured);
            }
        }
    }

    /// A `congestion_state` seen outside a submit answer (a deliver_sm, an enquire_link_resp).
    pub fn on_congestion(&mut self, state: u8, now: Instant) {
        if state >= CONGESTED_FROM {
            self.on_throttled(now);
        }
    }
}

/// Hands out send times spaced by the effective rate, to every bind of the link.
#[derive(Debug, Clone)]
struct Pacer {
    next: Instant,
}

impl Pacer {
    /// When the next segment may go at `per_second`; reserves that slot.
    fn reserve(&mut self, now: Instant, per_second: f64) -> Instant {
        let at = self.next.max(now);
        self.next = at + Duration::from_secs_f64(1.0 / per_second);
        at
    }
}

/// A carrier's segment quotas, over fixed windows of the UTC clock (the minute, the hour, the
/// day), as carriers count them.
#[derive(Debug, Clone, Default)]
pub struct Quotas {
    windows: Vec<QuotaWindow>,
}

#[derive(Debug, Clone)]
struct QuotaWindow {
    limit: u64,
    period_secs: u64,
    /// Which window `used` counts: Unix seconds divided by the period.
    current: u64,
    used: u64,
}

impl QuotaWindow {
    fn roll(&mut self, unix_secs: u64) {
        let current = unix_secs / self.period_secs;
        if current != self.current {
            self.current = current;
            self.used = 0;
        }
    }
}

impl Quotas {
    /// Quotas per minute, hour and day; `None` is no quota.
    pub fn new(per_minute: Option<u64>, per_hour: Option<u64>, per_day: Option<u64>) -> Quotas {
        let windows = [(per_minute, 60), (per_hour, 3_600), (per_day, 86_400)]
            .into_iter()
            .filter_map(|(limit, period_secs)| {
                limit.map(|limit| QuotaWindow {
                    limit,
                    period_secs,
                    current: 0,
                    used: 0,
                })
            })
            .collect();
        Quotas { windows }
    }

    /// Counts one segment if every quota has room; otherwise `Err` with the Unix second at which
    /// the fullest window ends.
    pub fn try_take(&mut self, unix_secs: u64) -> Result<(), u64> {
        for window in &mut self.windows {
            window.roll(unix_secs);
        }
        if let Some(reopens) = self
            .windows
            .iter()
            .filter(|w| w.used >= w.limit)
            .map(|w| (w.current + 1) * w.period_secs)
            .max()
        {
            return Err(reopens);
        }
        for window in &mut self.windows {
            window.used += 1;
        }
        Ok(())
    }

    /// Some quota is used up at `unix_secs`.
    pub fn exhausted(&self, unix_secs: u64) -> bool {
        self.windows
            .iter()
            .any(|w| unix_secs / w.period_secs == w.current && w.used >= w.limit)
    }
}

/// The flow state of one carrier's link, shared by its binds.
#[derive(Debug)]
pub struct LinkFlow {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    aimd: Aimd,
    pacer: Pacer,
    quotas: Quotas,
}

impl LinkFlow {
    /// `per_second` is the configured rate of the whole link (all its binds together).
    pub fn new(per_second: u32, quotas: Quotas) -> LinkFlow {
        LinkFlow {
            state: Mutex::new(State {
                aimd: Aimd::new(per_second),
                pacer: Pacer {
                    next: Instant::now(),
                },
                quotas,
            }),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner))
    }

    pub fn effective_rate(&self) -> f64 {
        self.with(|s| s.aimd.effective())
    }

    pub fn is_reduced(&self) -> bool {
        self.with(|s| s.aimd.is_reduced())
    }

    /// When a segment taken now may be written. At the configured rate, each bind's own rate
    /// limiter is the only limit; while reduced, the link's binds share one paced rate.
    pub fn send_at(&self, now: Instant) -> Instant {
        self.with(|s| {
            if s.aimd.is_reduced() {
                s.pacer.reserve(now, s.aimd.effective())
            } else {
                s.pacer.next = now;
                now
            }
        })
    }

    /// A new configured rate for the whole link (a reload).
    pub fn set_configured_rate(&self, per_second: u32) {
        self.with(|s| s.aimd.set_configured(per_second));
    }

    pub fn on_throttled(&self, now: Instant) {
        self.with(|s| s.aimd.on_throttled(now));
    }

    pub fn on_accepted(&self, congestion_state: Option<u8>, now: Instant) {
        self.with(|s| s.aimd.on_accepted(congestion_state, now));
    }

    pub fn on_congestion(&self, state: u8, now: Instant) {
        self.with(|s| s.aimd.on_congestion(state, now));
    }

    /// Takes one segment of the quotas, if they have room.
    pub fn try_take_quota(&self, unix_secs: u64) -> bool {
        self.with(|s| s.quotas.try_take(unix_secs).is_ok())
    }

    pub fn quota_exhausted(&self, unix_secs: u64) -> bool {
        self.with(|s| s.quotas.exhausted(unix_secs))
    }
}

/// Seconds since the Unix epoch, for the quota windows.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttling_halves_the_rate_once_per_burst() {
        let t0 = Instant::now();
        let mut aimd = Aimd::new(100);
        assert!(!aimd.is_reduced());
        aimd.on_throttled(t0);
        for _ in 0..9 {
            aimd.on_throttled(t0 + Duration::from_millis(50));
        }
        assert_eq!(
            aimd.effective(),
            50.0,
            "one window's refusals are one event"
        );
        aimd.on_throttled(t0 + DECREASE_HOLD);
        assert_eq!(aimd.effective(), 25.0);
        assert!(aimd.is_reduced());
    }

    #[test]
    fn the_rate_never_falls_below_the_floor() {
        let mut aimd = Aimd::new(4);
        let t0 = Instant::now();
        for i in 0..10 {
            aimd.on_throttled(t0 + DECREASE_HOLD * i);
        }
        assert_eq!(aimd.effective(), FLOOR);
    }

    #[test]
    fn accepted_submits_climb_back_to_the_configured_rate_and_no_higher() {
        let t0 = Instant::now();
        let mut aimd = Aimd::new(100);
        aimd.on_throttled(t0);
        aimd.on_accepted(None, t0);
        assert_eq!(aimd.effective(), 51.0);
        for _ in 0..100 {
            aimd.on_accepted(None, t0);
        }
        assert_eq!(aimd.effective(), 100.0);
        assert!(!aimd.is_reduced());
    }

    #[test]
    fn congestion_state_steers_the_rate() {
        let t0 = Instant::now();
        let mut aimd = Aimd::new(100);
        aimd.on_accepted(Some(95), t0);
        assert_eq!(aimd.effective(), 50.0, "nearing congestion slows down");
        aimd.on_accepted(Some(85), t0 + DECREASE_HOLD);
        assert_eq!(aimd.effective(), 50.0, "the optimum load holds the rate");
        aimd.on_accepted(Some(40), t0 + DECREASE_HOLD);
        assert_eq!(
            aimd.effective(),
            51.0,
            "a lightly loaded SMSC lets it climb"
        );
        aimd.on_congestion(100, t0 + DECREASE_HOLD * 2);
        assert_eq!(aimd.effective(), 25.5);
    }

    #[test]
    fn a_lower_configured_rate_caps_the_effective_one() {
        let mut aimd = Aimd::new(100);
        aimd.set_configured(10);
        assert_eq!(aimd.effective(), 10.0);
        aimd.set_configured(1000);
        assert_eq!(aimd.effective(), 10.0, "a higher one is climbed to");
    }

    #[test]
    fn the_pacer_spaces_sends_by_the_rate() {
        let t0 = Instant::now();
        let mut pacer = Pacer { next: t0 };
        assert_eq!(pacer.reserve(t0, 10.0), t0);
        assert_eq!(pacer.reserve(t0, 10.0), t0 + Duration::from_millis(100));
        let later = t0 + Duration::from_secs(5);
        assert_eq!(
            pacer.reserve(later, 10.0),
            later,
            "idle time is not saved up"
        );
    }

    #[test]
    fn a_reduced_link_paces_its_binds_together() {
        let flow = LinkFlow::new(100, Quotas::default());
        let t0 = Instant::now();
        assert_eq!(flow.send_at(t0), t0);
        assert_eq!(
            flow.send_at(t0),
            t0,
            "at full rate the binds' limiters decide"
        );
        flow.on_throttled(t0);
        let first = flow.send_at(t0);
        let second = flow.send_at(t0);
        assert_eq!(second - first, Duration::from_millis(20), "50 per second");
    }

    #[test]
    fn a_quota_holds_segments_until_its_window_ends() {
        let mut quotas = Quotas::new(Some(2), None, Some(3));
        let minute = 1_000_020; // 1_000_020 / 60 = 16_667 → window ends at 1_000_080
        assert_eq!(quotas.try_take(minute), Ok(()));
        assert_eq!(quotas.try_take(minute + 1), Ok(()));
        assert!(quotas.exhausted(minute + 2));
        assert_eq!(quotas.try_take(minute + 2), Err(1_000_080));
        assert!(!quotas.exhausted(1_000_080), "a new minute");
        assert_eq!(quotas.try_take(1_000_080), Ok(()));
        let day_end = (1_000_080 / 86_400 + 1) * 86_400;
        assert_eq!(
            quotas.try_take(1_000_150),
            Err(day_end),
            "the day's quota of 3 is used"
        );
    }

    #[test]
    fn no_quota_never_holds() {
        let mut quotas = Quotas::new(None, None, None);
        for s in 0..10_000 {
            assert_eq!(quotas.try_take(s / 10), Ok(()));
        }
    }
}
