//! Slows down guessing: repeated authentication failures from one address
//! wait longer and longer for their answer. Pure: the clock is passed in.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use tokio::time::Instant;

/// Failures forgiven without a delay.
const FREE: u32 = 3;
/// The first delay, doubled with each further failure.
const FIRST: Duration = Duration::from_millis(200);
/// The longest delay.
pub const MAX: Duration = Duration::from_secs(5);
/// An address with no failure for this long starts afresh.
const FORGET: Duration = Duration::from_secs(60);
/// Addresses remembered at most (a flood of addresses cannot grow it).
const CAPACITY: usize = 10_000;

#[derive(Debug, Default)]
pub struct Throttle {
    failures: HashMap<IpAddr, (u32, Instant)>,
}

impl Throttle {
    /// Notes a failure from `ip`; how long to wait before answering it.
    pub fn failed(&mut self, ip: IpAddr, now: Instant) -> Duration {
        if self.failures.len() >= CAPACITY && !self.failures.contains_key(&ip) {
            self.failures.retain(|_, (_, at)| now - *at < FORGET);
            if self.failures.len() >= CAPACITY {
                self.failures.clear();
            }
        }
        let (count, at) = self.failures.entry(ip).or_insert((0, now));
        if now - *at >= FORGET {
            *count = 0;
        }
        *count += 1;
        *at = now;
        delay(*count)
    }

    /// The delay `ip`'s recent failures have earned, before it is even
    /// checked again (so that many attempts at once wait too). A success
    /// does not forget them: one known password must not reset the count
    /// for guesses at others.
    pub fn earned(&self, ip: IpAddr, now: Instant) -> Duration {
        match self.failures.get(&ip) {
            Some((count, at)) if now - *at < FORGET => delay(*count),
            _ => Duration::ZERO,
        }
    }
}

/// The delay after `count` failures in a row.
fn delay(count: u32) -> Duration {
    match count.checked_sub(FREE + 1) {
        None => Duration::ZERO,
        Some(n) => FIRST.saturating_mul(1u32 << n.min(16)).min(MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn delays_grow_per_address_and_are_forgotten() {
        let mut t = Throttle::default();
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.5".parse().unwrap(), "10.0.0.6".parse().unwrap());
        let delays: Vec<_> = (0..8).map(|_| t.failed(a, Instant::now())).collect();
        let ms = |d: &Duration| d.as_millis();
        assert_eq!(
            delays.iter().map(ms).collect::<Vec<_>>(),
            [0, 0, 0, 200, 400, 800, 1600, 3200]
        );
        assert_eq!(t.failed(a, Instant::now()), MAX);
        assert_eq!(t.failed(a, Instant::now()), MAX);
        assert_eq!(t.failed(b, Instant::now()), Duration::ZERO, "per address");
        tokio::time::advance(FORGET).await;
        assert_eq!(t.failed(a, Instant::now()), Duration::ZERO, "forgotten");
        for _ in 0..5 {
            t.failed(b, Instant::now());
        }
        assert_eq!(t.earned(b, Instant::now()), Duration::from_millis(400));
        tokio::time::advance(FORGET).await;
        assert_eq!(t.earned(b, Instant::now()), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn many_addresses_cannot_grow_it_without_bound() {
        let mut t = Throttle::default();
        for i in 0..(CAPACITY as u32 + 10) {
            t.failed(IpAddr::from(i.to_be_bytes()), Instant::now());
        }
        assert!(t.failures.len() <= CAPACITY);
    }
}
