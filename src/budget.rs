//! The memory clients make the server hold, summed over all connections
//! (request payloads, read buffers, unsent replies), against the total
//! cap; and the one connection let past the cap so that none starves.
//! The loop owns it; a connection consults it while it reads requests.

use std::time::Instant;

/// A connection, by slab key and serial (keys are reused, serials not).
pub(crate) type ConnId = (usize, u64);

/// Made for real when the loop starts, with the configured cap.
#[derive(Default)]
pub(crate) struct Budget {
    max_total: usize,
    /// Bytes held by every connection, except the one being serviced
    /// between `enter` and `leave`.
    total: usize,
    /// The connection reading past the cap, and since when.
    exempt: Option<(ConnId, Instant)>,
}

impl Budget {
    pub(crate) fn new(max_total: usize) -> Self {
        Budget { max_total, total: 0, exempt: None }
    }

    /// Bytes a connection took (a new connection, a greeting).
    pub(crate) fn add(&mut self, bytes: usize) {
        self.total += bytes;
    }

    /// Bytes a connection gave back (it was dropped). True when that
    /// ended its turn past the cap.
    pub(crate) fn remove(&mut self, conn: ConnId, bytes: usize) -> bool {
        self.total -= bytes;
        self.release_exempt(conn)
    }

    /// Takes out the bytes of the connection about to be serviced: while
    /// it works, the total counts the others only.
    pub(crate) fn enter(&mut self, held: usize) {
        self.total -= held;
    }

    /// Puts them back once it is done; `idle` when it has nothing beyond
    /// the cap left (no request dispatched, no payload coming in), which
    /// ends its exemption. True when a turn past the cap ended: the
    /// connections the cap paused must then be woken to take it.
    pub(crate) fn leave(&mut self, conn: ConnId, held: usize, idle: bool) -> bool {
        self.total += held;
        idle && self.release_exempt(conn) // its one request past the cap was answered
    }

    /// May `conn`, holding `held` bytes, read another request? Under the
    /// cap, yes. Over it, clients that never read their replies could pin
    /// the memory for good, so one connection at a time that holds nothing
    /// may still read one: the cap is overshot by at most one request, and
    /// nobody starves.
    pub(crate) fn admits(&mut self, conn: ConnId, held: usize, now: Instant) -> bool {
        if self.total + held < self.max_total {
            return true;
        }
        match self.exempt {
            None if held == 0 => self.exempt = Some((conn, now)),
            Some((c, _)) if c == conn && held == 0 => {}
            _ => return false,
        }
        true
    }

    /// Is there room again for connections the cap paused?
    pub(crate) fn has_room(&self) -> bool {
        self.total < self.max_total
    }

    /// The connection past the cap, and since when.
    pub(crate) fn exempt(&self) -> Option<(ConnId, Instant)> {
        self.exempt
    }

    /// Ends `conn`'s exemption, if it has one (then true): the next may go.
    pub(crate) fn release_exempt(&mut self, conn: ConnId) -> bool {
        let ends = self.exempt.is_some_and(|(c, _)| c == conn);
        if ends {
            self.exempt = None;
        }
        ends
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_connection_at_a_time_goes_past_the_cap() {
        let now = Instant::now();
        let mut b = Budget::new(100);
        b.add(90);
        b.enter(90);
        assert!(b.admits((1, 1), 90, now), "under the cap with its own 90");
        assert!(!b.admits((1, 1), 120, now), "over, holding something");
        assert!(!b.leave((1, 1), 120, false));
        b.enter(0);
        assert!(b.admits((2, 2), 0, now), "over, holding nothing: exempt");
        b.leave((2, 2), 10, false);
        b.enter(0);
        assert!(!b.admits((3, 3), 0, now), "one exemption at a time");
        assert!(!b.leave((3, 3), 0, true), "not its turn to end");
        assert_eq!(b.exempt().map(|e| e.0), Some((2, 2)));
        assert!(b.remove((2, 2), 10), "a dropped connection ends its exemption");
        assert_eq!(b.exempt(), None);
        assert!(!b.has_room());
        assert!(!b.remove((1, 1), 120));
        assert!(b.has_room());
    }
}
