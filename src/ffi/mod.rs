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

fn panic_message(payload: &Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// A negative errno for C.
fn neg(errno: i32) -> i32 {
    -errno
}
