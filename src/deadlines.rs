//! Timeouts of one fixed length, kept in arming order.
//!
//! Every deadline in a queue is "now + the same duration", so arming order
//! is expiry order and a FIFO is a complete timer wheel: O(1) to arm, O(1)
//! per expiry, and cancelled entries simply expire into a no-op.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

pub struct Deadlines<T> {
    after: Duration,
    queue: VecDeque<(Instant, T)>,
}

impl<T> Default for Deadlines<T> {
    fn default() -> Self {
        Deadlines::new(Duration::ZERO)
    }
}

impl<T> Deadlines<T> {
    pub fn new(after: Duration) -> Self {
        Deadlines { after, queue: VecDeque::new() }
    }

    pub fn arm(&mut self, now: Instant, item: T) {
        self.queue.push_back((now + self.after, item));
    }

    /// The earliest deadline, if any.
    pub fn next(&self) -> Option<Instant> {
        self.queue.front().map(|(at, _)| *at)
    }

    /// Removes and returns one expired item.
    pub fn pop_expired(&mut self, now: Instant) -> Option<T> {
        match self.queue.front() {
            Some((at, _)) if *at <= now => self.queue.pop_front().map(|(_, t)| t),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expires_in_order() {
        let t0 = Instant::now();
        let mut d = Deadlines::new(Duration::from_secs(1));
        d.arm(t0, 'a');
        d.arm(t0 + Duration::from_millis(10), 'b');
        assert_eq!(d.next(), Some(t0 + Duration::from_secs(1)));
        assert_eq!(d.pop_expired(t0), None);
        assert_eq!(d.pop_expired(t0 + Duration::from_secs(1)), Some('a'));
        assert_eq!(d.pop_expired(t0 + Duration::from_secs(1)), None);
        assert_eq!(d.pop_expired(t0 + Duration::from_secs(2)), Some('b'));
        assert_eq!(d.next(), None);
    }
}
