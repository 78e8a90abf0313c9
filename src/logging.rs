//! Default logger: `log` records to stderr, level from `NBDKIT_ASYNC_LOG`
//! (error, warn, info, debug, trace; default warn). A host that installs
//! its own `log` logger first keeps it.

use std::io::Write;

struct Stderr;

impl log::Log for Stderr {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            let line = format!("nbdkit-async: {}: {}\n", record.level().as_str().to_lowercase(), record.args());
            // One write per line so lines from several threads do not interleave.
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
        }
    }

    fn flush(&self) {}
}

pub fn init() {
    static LOGGER: Stderr = Stderr;
    if log::set_logger(&LOGGER).is_ok() {
        let level = std::env::var("NBDKIT_ASYNC_LOG")
            .ok()
            .and_then(|v| v.parse::<log::LevelFilter>().ok())
            .unwrap_or(log::LevelFilter::Warn);
        log::set_max_level(level);
    }
}
