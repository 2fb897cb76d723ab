//! A per-source-address limit on join attempts: a token bucket per IP
//! address. Anyone on the network can open aTLS connections and post
//! evidence, and each attempt costs the gate signature and certificate
//! checks; one source gets a burst, then a steady rate, and a `429` with
//! `Retry-After` beyond it. The table is bounded: buckets that have refilled
//! are forgotten first.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most addresses tracked at once.
const MAX_TRACKED: usize = 16_384;

/// Burst and steady rate of join attempts per source address.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttemptLimit {
    pub burst: u32,
    pub per_minute: u32,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets per source address.
#[derive(Debug)]
pub struct Limiter {
    limit: AttemptLimit,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl Limiter {
    pub fn new(limit: AttemptLimit) -> Self {
        Self {
            limit,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn per_second(&self) -> f64 {
        f64::from(self.limit.per_minute) / 60.0
    }

    fn refill(&self, bucket: Bucket, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        (bucket.tokens + elapsed * self.per_second()).min(f64::from(self.limit.burst))
    }

    /// Takes one attempt for `source` at `now`; `Err(wait)` when none is
    /// left, with how long until the next one.
    pub fn attempt(&self, source: IpAddr, now: Instant) -> Result<(), Duration> {
        let burst = f64::from(self.limit.burst);
        let Ok(mut buckets) = self.buckets.lock() else {
            // A poisoned table: refuse rather than run unlimited.
            return Err(Duration::from_secs(1));
        };
        if buckets.len() >= MAX_TRACKED && !buckets.contains_key(&source) {
            buckets.retain(|_, b| self.refill(*b, now) < burst);
            if buckets.len() >= MAX_TRACKED {
                buckets.clear();
            }
        }
        let bucket = buckets.entry(source).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let tokens = self.refill(*bucket, now);
        // Refills add up in floating point; a hair below one is one.
        if tokens >= 1.0 - 1e-9 {
            *bucket = Bucket {
                tokens: tokens - 1.0,
                at: now,
            };
            return Ok(());
        }
        *bucket = Bucket { tokens, at: now };
        let rate = self.per_second();
        if rate <= 0.0 {
            return Err(Duration::from_secs(3600));
        }
        Err(Duration::from_secs_f64(((1.0 - tokens) / rate).max(0.0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn a_burst_then_the_steady_rate() {
        let limiter = Limiter::new(AttemptLimit {
            burst: 3,
            per_minute: 60,
        });
        let t0 = Instant::now();
        for _ in 0..3 {
            limiter.attempt(ip(1), t0).expect("within the burst");
        }
        let wait = limiter.attempt(ip(1), t0).unwrap_err();
        assert!(
            wait > Duration::from_millis(900) && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        // Another source is not affected.
        limiter.attempt(ip(2), t0).expect("own bucket");
        // One attempt per second comes back.
        limiter
            .attempt(ip(1), t0 + Duration::from_secs(1))
            .expect("refilled one");
        assert!(limiter.attempt(ip(1), t0 + Duration::from_secs(1)).is_err());
        // Never more than the burst, however long the pause.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..3 {
            limiter.attempt(ip(1), later).expect("burst again");
        }
        assert!(limiter.attempt(ip(1), later).is_err());
    }

    #[test]
    fn refused_attempts_do_not_earn_credit() {
        let limiter = Limiter::new(AttemptLimit {
            burst: 1,
            per_minute: 6,
        });
        let t0 = Instant::now();
        limiter.attempt(ip(1), t0).expect("first");
        for s in 1..10 {
            assert!(limiter.attempt(ip(1), t0 + Duration::from_secs(s)).is_err());
        }
        limiter
            .attempt(ip(1), t0 + Duration::from_secs(10))
            .expect("ten seconds later");
    }

    #[test]
    fn the_table_stays_bounded() {
        let limiter = Limiter::new(AttemptLimit {
            burst: 2,
            per_minute: 60,
        });
        let t0 = Instant::now();
        for i in 0..(MAX_TRACKED as u32 + 10) {
            limiter
                .attempt(IpAddr::from(i.to_be_bytes()), t0)
                .expect("fresh source");
        }
        let len = limiter
            .buckets
            .lock()
            .map(|b| b.len())
            .unwrap_or(usize::MAX);
        assert!(len <= MAX_TRACKED, "{len}");
    }
}
