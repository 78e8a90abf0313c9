//! What a connection reads and writes through: the socket, or, after
//! NBD_OPT_STARTTLS, a rustls session over it. The protocol code above sees
//! the same read/write calls either way, so plaintext and TLS clients share
//! every line of it.

use std::io::{self, IoSlice, Read, Write};
use std::sync::Arc;

use mio::event::Source;
use mio::{Interest, Registry, Token};

use super::stream::{Stream, would_block};

/// Plaintext rustls may hold for sending before writes push back.
const TLS_SEND_BUFFER: usize = 256 * 1024;

pub struct Transport {
    sock: Stream,
    tls: Option<Box<rustls::ServerConnection>>,
}

/// `io::Write` over the socket with MSG_NOSIGNAL, for rustls to write to.
struct NoSigPipe<'a>(&'a mut Stream);

impl Write for NoSigPipe<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_vectored(&[IoSlice::new(buf)])
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct SockReader<'a>(&'a mut Stream);

impl Read for SockReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Transport {
    pub fn new(sock: Stream) -> Self {
        Transport { sock, tls: None }
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Switches to TLS. `early` is ciphertext the client sent before we
    /// switched (already read from the socket); it is fed to rustls first.
    pub fn start_tls(&mut self, config: Arc<rustls::ServerConfig>, early: &[u8]) -> io::Result<()> {
        let mut tls = rustls::ServerConnection::new(config).map_err(io::Error::other)?;
        tls.set_buffer_limit(Some(TLS_SEND_BUFFER));
        let mut early = early;
        while !early.is_empty() {
            tls.read_tls(&mut early)?;
            tls.process_new_packets().map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        }
        self.tls = Some(Box::new(tls));
        Ok(())
    }

    /// The client's certificate (DER), once a TLS handshake verified one.
    pub fn peer_certificate(&self) -> Option<Vec<u8>> {
        let tls = self.tls.as_ref()?;
        tls.peer_certificates().and_then(|c| c.first()).map(|c| c.as_ref().to_vec())
    }

    /// Reads plaintext. Ok(0) is end of stream; WouldBlock means wait.
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(tls) = self.tls.as_mut() else { return self.sock.read(buf) };
        loop {
            match tls.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if would_block(&e) => {}
                Err(e) => return Err(e),
            }
            // No plaintext yet: more ciphertext from the socket.
            if tls.read_tls(&mut SockReader(&mut self.sock))? == 0 {
                return Ok(0);
            }
            if let Err(e) = tls.process_new_packets() {
                // Tell the client why (an alert), best effort.
                let _ = tls.write_tls(&mut NoSigPipe(&mut self.sock));
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
            // Handshake messages to send back go out now.
            match Self::push(tls, &mut self.sock) {
                Ok(()) => {}
                Err(e) if would_block(&e) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes plaintext from `bufs`; returns how much was taken.
    pub fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let Some(tls) = self.tls.as_mut() else { return self.sock.write_vectored(bufs) };
        let mut taken = tls.writer().write_vectored(bufs)?;
        if taken == 0 {
            // rustls's buffer is full. Drain it, then offer the plaintext
            // again: WouldBlock may only come from the socket itself, or no
            // writable edge would ever follow and the connection would stall.
            Self::push(tls, &mut self.sock)?;
            taken = tls.writer().write_vectored(bufs)?;
        }
        match Self::push(tls, &mut self.sock) {
            Ok(()) => {}
            Err(e) if would_block(&e) && taken > 0 => {}
            Err(e) => return Err(e),
        }
        Ok(taken)
    }

    /// Sends ciphertext rustls still holds. Ok(()) when none is left.
    pub fn flush(&mut self) -> io::Result<()> {
        match self.tls.as_mut() {
            Some(tls) => Self::push(tls, &mut self.sock),
            None => Ok(()),
        }
    }

    fn push(tls: &mut rustls::ServerConnection, sock: &mut Stream) -> io::Result<()> {
        while tls.wants_write() {
            if tls.write_tls(&mut NoSigPipe(sock))? == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
        }
        Ok(())
    }
}

impl Source for Transport {
    fn register(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        self.sock.register(r, t, i)
    }
    fn reregister(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        self.sock.reregister(r, t, i)
    }
    fn deregister(&mut self, r: &Registry) -> io::Result<()> {
        self.sock.deregister(r)
    }
}
