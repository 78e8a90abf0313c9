//! Sockets the server is handed rather than opening itself: listeners from
//! systemd socket activation, and an already-connected client.

use std::io;
use std::os::fd::{FromRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use crate::conn::stream::Stream;
use crate::event_loop::Listener;

/// First descriptor systemd passes (SD_LISTEN_FDS_START).
const LISTEN_FDS_START: RawFd = 3;

/// The socket's address family, after checking it is a stream socket: the
/// connection code counts on stream semantics (a short read means the
/// queue is empty), which a datagram or seqpacket socket does not have.
fn family(fd: RawFd) -> io::Result<libc::sa_family_t> {
    let mut kind: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: valid pointers to a local int and its size.
    if unsafe {
        libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_TYPE, (&mut kind as *mut libc::c_int).cast(), &mut len)
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    if kind != libc::SOCK_STREAM {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("fd {fd} is not a stream socket")));
    }
    // SAFETY: a zeroed sockaddr_storage is valid; getsockname fills it.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: valid pointers to a local and its size.
    if unsafe { libc::getsockname(fd, (&mut addr as *mut libc::sockaddr_storage).cast(), &mut len) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(addr.ss_family)
}

fn prepare(fd: RawFd) -> io::Result<()> {
    // SAFETY: plain fcntl calls on a descriptor we were handed.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        let fdfl = libc::fcntl(fd, libc::F_GETFD);
        if fl < 0
            || fdfl < 0
            || libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) < 0
            || libc::fcntl(fd, libc::F_SETFD, fdfl | libc::FD_CLOEXEC) < 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Set once the inherited sockets are taken: they have one owner.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// Listening sockets from systemd (LISTEN_PID is us, LISTEN_FDS counts
/// them from fd 3). None when the process was not socket-activated, or
/// when an earlier call took them. Like `sd_listen_fds(1)`, it clears
/// LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES, so neither a second call
/// nor a child process takes the same descriptors again.
pub fn systemd_listeners() -> io::Result<Vec<Listener>> {
    let ours = std::env::var("LISTEN_PID").ok().and_then(|p| p.parse::<u32>().ok()) == Some(std::process::id());
    let count = std::env::var("LISTEN_FDS").ok().and_then(|n| n.parse::<RawFd>().ok()).unwrap_or(0);
    if !ours || count <= 0 || TAKEN.swap(true, Ordering::SeqCst) {
        return Ok(Vec::new());
    }
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        // SAFETY: as sd_listen_fds does; the documented set-up thread is
        // the one place the library touches the environment.
        unsafe { std::env::remove_var(var) };
    }
    let mut out = Vec::new();
    for fd in LISTEN_FDS_START..LISTEN_FDS_START + count {
        prepare(fd)?;
        // SAFETY: systemd hands these descriptors to us to own.
        let l = unsafe {
            match family(fd)? as i32 {
                libc::AF_UNIX => Listener::Unix(UnixListener::from_raw_fd(fd), None),
                libc::AF_INET | libc::AF_INET6 => Listener::Tcp(TcpListener::from_raw_fd(fd)),
                _ => {
                    return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("fd {fd} is not a stream socket")));
                }
            }
        };
        out.push(l);
    }
    Ok(out)
}

/// An already-connected client socket, owned from now on.
pub fn connected_stream(fd: RawFd) -> io::Result<Stream> {
    let fam = family(fd)?;
    prepare(fd)?;
    // SAFETY: the caller hands the descriptor over to us.
    unsafe {
        match fam as i32 {
            libc::AF_UNIX => Ok(Stream::Unix(UnixStream::from_raw_fd(fd))),
            libc::AF_INET | libc::AF_INET6 => {
                let s = TcpStream::from_raw_fd(fd);
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
            _ => Err(io::Error::new(io::ErrorKind::InvalidInput, "not a stream socket")),
        }
    }
}
