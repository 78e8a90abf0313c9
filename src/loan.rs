//! Read data lent by the plugin: sent straight from the plugin's memory,
//! without a copy, and handed back exactly once.
//!
//! A `Loan` lives in the reply that carries it. Whatever happens to that
//! reply (sent, dropped because the client left, refused because the loop
//! ended, ignored as a second answer), dropping the `Loan` is what gives
//! the memory back, so the release callback runs once and only once.

use std::ffi::c_void;
use std::fmt;

/// Called when the library no longer needs lent bytes.
pub type ReleaseFn = unsafe extern "C" fn(ctx: *mut c_void);

pub struct Loan {
    data: *const u8,
    len: usize,
    release: Option<ReleaseFn>,
    ctx: *mut c_void,
}

// SAFETY: the lender promises the bytes stay valid and unchanged until the
// release callback runs, and that the callback may run on any thread.
unsafe impl Send for Loan {}

impl Loan {
    /// # Safety
    /// `data` must point to `len` readable bytes (or be dangling with
    /// `len` 0) that stay valid until `release(ctx)` is called.
    pub unsafe fn new(data: *const u8, len: usize, release: Option<ReleaseFn>, ctx: *mut c_void) -> Loan {
        Loan { data, len, release, ctx }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn as_slice(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: promised by the lender in `new`, until we release.
        unsafe { std::slice::from_raw_parts(self.data, self.len) }
    }
}

impl Drop for Loan {
    fn drop(&mut self) {
        if let Some(release) = self.release.take() {
            // SAFETY: the lender's callback, called once with its own context.
            unsafe { release(self.ctx) };
        }
    }
}

impl fmt::Debug for Loan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Loan({} bytes at {:?})", self.len, self.data)
    }
}

impl PartialEq for Loan {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self.data, other.data) && self.len == other.len
    }
}

impl Eq for Loan {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    unsafe extern "C" fn count(ctx: *mut c_void) {
        // SAFETY: the tests pass a pointer to a live AtomicUsize.
        unsafe { &*(ctx as *const AtomicUsize) }.fetch_add(1, Ordering::SeqCst);
    }

    #[test]
    fn released_once_on_drop_and_reads_in_place() {
        let released = AtomicUsize::new(0);
        let data = *b"lent bytes";
        let ctx = &released as *const AtomicUsize as *mut c_void;
        // SAFETY: `data` and `released` outlive the loan.
        let loan = unsafe { Loan::new(data.as_ptr(), data.len(), Some(count), ctx) };
        assert_eq!(loan.as_slice(), b"lent bytes");
        assert_eq!(loan.as_slice().as_ptr(), data.as_ptr(), "no copy");
        let moved = std::thread::spawn(move || loan.len()).join().unwrap();
        assert_eq!(moved, 10);
        assert_eq!(released.load(Ordering::SeqCst), 1);
        // SAFETY: no release callback, nothing to outlive.
        let empty = unsafe { Loan::new(std::ptr::null(), 0, None, std::ptr::null_mut()) };
        assert!(empty.as_slice().is_empty());
    }
}
