//! Reusable read buffers.
//!
//! Every READ needs a buffer for the plugin to fill; allocating (and, for
//! large ones, mapping and zeroing) one per request showed in profiles. Sent
//! buffers come back here and are handed out again. They are always fully
//! initialised (zeroed once when first made), so no unsafe code is needed;
//! a plugin sees leftover bytes, which is why `pread` must fill every byte.

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

    /// Gives back a buffer from `take`; others are simply dropped.
    pub fn give(&mut self, buf: Vec<u8>) {
        let Some(c) = class_of(buf.len()) else { return };
        if buf.len() == class_size(c) && self.pooled + buf.len() <= MAX_POOLED {
            self.pooled += buf.len();
            self.free[c].push(buf);
        }
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
        for _ in 0..3 {
            p.give(vec![0; 32 << 20]);
        }
        assert!(p.pooled <= MAX_POOLED);
        assert_eq!(p.take(64 << 20).len(), 64 << 20, "beyond the classes: exact");
    }
}
