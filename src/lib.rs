//! libnbdkit-async: an NBD server library with an asynchronous C plugin API.
//!
//! One mio event loop thread owns every socket; plugin callbacks start I/O
//! and return at once, and the plugin answers each op later, from any
//! thread, with `nbdkit_reply*`. See README.md and include/nbdkit-async.h.

pub mod adopt;
pub mod buffers;
pub mod completion;
pub mod config;
pub mod conn;
pub mod deadlines;
pub mod errno;
pub mod event_loop;
pub mod ffi;
pub mod loan;
pub mod logging;
pub mod plugin;
pub mod protocol;
pub mod stats;
pub mod tls;
pub mod worker_pool;
