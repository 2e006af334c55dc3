//! Connections per source address, per listener: one host (a misconfigured device looping on
//! reconnect, a TLS slowloris) cannot take every slot of `max_connections`. Loopback peers are
//! processes on the gateway itself and are not counted unless `limit_loopback` says so.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use tracing::warn;

use crate::ratelimit::LogLimit;

/// Open connections by source address.
type Counts = Arc<Mutex<HashMap<IpAddr, usize>>>;

pub struct PerAddress {
    max: usize,
    limit_loopback: bool,
    listen: SocketAddr,
    counts: Counts,
}

/// A counted connection; dropping it gives the slot back.
pub struct Slot {
    counts: Option<(Counts, IpAddr)>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some((counts, ip)) = self.counts.take() {
            let mut c = counts.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = c.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    c.remove(&ip);
                }
            }
        }
    }
}

/// IPv4-mapped IPv6 addresses count as the IPv4 address they carry.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

impl PerAddress {
    /// `max` = 0: no limit.
    pub fn new(max: usize, limit_loopback: bool, listen: SocketAddr) -> Self {
        Self {
            max,
            limit_loopback,
            listen,
            counts: Arc::default(),
        }
    }

    /// A slot for a connection from `ip`, or None when that address holds `max` already.
    pub fn admit(&self, ip: IpAddr) -> Option<Slot> {
        let ip = canonical(ip);
        if self.max == 0 || (ip.is_loopback() && !self.limit_loopback) {
            return Some(Slot { counts: None });
        }
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(ip).or_insert(0);
        if *n >= self.max {
            static LOG: LogLimit = LogLimit::new();
            if let Some(suppressed) = LOG.allow() {
                warn!(peer = %ip, listen = %self.listen, max = self.max, suppressed,
                    "connection refused: ingress.frontdoor.max_connections_per_address reached");
            }
            return None;
        }
        *n += 1;
        Some(Slot {
            counts: Some((Arc::clone(&self.counts), ip)),
        })
    }
}

/// A connection's inbound byte rate: a token bucket holding at most one second of the rate.
/// Past it the connection is not read until the bucket refills, so one client flooding its
/// socket (huge messages as fast as the socket takes them) slows itself, not the others (TCP
/// backpressure, as with a full receive window).
#[derive(Debug)]
pub struct ByteRate {
    rate: f64,
    tokens: f64,
    at: tokio::time::Instant,
}

impl ByteRate {
    /// `bytes_per_second` = 0: no limit.
    pub fn new(bytes_per_second: u64, now: tokio::time::Instant) -> Option<Self> {
        (bytes_per_second > 0).then_some(Self {
            rate: bytes_per_second as f64,
            tokens: bytes_per_second as f64,
            at: now,
        })
    }

    /// Takes `n` bytes just read; returns when the connection may be read again (None: now).
    pub fn take(&mut self, n: usize, now: tokio::time::Instant) -> Option<tokio::time::Instant> {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate) - n as f64;
        (self.tokens < 0.0)
            .then(|| now + std::time::Duration::from_secs_f64(-self.tokens / self.rate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_byte_rate_lets_a_second_through_then_paces() {
        use std::time::Duration;
        let t0 = tokio::time::Instant::now();
        assert!(ByteRate::new(0, t0).is_none());
        let mut r = ByteRate::new(1000, t0).unwrap();
        assert_eq!(r.take(600, t0), None);
        assert_eq!(r.take(400, t0), None);
        // 500 over: half a second before the next read.
        let wait = r.take(500, t0).unwrap();
        assert_eq!(wait - t0, Duration::from_millis(500));
        // A second later the bucket holds 500 (refilled 1000 from -500).
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(r.take(500, t1), None);
        // It never holds more than a second's worth.
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!(r.take(1000, t2), None);
        assert!(r.take(1, t2).is_some());
    }

    #[test]
    fn an_address_gets_max_slots_and_gets_them_back() {
        let l = PerAddress::new(2, false, "0.0.0.0:8883".parse().unwrap());
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        let s1 = l.admit(a).unwrap();
        let _s2 = l.admit(mapped).unwrap();
        assert!(l.admit(a).is_none(), "the third from one address");
        assert!(l.admit("192.0.2.2".parse().unwrap()).is_some());
        drop(s1);
        assert!(l.admit(a).is_some());
        // Loopback is not counted by default; it is when asked.
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let held: Vec<_> = (0..5).map(|_| l.admit(lo).unwrap()).collect();
        drop(held);
        let strict = PerAddress::new(1, true, "127.0.0.1:1883".parse().unwrap());
        let _one = strict.admit(lo).unwrap();
        assert!(strict.admit(lo).is_none());
        assert!(PerAddress::new(0, true, "127.0.0.1:1883".parse().unwrap())
            .admit(lo)
            .is_some());
    }
}
