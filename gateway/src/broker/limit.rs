//! Token buckets that keep one source address or one device from crowding out the others: new
//! connections per source IP (the front's accept loop) and publishes per device (sessions).
//!
//! Pure: the time is an argument, so the tests drive the buckets with a made-up clock.
//!
//! Invariants:
//! - A bucket holds at most `burst` tokens and gains `per_second` tokens per second; taking one
//!   token is one connection or one publish.
//! - A bucket that has refilled to `burst` behaves exactly like a new one, so a table may forget
//!   it at any time. That is how [`Table`] stays bounded: when it is full it first drops every
//!   full bucket, then the fullest remaining one (the key limited least).

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Instant;

/// How fast a bucket refills and how much it holds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: f64,
}

impl Rate {
    pub fn new(per_second: f64, burst: u32) -> Rate {
        Rate {
            per_second: per_second.max(0.0),
            burst: f64::from(burst.max(1)),
        }
    }
}

/// Tokens left at a point in time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenBucket {
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// A bucket holding `rate.burst` tokens at `now`.
    pub fn full(rate: Rate, now: Instant) -> TokenBucket {
        TokenBucket {
            tokens: rate.burst,
            at: now,
        }
    }

    /// Takes one token if there is one at `now`. A clock that goes backwards adds nothing.
    pub fn try_take(&mut self, rate: Rate, now: Instant) -> bool {
        self.tokens = self.tokens_at(rate, now);
        self.at = self.at.max(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// How long from `now` until the bucket holds a whole token (zero if it does). A bucket
    /// that never refills is looked at again every second. A wait is at least a millisecond
    /// (the resolution of tokio's timers): a bucket a rounding error short of a token would
    /// otherwise give a wait of zero while `try_take` still fails, and its session would spin
    /// (for ever on a paused clock; found by the session simulation).
    pub fn until_token(&self, rate: Rate, now: Instant) -> std::time::Duration {
        let missing = 1.0 - self.tokens_at(rate, now);
        if missing <= 0.0 {
            return std::time::Duration::ZERO;
        }
        if rate.per_second <= 0.0 {
            return std::time::Duration::from_secs(1);
        }
        std::time::Duration::from_secs_f64(missing / rate.per_second)
            .max(std::time::Duration::from_millis(1))
    }

    /// Tokens the bucket holds at `now`.
    pub fn tokens_at(&self, rate: Rate, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        (self.tokens + elapsed * rate.per_second).min(rate.burst)
    }

    /// Whether the bucket has refilled completely by `now` (and so can be forgotten).
    pub fn is_full(&self, rate: Rate, now: Instant) -> bool {
        self.tokens_at(rate, now) >= rate.burst
    }
}

/// One bucket per key (source address, device id), at most `capacity` of them.
#[derive(Debug)]
pub struct Table<K> {
    rate: Rate,
    capacity: usize,
    buckets: HashMap<K, TokenBucket>,
}

impl<K: Hash + Eq + Clone> Table<K> {
    pub fn new(rate: Rate, capacity: usize) -> Table<K> {
        Table {
            rate,
            capacity: capacity.max(1),
            buckets: HashMap::new(),
        }
    }

    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// Takes one token from `key`'s bucket; a key seen for the first time starts full.
    pub fn try_take(&mut self, key: K, now: Instant) -> bool {
        if let Some(bucket) = self.buckets.get_mut(&key) {
            return bucket.try_take(self.rate, now);
        }
        let mut bucket = TokenBucket::full(self.rate, now);
        let taken = bucket.try_take(self.rate, now);
        self.insert(key, bucket, now);
        taken
    }

    /// Removes and returns `key`'s bucket, or a full one if it has none.
    pub fn take(&mut self, key: &K, now: Instant) -> TokenBucket {
        self.buckets
            .remove(key)
            .unwrap_or_else(|| TokenBucket::full(self.rate, now))
    }

    /// Keeps `bucket` for `key` until [`Table::take`]; a full bucket is not worth keeping.
    pub fn put(&mut self, key: K, bucket: TokenBucket, now: Instant) {
        if !bucket.is_full(self.rate, now) {
            self.insert(key, bucket, now);
        }
    }

    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    fn insert(&mut self, key: K, bucket: TokenBucket, now: Instant) {
        if self.buckets.len() >= self.capacity && !self.buckets.contains_key(&key) {
            let rate = self.rate;
            self.buckets.retain(|_, b| !b.is_full(rate, now));
            if self.buckets.len() >= self.capacity {
                // Every key is being limited: forget the one limited least. This scan runs
                // only while more than `capacity` sources are all busy at once.
                let fullest = self
                    .buckets
                    .iter()
                    .max_by(|a, b| {
                        a.1.tokens_at(rate, now)
                            .total_cmp(&b.1.tokens_at(rate, now))
                    })
                    .map(|(k, _)| k.clone());
                if let Some(k) = fullest {
                    self.buckets.remove(&k);
                }
            }
        }
        self.buckets.insert(key, bucket);
    }
}

#[cfg(test)]
mod tests;
