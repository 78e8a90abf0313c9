//! Which library a program runs against.

use std::ffi::c_char;

/// The version of the headers a program was compiled with. Compare with
/// `nbdkit_async_version()` to see what it runs against.
pub const NBDKIT_ASYNC_VERSION_MAJOR: u32 = 0;
pub const NBDKIT_ASYNC_VERSION_MINOR: u32 = 1;
pub const NBDKIT_ASYNC_VERSION_MICRO: u32 = 0;

/// The version of the library the program runs against (the same
/// numbers as the header's NBDKIT_ASYNC_VERSION_* when they match).
/// Thread-safe; callable at any time.
///
/// Returns a static "MAJOR.MINOR.MICRO" string: never free it.
#[unsafe(no_mangle)]
pub extern "C" fn nbdkit_async_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_constants_match_the_crate_version() {
        let v = format!("{NBDKIT_ASYNC_VERSION_MAJOR}.{NBDKIT_ASYNC_VERSION_MINOR}.{NBDKIT_ASYNC_VERSION_MICRO}");
        assert_eq!(v, env!("CARGO_PKG_VERSION"));
        // SAFETY: a static NUL-terminated string.
        let s = unsafe { std::ffi::CStr::from_ptr(nbdkit_async_version()) };
        assert_eq!(s.to_str().unwrap(), v);
    }
}
