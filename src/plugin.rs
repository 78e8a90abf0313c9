//! What the server needs from a plugin, in the core's own terms. The C
//! plugin structs (both APIs) are translated to this at the edge, in
//! `ffi::callbacks`; the core never sees a C type.

use std::ffi::c_void;
use std::io;

use crate::completion::Token;
use crate::protocol::transmission::ExportCaps;

/// The plugin's per-connection handle from `open`, opaque to the core.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Handle(pub(crate) *mut c_void);

/// The I/O an op asks of the plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Io {
    Read,
    Write,
    Flush,
    Trim,
    Zero,
    Cache,
    Extents,
}

/// Flags passed with an I/O (the values of the C API's NBDKIT_FLAG_*).
pub(crate) mod flag {
    /// `zero` may punch a hole.
    pub(crate) const MAY_TRIM: u32 = 1 << 0;
    /// The write must be durable before the reply (native FUA).
    pub(crate) const FUA: u32 = 1 << 1;
    /// Block status: one extent is enough.
    pub(crate) const REQ_ONE: u32 = 1 << 2;
    /// `zero` must fail at once rather than be slow.
    pub(crate) const FAST_ZERO: u32 = 1 << 3;
}

/// Extent type bits (the values of the C API's NBDKIT_EXTENT_*).
pub(crate) mod extent {
    /// The range reads as zeroes (a sparse read sends it as a hole).
    pub(crate) const ZERO: u32 = 1 << 1;
}

/// One I/O handed to the plugin.
pub(crate) struct IoRequest<'a> {
    pub(crate) io: Io,
    /// Its op handle: the plugin answers through the completion queue.
    pub(crate) token: Token,
    /// The connection's serial (thread models serialize by it).
    pub(crate) conn: u64,
    pub(crate) handle: Handle,
    /// The read buffer or write payload; it lives in the op table until
    /// the op is answered.
    pub(crate) buf: &'a mut [u8],
    pub(crate) count: u32,
    pub(crate) offset: u64,
    pub(crate) flags: u32,
}

/// What the plugin said when handed an I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Started {
    /// It took the op and answers it through the completion queue.
    Taken,
    /// The op failed at once with this errno; no answer will come.
    Failed(i32),
    /// A status the API does not define (a plugin bug, the value here).
    /// The client gets EIO; the op is kept, since the plugin may still
    /// answer it and use its buffer.
    Misuse(i32),
}

/// A plugin, as the event loop and connections use it. Every call runs
/// on the loop thread.
pub(crate) trait Plugin: Send {
    /// Short name, for logs.
    fn name(&self) -> &str;
    /// Opens `export` for one connection.
    fn open(&self, readonly: bool, export: &str) -> Result<Handle, i32>;
    /// Releases a handle from `open`, once no op of it is left.
    fn close(&self, h: Handle);
    /// Size and capabilities, asked once per connection; requests are
    /// capped at `max_request` bytes.
    fn caps(&self, h: Handle, readonly: bool, max_request: u32) -> Result<ExportCaps, i32>;
    /// The open export's own description, if it has one.
    fn export_description(&self, h: Handle) -> Option<String>;
    /// Does the plugin list (and judge the names of) its own exports?
    fn lists_exports(&self) -> bool;
    /// Its exports as (name, description), for NBD_OPT_LIST.
    fn list_exports(&self) -> Result<Vec<(String, String)>, i32>;
    /// Does it report allocation (base:allocation)?
    fn has_extents(&self) -> bool;
    /// Hands it one I/O.
    fn start(&self, request: IoRequest) -> Started;
    /// Tells it an op is no longer wanted (it must still be answered).
    fn cancel(&self, token: Token, h: Handle);
    /// Are clients served one at a time (nbdkit's SERIALIZE_CONNECTIONS)?
    fn serializes_connections(&self) -> bool;
    /// Starts threads of its own, if it needs them, as the loop starts.
    fn start_workers(&mut self, threads: usize) -> io::Result<()>;
    /// Waits for those threads to finish what they run, and joins them.
    fn stop_workers(&mut self);
    /// The same plugin for another event loop of the server, when it can
    /// serve from several (a synchronous plugin, with its worker pool and
    /// thread model, cannot).
    fn for_another_loop(&self) -> Option<Box<dyn Plugin>>;
}
