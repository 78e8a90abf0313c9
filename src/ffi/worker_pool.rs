//! Runs a synchronous plugin's blocking callbacks on library-owned threads.
//!
//! The pool is the synchronous API's adapter onto the asynchronous one: an
//! op is queued here instead of being handed to a C callback, a worker runs
//! the blocking call, and the result goes through the same completion queue
//! an async plugin's `nbdkit_reply` uses. The thread model decides which
//! queued jobs may run side by side.

use std::collections::VecDeque;
use std::ffi::c_void;
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex};

use super::sync_plugin::{self, *};
use crate::completion::{self, Outcome, Token};
use crate::plugin::{Handle, Io};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadModel {
    SerializeConnections,
    SerializeAllRequests,
    SerializeRequests,
    Parallel,
}

impl ThreadModel {
    pub fn from_c(v: std::ffi::c_int) -> Option<ThreadModel> {
        match v {
            NBDKIT_THREAD_MODEL_SERIALIZE_CONNECTIONS => Some(ThreadModel::SerializeConnections),
            NBDKIT_THREAD_MODEL_SERIALIZE_ALL_REQUESTS => Some(ThreadModel::SerializeAllRequests),
            NBDKIT_THREAD_MODEL_SERIALIZE_REQUESTS => Some(ThreadModel::SerializeRequests),
            NBDKIT_THREAD_MODEL_PARALLEL => Some(ThreadModel::Parallel),
            _ => None,
        }
    }
}

/// One op for a worker. `buf` points into the op's buffer in the loop's op
/// table, which stays put until the op is completed.
pub struct Job {
    pub token: Token,
    /// The connection's serial: SERIALIZE_REQUESTS is per connection, and
    /// plugins may hand every connection the same handle.
    pub conn: u64,
    pub io: Io,
    pub handle: Handle,
    pub buf: *mut u8,
    pub count: u32,
    pub offset: u64,
    pub flags: u32,
}

// SAFETY: the pointers are only used by the one worker that runs the job,
// under the op-lifetime contract described on `Job`.
unsafe impl Send for Job {}

/// The synchronous I/O callbacks (the rest of the plugin lives in `Plugin`).
#[derive(Clone, Copy)]
pub struct SyncIo {
    pub pread: Option<unsafe extern "C" fn(*mut c_void, *mut c_void, u32, u64, u32) -> i32>,
    pub pwrite: Option<unsafe extern "C" fn(*mut c_void, *const c_void, u32, u64, u32) -> i32>,
    pub flush: Option<unsafe extern "C" fn(*mut c_void, u32) -> i32>,
    pub trim: Option<unsafe extern "C" fn(*mut c_void, u32, u64, u32) -> i32>,
    pub zero: Option<unsafe extern "C" fn(*mut c_void, u32, u64, u32) -> i32>,
    pub cache: Option<unsafe extern "C" fn(*mut c_void, u32, u64, u32) -> i32>,
    pub extents: Option<unsafe extern "C" fn(*mut c_void, u32, u64, u32, *mut nbdkit_extents_builder) -> i32>,
}

impl SyncIo {
    pub fn has(&self, io: Io) -> bool {
        match io {
            Io::Read => self.pread.is_some(),
            Io::Write => self.pwrite.is_some(),
            Io::Flush => self.flush.is_some(),
            Io::Trim => self.trim.is_some(),
            Io::Zero => self.zero.is_some(),
            Io::Cache => self.cache.is_some(),
            Io::Extents => self.extents.is_some(),
        }
    }

    /// Runs one job on the calling (worker) thread.
    fn run(&self, j: &Job) -> Outcome {
        let h = j.handle.0;
        sync_plugin::take_error();
        // SAFETY: __errno_location always returns this thread's errno.
        unsafe { *libc::__errno_location() = 0 };
        let mut extents = ExtentsBuilder { next: j.offset, items: Vec::new() };
        let builder = (&mut extents as *mut ExtentsBuilder).cast::<nbdkit_extents_builder>();
        // SAFETY: plugin contract; callbacks exist (validation only lets
        // through commands the plugin offers); `buf` is live, see `Job`;
        // `builder` outlives the call.
        let r = unsafe {
            match j.io {
                Io::Read => self.pread.unwrap()(h, j.buf.cast(), j.count, j.offset, j.flags),
                Io::Write => self.pwrite.unwrap()(h, j.buf.cast_const().cast(), j.count, j.offset, j.flags),
                Io::Flush => self.flush.unwrap()(h, j.flags),
                Io::Trim => self.trim.unwrap()(h, j.count, j.offset, j.flags),
                Io::Zero => self.zero.unwrap()(h, j.count, j.offset, j.flags),
                Io::Cache => self.cache.unwrap()(h, j.count, j.offset, j.flags),
                Io::Extents => self.extents.unwrap()(h, j.count, j.offset, j.flags, builder),
            }
        };
        if r == 0 {
            return if j.io == Io::Extents { Outcome::Extents(extents.items) } else { Outcome::Done };
        }
        let errno = match sync_plugin::take_error() {
            0 => std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
            e => e,
        };
        Outcome::Error(if errno > 0 { errno } else { libc::EIO })
    }
}

struct State {
    queue: VecDeque<Job>,
    /// Connections with a callback running (for SERIALIZE_REQUESTS).
    busy: Vec<u64>,
    running: usize,
    stopping: bool,
}

struct Shared {
    state: Mutex<State>,
    work: Condvar,
    io: SyncIo,
    model: ThreadModel,
}

impl Shared {
    /// The first queued job the thread model lets run now.
    fn runnable(&self, s: &State) -> Option<usize> {
        match self.model {
            ThreadModel::Parallel => (!s.queue.is_empty()).then_some(0),
            ThreadModel::SerializeRequests => s.queue.iter().position(|j| !s.busy.contains(&j.conn)),
            ThreadModel::SerializeAllRequests | ThreadModel::SerializeConnections => {
                (s.running == 0 && !s.queue.is_empty()).then_some(0)
            }
        }
    }

    fn worker(&self) {
        let mut s = self.state.lock();
        loop {
            let Some(i) = self.runnable(&s) else {
                if s.stopping && s.queue.is_empty() {
                    return;
                }
                self.work.wait(&mut s);
                continue;
            };
            let job = s.queue.remove(i).expect("index from runnable");
            s.running += 1;
            s.busy.push(job.conn);
            drop(s);
            let outcome = self.io.run(&job);
            if let Err(e) = completion::complete(job.token, outcome) {
                log::debug!("worker: reply not delivered: {e:?}");
            }
            s = self.state.lock();
            s.running -= 1;
            let at = s.busy.iter().position(|&c| c == job.conn).expect("marked busy above");
            s.busy.swap_remove(at);
            if self.model != ThreadModel::Parallel {
                // A job that waited for this one may run now.
                self.work.notify_all();
            }
        }
    }
}

pub struct WorkerPool {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl WorkerPool {
    pub fn new(io: SyncIo, model: ThreadModel) -> WorkerPool {
        let state = State { queue: VecDeque::new(), busy: Vec::new(), running: 0, stopping: false };
        WorkerPool {
            shared: Arc::new(Shared { state: Mutex::new(state), work: Condvar::new(), io, model }),
            threads: Vec::new(),
        }
    }

    pub fn io(&self) -> &SyncIo {
        &self.shared.io
    }

    pub fn model(&self) -> ThreadModel {
        self.shared.model
    }

    /// Starts `n` workers (once; later calls do nothing).
    pub fn start(&mut self, n: usize) -> std::io::Result<()> {
        while self.threads.len() < n {
            let shared = self.shared.clone();
            let t = std::thread::Builder::new().name("nbdkit-worker".into()).spawn(move || shared.worker())?;
            self.threads.push(t);
        }
        Ok(())
    }

    pub fn submit(&self, job: Job) {
        self.shared.state.lock().queue.push_back(job);
        self.shared.work.notify_one();
    }

    /// Drops the jobs no worker has started (the server is being freed:
    /// their clients were answered, and running them now would apply
    /// writes after the fact), waits for the running ones, and joins every
    /// worker.
    pub fn stop(&mut self) {
        {
            let mut s = self.shared.state.lock();
            s.stopping = true;
            s.queue.clear();
        }
        self.shared.work.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        self.stop();
    }
}
