//! Request rate limits of accounts and of single API keys (GCRA, governor). A limit is a rate
//! per second and a burst: a client may make `burst` requests at once, then one every
//! `1/rate` seconds. A request over the limit is answered `429 rate_limited` with `Retry-After`.

use std::fmt;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// One limit, for one account or one key. Its state lives as long as the account table: a
/// reload (SIGHUP) starts every limit with a full burst.
pub struct RateLimit {
    limiter: DefaultDirectRateLimiter,
    clock: DefaultClock,
}

impl RateLimit {
    /// `None` when there is no limit (`rate_per_second` absent or 0). The burst defaults to one
    /// second's worth of requests.
    pub fn new(rate_per_second: Option<u32>, burst: Option<u32>) -> Option<RateLimit> {
        let rate = NonZeroU32::new(rate_per_second?)?;
        let burst = burst.and_then(NonZeroU32::new).unwrap_or(rate);
        Some(RateLimit {
            limiter: RateLimiter::direct(Quota::per_second(rate).allow_burst(burst)),
            clock: DefaultClock::default(),
        })
    }

    /// Takes one request from the limit, or says how long until one is allowed.
    pub fn check(&self) -> Result<(), Duration> {
        self.limiter
            .check()
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }
}

impl fmt::Debug for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RateLimit")
    }
}

/// What `Retry-After` says for a wait: whole seconds, rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    (wait.as_secs_f64().ceil() as u64).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_allows_its_burst_then_says_how_long_to_wait() {
        let limit = RateLimit::new(Some(1), Some(3)).unwrap();
        for _ in 0..3 {
            assert_eq!(limit.check(), Ok(()));
        }
        let wait = limit.check().unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
    }

    #[test]
    fn no_rate_is_no_limit() {
        assert!(RateLimit::new(None, Some(5)).is_none());
        assert!(RateLimit::new(Some(0), None).is_none());
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(10)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
    }
}
