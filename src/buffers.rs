//! Reusable request buffers.
//!
//! Every READ needs a buffer for the plugin to fill and every WRITE one for
//! its payload; allocating (and zeroing, or mapping and faulting in) one per
//! request showed in profiles. Buffers come back here once their reply is
//! sent and are handed out again. They are always fully initialised
//! (zeroed once when first made), so no unsafe code is needed; a plugin
//! sees leftover bytes, which is why `pread` must fill every byte.

use crate::protocol::transmission::PayloadBuffers;

/// Smallest class: 4 KiB; classes double up to the largest payload.
const MIN_SHIFT: u32 = 12;
const CLASSES: usize = 14; // 4 KiB .. 32 MiB
/// Most bytes kept idle in the pool; beyond that, returned buffers are freed.
const MAX_POOLED: usize = 32 * 1024 * 1024;

#[derive(Default)]
pub struct BufferPool {
    free: [Vec<Vec<u8>>; CLASSES],
    pooled: usize,
}

fn class_of(len: usize) -> Option<usize> {
    let c = len.max(1).next_power_of_two().trailing_zeros().saturating_sub(MIN_SHIFT) as usize;
    (c < CLASSES).then_some(c)
}

fn class_size(c: usize) -> usize {
    1 << (c as u32 + MIN_SHIFT)
}

impl BufferPool {
    /// A buffer of at least `len` bytes (its length is its size class).
    pub fn take(&mut self, len: usize) -> Vec<u8> {
        let Some(c) = class_of(len) else { return vec![0; len] };
        match self.free[c].pop() {
            Some(b) => {
                self.pooled -= b.len();
                b
            }
            None => vec![0; class_size(c)],
        }
    }

    /// Gives back a buffer from `take`, possibly truncated since; others
    /// are simply dropped.
    pub fn give(&mut self, mut buf: Vec<u8>) {
        let size = buf.capacity();
        let Some(c) = class_of(size) else { return };
        if size == class_size(c) && self.pooled + size <= MAX_POOLED {
            buf.resize(size, 0);
            self.pooled += size;
            self.free[c].push(buf);
        }
    }
}

impl PayloadBuffers for BufferPool {
    fn take(&mut self, len: usize) -> Vec<u8> {
        BufferPool::take(self, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_by_class_and_bounds_what_it_keeps() {
        let mut p = BufferPool::default();
        let a = p.take(1000);
        assert_eq!(a.len(), 4096);
        let ptr = a.as_ptr();
        p.give(a);
        let b = p.take(4096);
        assert_eq!(b.as_ptr(), ptr, "same buffer back");
        assert_eq!(p.take(4097).len(), 8192);
        p.give(vec![0; 5000]); // not a class size: dropped
        assert_eq!(p.pooled, 0);
        let mut payload = p.take(5000);
        payload.truncate(5000); // as a WRITE payload is
        p.give(payload);
        assert_eq!(p.take(8192).len(), 8192, "back at its full size");
        assert_eq!(p.pooled, 0);
        for _ in 0..3 {
            p.give(vec![0; 32 << 20]);
        }
        assert!(p.pooled <= MAX_POOLED);
        assert_eq!(p.take(64 << 20).len(), 64 << 20, "beyond the classes: exact");
    }
}
