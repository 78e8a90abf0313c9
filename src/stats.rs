//! Counters an operator can read from any thread while the server runs.
//! Written only by the loop thread, with relaxed atomics: each counter is
//! exact, a snapshot of several is approximate.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Latency histogram buckets: bucket i counts replies that took
/// [2^i, 2^(i+1)) microseconds (bucket 0 also takes anything faster).
pub(crate) const LATENCY_BUCKETS: usize = 32;
/// Request counters, indexed by NBD_CMD_* (READ = 0 ... BLOCK_STATUS = 7).
pub(crate) const COMMANDS: usize = 8;

#[derive(Default)]
pub struct Stats {
    pub connections: AtomicU64,
    pub connections_total: AtomicU64,
    pub in_flight: AtomicU64,
    pub requests: [AtomicU64; COMMANDS],
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub errors: AtomicU64,
    pub latency: [AtomicU64; LATENCY_BUCKETS],
}

impl Stats {
    pub fn connected(&self) {
        self.connections.fetch_add(1, Relaxed);
        self.connections_total.fetch_add(1, Relaxed);
    }

    pub fn disconnected(&self) {
        self.connections.fetch_sub(1, Relaxed);
    }

    /// A request the plugin was given.
    pub fn started(&self, cmd: u16, write_bytes: usize) {
        self.in_flight.fetch_add(1, Relaxed);
        self.bytes_written.fetch_add(write_bytes as u64, Relaxed);
        self.count(cmd);
    }

    /// The plugin is done with a request started earlier.
    pub fn released(&self) {
        self.in_flight.fetch_sub(1, Relaxed);
    }

    /// A reply was queued: data bytes for a successful read, or an error.
    pub fn replied(&self, read_bytes: usize, error: bool, latency: Duration) {
        self.bytes_read.fetch_add(read_bytes as u64, Relaxed);
        if error {
            self.errors.fetch_add(1, Relaxed);
        }
        let us = latency.as_micros().max(1) as u64;
        let bucket = (63 - us.leading_zeros() as usize).min(LATENCY_BUCKETS - 1);
        self.latency[bucket].fetch_add(1, Relaxed);
    }

    /// A request refused before the plugin saw it (answered at once).
    pub fn rejected(&self, cmd: u16) {
        self.count(cmd);
        self.replied(0, true, Duration::ZERO);
    }

    /// A request that is not answered (NBD_CMD_DISC).
    pub fn count(&self, cmd: u16) {
        if let Some(c) = self.requests.get(cmd as usize) {
            c.fetch_add(1, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets_are_powers_of_two() {
        let s = Stats::default();
        for us in [0, 1, 2, 3, 1000, 1 << 40] {
            s.replied(0, false, Duration::from_micros(us));
        }
        let b: Vec<u64> = s.latency.iter().map(|a| a.load(Relaxed)).collect();
        assert_eq!(b[0], 2); // 0 and 1 µs
        assert_eq!(b[1], 2); // 2 and 3 µs
        assert_eq!(b[9], 1); // 1000 µs
        assert_eq!(b[31], 1); // clamped
    }
}
