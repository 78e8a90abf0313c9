//! Errno values as people read them in logs: `ENOSPC (No space left on
//! device)`, not `error 28` or Rust's `(os error 28)` suffix.

use std::fmt;
use std::io;

/// A host errno, displayed by name and meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

/// The symbolic name of `e`, for the errnos a block device meets.
pub fn name(e: i32) -> Option<&'static str> {
    use libc::*;
    Some(match e {
        EPERM => "EPERM",
        ENOENT => "ENOENT",
        EINTR => "EINTR",
        EIO => "EIO",
        ENXIO => "ENXIO",
        E2BIG => "E2BIG",
        EBADF => "EBADF",
        EAGAIN => "EAGAIN",
        ENOMEM => "ENOMEM",
        EACCES => "EACCES",
        EFAULT => "EFAULT",
        EBUSY => "EBUSY",
        EEXIST => "EEXIST",
        ENODEV => "ENODEV",
        ENOTDIR => "ENOTDIR",
        EISDIR => "EISDIR",
        EINVAL => "EINVAL",
        ENFILE => "ENFILE",
        EMFILE => "EMFILE",
        EFBIG => "EFBIG",
        ENOSPC => "ENOSPC",
        ESPIPE => "ESPIPE",
        EROFS => "EROFS",
        EPIPE => "EPIPE",
        ERANGE => "ERANGE",
        EDEADLK => "EDEADLK",
        ENAMETOOLONG => "ENAMETOOLONG",
        ENOSYS => "ENOSYS",
        ENODATA => "ENODATA",
        ETIME => "ETIME",
        EPROTO => "EPROTO",
        EOVERFLOW => "EOVERFLOW",
        EBADMSG => "EBADMSG",
        ENOTSOCK => "ENOTSOCK",
        EMSGSIZE => "EMSGSIZE",
        EPROTONOSUPPORT => "EPROTONOSUPPORT",
        EOPNOTSUPP => "ENOTSUP",
        EAFNOSUPPORT => "EAFNOSUPPORT",
        EADDRINUSE => "EADDRINUSE",
        EADDRNOTAVAIL => "EADDRNOTAVAIL",
        ENETDOWN => "ENETDOWN",
        ENETUNREACH => "ENETUNREACH",
        ECONNABORTED => "ECONNABORTED",
        ECONNRESET => "ECONNRESET",
        ENOBUFS => "ENOBUFS",
        ENOTCONN => "ENOTCONN",
        ESHUTDOWN => "ESHUTDOWN",
        ETIMEDOUT => "ETIMEDOUT",
        ECONNREFUSED => "ECONNREFUSED",
        EHOSTUNREACH => "EHOSTUNREACH",
        EALREADY => "EALREADY",
        EINPROGRESS => "EINPROGRESS",
        ESTALE => "ESTALE",
        EDQUOT => "EDQUOT",
        ECANCELED => "ECANCELED",
        EKEYREJECTED => "EKEYREJECTED",
        _ => return None,
    })
}

/// What `strerror` says about `e`.
fn meaning(e: i32) -> String {
    let text = io::Error::from_raw_os_error(e).to_string();
    // std appends " (os error N)"; the name already says which.
    match text.rfind(" (os error ") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match name(self.0) {
            Some(n) => write!(f, "{n} ({})", meaning(self.0)),
            None if self.0 == 0 => f.write_str("no errno"),
            None => write!(f, "errno {} ({})", self.0, meaning(self.0)),
        }
    }
}

/// An I/O error as a log line shows it: by errno name when it has one.
pub struct Describe<'a>(pub &'a io::Error);

impl fmt::Display for Describe<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.raw_os_error() {
            Some(e) => Errno(e).fmt(f),
            None => self.0.fmt(f),
        }
    }
}

/// The errno of an I/O error, or `fallback` when it carries none.
pub fn of(e: &io::Error, fallback: i32) -> i32 {
    e.raw_os_error().unwrap_or(fallback)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_meanings() {
        assert_eq!(Errno(libc::ENOSPC).to_string(), "ENOSPC (No space left on device)");
        assert_eq!(Errno(libc::EINVAL).to_string(), "EINVAL (Invalid argument)");
        assert_eq!(
            Describe(&io::Error::from_raw_os_error(libc::ETIMEDOUT)).to_string(),
            "ETIMEDOUT (Connection timed out)"
        );
        assert!(!Errno(4000).to_string().contains("os error"));
        assert_eq!(Describe(&io::Error::other("bad key")).to_string(), "bad key");
    }
}
