//! Where the library's log records go: a callback the host sets with
//! `nbdkit_set_log_callback`, or else stderr. The level comes from the
//! host's call, or else from `NBDKIT_ASYNC_LOG` (error, warn, info, debug,
//! trace; default warn). A host that installed its own `log` logger
//! before the first server keeps it.

use std::ffi::{c_int, c_void, CString};
use std::io::Write;

use parking_lot::RwLock;

/// A host log sink: (user_data, level, message).
pub type LogFn = unsafe extern "C" fn(user_data: *mut c_void, level: c_int, message: *const std::ffi::c_char);

struct Sink {
    callback: LogFn,
    user_data: *mut c_void,
}

// SAFETY: the host promises its callback and user_data may be used from
// any thread (the API contract of nbdkit_set_log_callback).
unsafe impl Send for Sink {}
unsafe impl Sync for Sink {}

static SINK: RwLock<Option<Sink>> = RwLock::new(None);

struct Logger;

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        if let Some(sink) = &*SINK.read() {
            let message = CString::new(record.args().to_string().replace('\0', " ")).unwrap_or_default();
            // SAFETY: the host's callback, called as documented.
            unsafe { (sink.callback)(sink.user_data, record.level() as c_int, message.as_ptr()) };
            return;
        }
        let line = format!("nbdkit-async: {}: {}\n", record.level().as_str().to_lowercase(), record.args());
        // One write per line so lines from several threads do not interleave.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

/// Installs the logger once; the level from the environment unless `level` is given.
pub fn init() {
    static LOGGER: Logger = Logger;
    if log::set_logger(&LOGGER).is_ok() {
        let level = std::env::var("NBDKIT_ASYNC_LOG")
            .ok()
            .and_then(|v| v.parse::<log::LevelFilter>().ok())
            .unwrap_or(log::LevelFilter::Warn);
        log::set_max_level(level);
    }
}

pub fn set_sink(callback: Option<LogFn>, user_data: *mut c_void, level: c_int) {
    init();
    *SINK.write() = callback.map(|callback| Sink { callback, user_data });
    let filter = match level {
        i if i <= 0 => log::LevelFilter::Off,
        1 => log::LevelFilter::Error,
        2 => log::LevelFilter::Warn,
        3 => log::LevelFilter::Info,
        4 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    };
    log::set_max_level(filter);
}
