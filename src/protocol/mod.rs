//! The NBD protocol without I/O: constants, codec, handshake and request
//! framing. Everything here is driven by byte slices and unit-tested alone.

pub mod codec;
pub mod consts;
pub mod handshake;
pub mod transmission;

#[cfg(test)]
mod fuzz;
