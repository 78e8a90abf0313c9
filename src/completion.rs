//! Op handles and the cross-thread completion queue.
//!
//! An op handle given to C is not a pointer to memory: it is a token that
//! names a server, a slot in that server's op table and the slot's
//! generation. A reply from any thread only pushes `(token, result)` onto
//! the server's queue and wakes the loop; the loop thread alone owns op
//! state. So a second reply, a reply after the client left, or a reply
//! after the server is gone is recognised and logged, never a
//! use-after-free.

use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use slab::Slab;

use crate::loan::Loan;

const SLOT_BITS: u32 = 24;
const GEN_BITS: u32 = 24;
const SERVER_BITS: u32 = 16;
const SLOT_MASK: u64 = (1 << SLOT_BITS) - 1;
const GEN_MASK: u64 = (1 << GEN_BITS) - 1;

/// Most ops one server can have in flight at once.
pub(crate) const MAX_OPS: usize = 1 << SLOT_BITS;

// Op handles travel to C as pointers (`nbdkit_op *`): a token must fit.
const _: () = assert!(std::mem::size_of::<u64>() <= std::mem::size_of::<*mut u8>(), "op tokens need 64-bit pointers");

/// A packed op handle: server (16 bits) | slot (24 bits) | generation (24 bits).
/// The generation is never 0, so no token is NULL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token(pub u64);

impl Token {
    pub fn new(server: usize, slot: usize, generation: u32) -> Token {
        debug_assert!(server < 1 << SERVER_BITS && slot < MAX_OPS && generation != 0);
        Token((server as u64) << (SLOT_BITS + GEN_BITS) | (slot as u64) << GEN_BITS | generation as u64)
    }
    pub fn server(self) -> usize {
        (self.0 >> (SLOT_BITS + GEN_BITS)) as usize
    }
    pub fn slot(self) -> usize {
        ((self.0 >> GEN_BITS) & SLOT_MASK) as usize
    }
    pub fn generation(self) -> u32 {
        (self.0 & GEN_MASK) as u32
    }
}

/// How the plugin finished an op.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Success; for a READ, the buffer handed to the plugin holds the data.
    Done,
    /// Success of a READ with data the plugin kept elsewhere (copied).
    Data(Vec<u8>),
    /// Success of a READ with data the plugin lends until it is sent.
    Lent(Loan),
    /// Failure with a host errno.
    Error(i32),
    /// Block status: (length, NBDKIT_EXTENT_* bits) from the op's offset.
    Extents(Vec<(u64, u32)>),
    /// Success of a READ whose buffer holds the data, with its holes marked.
    SparseRead(Vec<(u64, u32)>),
}

#[derive(Debug)]
pub struct Completion {
    pub token: Token,
    pub outcome: Outcome,
}

struct Queue {
    items: Vec<Completion>,
    /// Set when the server's loop has ended: later replies are refused.
    closed: bool,
    /// The loop is (about to be) blocked in poll with nothing queued: the
    /// next reply must wake it. While the loop runs it drains the queue
    /// before sleeping anyway, so replies then need no wake-up syscall.
    loop_asleep: bool,
}

/// One server's completion queue, shared with every replying thread.
pub struct Completions {
    queue: Mutex<Queue>,
    waker: mio::Waker,
}

/// Why a reply could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyError {
    /// The handle names no live server (NULL, garbage, or a freed server).
    UnknownServer,
    /// The server's loop has ended.
    Closed,
}

impl Completions {
    pub fn new(waker: mio::Waker) -> Self {
        Completions { queue: Mutex::new(Queue { items: Vec::new(), closed: false, loop_asleep: false }), waker }
    }

    /// Queues a completion; hands it back if the loop has ended.
    pub fn push(&self, completion: Completion) -> Result<(), Completion> {
        let wake = {
            let mut q = self.queue.lock();
            if q.closed {
                return Err(completion);
            }
            q.items.push(completion);
            std::mem::take(&mut q.loop_asleep)
        };
        // Only a sleeping loop needs waking, and only by the first reply:
        // it drains everything queued by then in one go.
        if wake {
            if let Err(e) = self.waker.wake() {
                log::error!("cannot wake the event loop: {}", crate::errno::Describe(&e));
            }
        }
        Ok(())
    }

    /// Takes every queued completion, leaving `spare` (emptied) in its place
    /// so the two vectors swap roles without allocating.
    pub fn drain_into(&self, spare: &mut Vec<Completion>) {
        spare.clear();
        let mut q = self.queue.lock();
        q.loop_asleep = false;
        std::mem::swap(&mut q.items, spare);
    }

    /// Called by the loop just before it blocks: false if replies are
    /// already waiting (then it must not block), else marks it asleep so
    /// the next reply wakes it.
    pub fn may_sleep(&self) -> bool {
        let mut q = self.queue.lock();
        q.loop_asleep = q.items.is_empty();
        q.loop_asleep
    }

    pub fn close(&self) {
        self.queue.lock().closed = true;
    }

    pub fn wake(&self) {
        let _ = self.waker.wake();
    }
}

/// Every live server, indexed by the server field of its tokens. Ids are
/// handed out round-robin, not lowest-free, so a freed server's id (and
/// with it any stale op handle of that server) stays unused as long as
/// possible.
struct Registry {
    servers: Vec<Option<Arc<Completions>>>,
    next: usize,
}

static REGISTRY: RwLock<Registry> = RwLock::new(Registry { servers: Vec::new(), next: 0 });

pub fn register(completions: Arc<Completions>) -> Option<usize> {
    let mut r = REGISTRY.write();
    const IDS: usize = 1 << SERVER_BITS;
    let id = (0..IDS).map(|i| (r.next + i) % IDS).find(|&id| r.servers.get(id).is_none_or(|s| s.is_none()))?;
    if id >= r.servers.len() {
        r.servers.resize(id + 1, None);
    }
    r.servers[id] = Some(completions);
    r.next = id + 1;
    Some(id)
}

pub fn unregister(server: usize) {
    if let Some(slot) = REGISTRY.write().servers.get_mut(server) {
        *slot = None;
    }
}

/// Queues a reply for `token`, from any thread.
pub fn complete(token: Token, outcome: Outcome) -> Result<(), ReplyError> {
    let refused = {
        let r = REGISTRY.read();
        match r.servers.get(token.server()).and_then(|s| s.as_ref()) {
            Some(completions) => {
                completions.push(Completion { token, outcome }).err().map(|c| (ReplyError::Closed, c.outcome))
            }
            None => Some((ReplyError::UnknownServer, outcome)),
        }
    };
    // A refused reply is dropped only now, with the registry unlocked:
    // dropping lent read data runs the plugin's release callback, which
    // may well reply to another op.
    match refused {
        None => Ok(()),
        Some((why, outcome)) => {
            drop(outcome);
            Err(why)
        }
    }
}

/// Where each new op table starts its generations: different for every
/// table, so even a reused server id does not recreate old tokens.
static GENERATION_SEED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);

/// What is remembered of an answered op, to name it when the plugin
/// answers it again.
pub trait Retire {
    type Summary: Copy;
    fn summary(&self) -> Self::Summary;
}

/// The loop thread's table of ops in flight, keyed by token slot.
pub struct OpTable<T: Retire> {
    server: usize,
    /// First generation of a fresh slot.
    seed: u32,
    ops: Slab<(u32, T)>,
    /// Per slot: the last generation used, kept across removals so a stale
    /// token never matches the slot's next op, and a summary of the op
    /// that last left the slot.
    generations: Vec<(u32, Option<T::Summary>)>,
}

impl<T: Retire> Default for OpTable<T> {
    fn default() -> Self {
        OpTable::new(0)
    }
}

impl<T: Retire> OpTable<T> {
    pub fn new(server: usize) -> Self {
        // A large odd step walks all 2^24 generations before repeating.
        let seed = GENERATION_SEED.fetch_add(0x9e_3779, std::sync::atomic::Ordering::Relaxed) & GEN_MASK as u32;
        OpTable { server, seed, ops: Slab::new(), generations: Vec::new() }
    }

    /// The op `token` named, if it was answered and its slot not reused
    /// since: a second reply to it.
    pub fn retired(&self, token: Token) -> Option<T::Summary> {
        if token.server() != self.server || self.ops.contains(token.slot()) {
            return None;
        }
        match self.generations.get(token.slot()) {
            Some(&(g, summary)) if g == token.generation() => summary,
            _ => None,
        }
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Every live op with its current token.
    pub fn iter(&self) -> impl Iterator<Item = (Token, &T)> {
        self.ops.iter().map(|(slot, (g, op))| (Token::new(self.server, slot, *g), op))
    }

    pub fn is_full(&self) -> bool {
        self.ops.len() >= MAX_OPS
    }

    fn next_generation(&mut self, slot: usize) -> u32 {
        if slot == self.generations.len() {
            self.generations.push((self.seed, None));
        }
        let g = &mut self.generations[slot].0;
        *g = (*g + 1) & GEN_MASK as u32;
        if *g == 0 {
            *g = 1;
        }
        *g
    }

    /// Stores an op and returns its fresh token, or `None` when full.
    pub fn insert(&mut self, op: T) -> Option<Token> {
        if self.is_full() {
            return None;
        }
        let slot = self.ops.vacant_key();
        let generation = self.next_generation(slot);
        self.ops.insert((generation, op));
        Some(Token::new(self.server, slot, generation))
    }

    /// Gives a live op a new token (a second phase of the same request, such
    /// as the flush that emulates FUA), so a reply to the old token is stale.
    pub fn renew(&mut self, token: Token) -> Option<Token> {
        self.get(token)?;
        let generation = self.next_generation(token.slot());
        self.ops[token.slot()].0 = generation;
        Some(Token::new(self.server, token.slot(), generation))
    }

    pub fn get(&mut self, token: Token) -> Option<&mut T> {
        if token.server() != self.server {
            return None;
        }
        match self.ops.get_mut(token.slot()) {
            Some((g, op)) if *g == token.generation() => Some(op),
            _ => None,
        }
    }

    pub fn remove(&mut self, token: Token) -> Option<T> {
        self.get(token)?;
        let op = self.ops.remove(token.slot()).1;
        self.generations[token.slot()].1 = Some(op.summary());
        Some(op)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Retire for &'static str {
        type Summary = &'static str;
        fn summary(&self) -> &'static str {
            self
        }
    }

    impl Retire for () {
        type Summary = ();
        fn summary(&self) {}
    }

    #[test]
    fn token_fields_round_trip() {
        let t = Token::new(65535, MAX_OPS - 1, (1 << 24) - 1);
        assert_eq!((t.server(), t.slot(), t.generation()), (65535, MAX_OPS - 1, (1 << 24) - 1));
        assert_ne!(Token::new(0, 0, 1).0, 0);
    }

    #[test]
    fn stale_tokens_never_match() {
        let mut table = OpTable::new(3);
        let a = table.insert("a").unwrap();
        assert_eq!(table.remove(a), Some("a"));
        assert_eq!(table.remove(a), None, "second reply is stale");
        let b = table.insert("b").unwrap();
        assert_eq!(a.slot(), b.slot(), "slot reused");
        assert_eq!(table.get(a), None, "old token does not reach the new op");
        let b2 = table.renew(b).unwrap();
        assert_eq!(table.get(b), None);
        assert_eq!(table.get(b2), Some(&mut "b"));
        assert_eq!(table.get(Token::new(4, b2.slot(), b2.generation())), None, "other server");
        assert_eq!(table.retired(b2), None, "live ops are not retired");
        assert_eq!(table.remove(b2), Some("b"));
        assert_eq!(table.retired(b2), Some("b"), "a second reply names its op");
        assert_eq!(table.retired(b), None, "an older token names nothing");
    }

    #[test]
    fn generation_skips_zero_on_wrap() {
        let mut table = OpTable::new(0);
        table.generations.push((GEN_MASK as u32, None));
        let t = table.insert(()).unwrap();
        assert_eq!(t.generation(), 1);
    }
}
