//! Where the library's log records go: a callback the host sets with
//! `nbdkit_set_log_callback`, or else stderr. The level comes from the
//! host's call, or else from `NBDKIT_ASYNC_LOG` (error, warn, info, debug,
//! trace, or 0-5; default warn). A host that installed its own `log`
//! logger before the first server keeps it.
//!
//! Lines logged while the loop works on one connection carry its id
//! (`conn 7: ...`), so the sans-IO protocol code needs no id of its own.

use std::cell::Cell;
use std::ffi::{CString, c_int, c_void};
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
// SAFETY: as above; the sink is only read while logging.
unsafe impl Sync for Sink {}

static SINK: RwLock<Option<Sink>> = RwLock::new(None);

thread_local! {
    /// The connection the loop is working on (0: none).
    static CONNECTION: Cell<u64> = const { Cell::new(0) };
    /// Inside the host's log callback: a log record it causes must not
    /// take the sink's lock again.
    static IN_CALLBACK: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with log lines tagged as connection `serial`'s.
pub fn in_connection<R>(serial: u64, f: impl FnOnce() -> R) -> R {
    let outer = CONNECTION.with(|c| c.replace(serial));
    let r = f();
    CONNECTION.with(|c| c.set(outer));
    r
}

struct Logger;

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let text = match CONNECTION.with(|c| c.get()) {
            0 => record.args().to_string(),
            conn => format!("conn {conn}: {}", record.args()),
        };
        if !IN_CALLBACK.with(|c| c.get()) {
            if let Some(sink) = &*SINK.read() {
                let message = CString::new(text.replace('\0', " ")).unwrap_or_default();
                IN_CALLBACK.with(|c| c.set(true));
                // SAFETY: the host's callback, called as documented.
                unsafe { (sink.callback)(sink.user_data, record.level() as c_int, message.as_ptr()) };
                IN_CALLBACK.with(|c| c.set(false));
                return;
            }
        }
        let line = format!("nbdkit-async: {}: {text}\n", record.level().as_str().to_lowercase());
        // One write per line so lines from several threads do not interleave.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

/// The filter for a level number as the C API counts them (NBDKIT_LOG_*).
fn filter_of(level: i64) -> log::LevelFilter {
    match level {
        i64::MIN..=0 => log::LevelFilter::Off,
        1 => log::LevelFilter::Error,
        2 => log::LevelFilter::Warn,
        3 => log::LevelFilter::Info,
        4 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    }
}

/// `NBDKIT_ASYNC_LOG`'s value as a filter: a name or a number.
fn parse_level(v: &str) -> Option<log::LevelFilter> {
    let v = v.trim();
    v.parse::<i64>().ok().map(filter_of).or_else(|| v.parse::<log::LevelFilter>().ok())
}

/// Installs the logger once, at the level `NBDKIT_ASYNC_LOG` names.
pub fn init() {
    static LOGGER: Logger = Logger;
    if log::set_logger(&LOGGER).is_ok() {
        let env = std::env::var("NBDKIT_ASYNC_LOG").ok();
        let level = env.as_deref().and_then(parse_level);
        log::set_max_level(level.unwrap_or(log::LevelFilter::Warn));
        if let (Some(v), None) = (env, level) {
            log::warn!("NBDKIT_ASYNC_LOG={v:?} is not a level (error, warn, info, debug, trace or 0-5); using warn");
        }
    }
}

/// Sets the host's sink and level. Refused (false) from inside the log
/// callback itself, which holds the sink.
pub fn set_sink(callback: Option<LogFn>, user_data: *mut c_void, level: c_int) -> bool {
    init();
    if IN_CALLBACK.with(|c| c.get()) {
        return false;
    }
    *SINK.write() = callback.map(|callback| Sink { callback, user_data });
    log::set_max_level(filter_of(level as i64));
    true
}

/// The `log` level of a C level number, None when it is not one.
pub fn level_of(level: c_int) -> Option<log::Level> {
    filter_of(level as i64).to_level().filter(|_| (1..=5).contains(&level))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_by_name_or_number() {
        assert_eq!(parse_level("4"), Some(log::LevelFilter::Debug));
        assert_eq!(parse_level("debug"), Some(log::LevelFilter::Debug));
        assert_eq!(parse_level("0"), Some(log::LevelFilter::Off));
        assert_eq!(parse_level("9"), Some(log::LevelFilter::Trace));
        assert_eq!(parse_level("loud"), None);
        assert_eq!(level_of(2), Some(log::Level::Warn));
        assert_eq!(level_of(0), None);
    }
}
