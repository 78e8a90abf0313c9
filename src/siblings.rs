//! A server's other event loops (`nbdkit_server_set_loops`): each runs on
//! a thread of its own, takes the connections the first loop hands it, and
//! keeps its ops, like the first, until the server is freed.

use std::io;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, channel};
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex};

use crate::event_loop::{EventLoop, Handoff, Shared, SiblingParts, run_guarded};

pub(crate) struct Siblings {
    stops: Vec<Arc<Shared>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Each loop's result, once it has returned.
    done: Mutex<Receiver<io::Result<()>>>,
    /// Set by `release`: the loops may be dropped, ops and all.
    freed: Arc<(Mutex<bool>, Condvar)>,
}

impl Siblings {
    /// Starts the loops 1..loops beside `first`, which hands them
    /// connections from then on.
    pub(crate) fn start(first: &mut EventLoop) -> io::Result<Siblings> {
        let (ready_tx, ready_rx) = channel::<io::Result<(Arc<Handoff>, Arc<Shared>)>>();
        let (done_tx, done) = channel();
        let freed = Arc::new((Mutex::new(false), Condvar::new()));
        let mut threads = Vec::new();
        let mut failed = None;
        for index in 1..first.config.loops {
            let Some(plugin) = first.plugin.for_another_loop() else {
                failed = Some(io::Error::from_raw_os_error(libc::ENOTSUP));
                break;
            };
            let parts = SiblingParts { plugin, config: first.config.clone(), stats: first.shared.stats.clone(), index };
            let (ready_tx, done_tx, freed) = (ready_tx.clone(), done_tx.clone(), freed.clone());
            let spawned = std::thread::Builder::new().name(format!("nbdkit-loop-{index}")).spawn(move || {
                let (mut l, handoff) = match EventLoop::sibling(parts) {
                    Ok(made) => made,
                    Err(e) => return drop(ready_tx.send(Err(e))),
                };
                let _ = ready_tx.send(Ok((handoff.clone(), l.shared.clone())));
                match run_guarded("event loop", &mut l, |l| l.run()) {
                    Ok(result) => {
                        let _ = done_tx.send(result);
                        // The plugin may still hold ops of this loop: keep
                        // it, on its own thread, until the server is freed.
                        let (lock, cv) = &*freed;
                        let mut f = lock.lock();
                        while !*f {
                            cv.wait(&mut f);
                        }
                        drop(l);
                    }
                    Err(()) => {
                        // Its memory stays (the plugin may hold buffers);
                        // new clients go to the other loops.
                        handoff.close();
                        std::mem::forget(l);
                        let _ = done_tx.send(Err(io::Error::from_raw_os_error(libc::EIO)));
                    }
                }
            });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        drop(ready_tx);
        let mut siblings =
            Siblings { stops: Vec::new(), threads: Mutex::new(Vec::new()), done: Mutex::new(done), freed };
        let mut handoffs = Vec::new();
        // Every thread started answers, whatever the others did: only then
        // can each be stopped and joined.
        for _ in 0..threads.len() {
            match ready_rx.recv() {
                Ok(Ok((handoff, shared))) => {
                    handoffs.push(handoff);
                    siblings.stops.push(shared);
                }
                Ok(Err(e)) => {
                    failed.get_or_insert(e);
                }
                Err(_) => {
                    failed.get_or_insert(io::Error::other("an event loop thread died at start"));
                }
            }
        }
        *siblings.threads.lock() = threads;
        if let Some(e) = failed {
            siblings.stop();
            let _ = siblings.wait();
            siblings.release();
            return Err(e);
        }
        first.share_with(handoffs);
        Ok(siblings)
    }

    /// Asks every loop to shut down. Thread-safe.
    pub(crate) fn stop(&self) {
        for s in &self.stops {
            s.request_stop();
        }
    }

    /// Waits until every loop has returned; the first error wins.
    pub(crate) fn wait(&self) -> io::Result<()> {
        let mut result = Ok(());
        let done = self.done.lock();
        for _ in 0..self.stops.len() {
            match done.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => result = result.and(Err(e)),
                Err(_) => break,
            }
        }
        result
    }

    /// Lets the loops drop (releasing what the plugin never answered) and
    /// joins their threads.
    pub(crate) fn release(&self) {
        let (lock, cv) = &*self.freed;
        *lock.lock() = true;
        cv.notify_all();
        for t in self.threads.lock().drain(..) {
            let _ = t.join();
        }
    }
}
