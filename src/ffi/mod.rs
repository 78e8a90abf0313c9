//! The C API. This is the only module with `#[no_mangle]` functions; each
//! body runs inside [`guard`] so no panic unwinds into C.

#![allow(non_camel_case_types)]

pub(crate) mod callbacks;
pub mod embed;
pub mod logging;
pub mod plugin;
pub mod reply;
pub mod server;
pub mod stats;
pub mod sync_plugin;
pub mod tls;
pub mod version;
pub(crate) mod worker_pool;

use std::panic::{AssertUnwindSafe, catch_unwind};

/// Runs an exported function's body, turning a panic into `on_panic`.
fn guard<T>(name: &str, on_panic: T, body: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(v) => v,
        Err(payload) => {
            log::error!("internal error in {name}: {}", panic_message(&payload));
            on_panic
        }
    }
}

use crate::event_loop::panic_message;

/// A negative errno for C.
fn neg(errno: i32) -> i32 {
    -errno
}
