//! libnbdkit-async: an NBD server library with an asynchronous C plugin API.
//!
//! One mio event loop thread owns every socket; plugin callbacks start I/O
//! and return at once, and the plugin answers each op later, from any
//! thread, with `nbdkit_reply*`. See README.md and include/nbdkit-async.h.

pub(crate) mod adopt;
pub(crate) mod budget;
pub(crate) mod buffers;
pub(crate) mod completion;
pub(crate) mod config;
pub(crate) mod conn;
pub(crate) mod deadlines;
pub(crate) mod errno;
pub(crate) mod event_loop;
pub mod ffi;
pub(crate) mod loan;
pub(crate) mod logging;
pub(crate) mod plugin;
pub(crate) mod protocol;
pub(crate) mod siblings;
pub(crate) mod stats;
pub(crate) mod tls;
