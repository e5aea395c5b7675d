//! Instance reuse, per caller.
//!
//! A fresh instance per request costs an instantiation and the guest's
//! start-up (reading its configuration, decoding keys); reuse saves both. The
//! risk is what a request leaves in the instance: freed heap is not zeroed,
//! and a guest bug could keep a caller's data in a static. So an instance is
//! only ever reused for the **same caller**, named by the SHA-256 of the
//! request's bearer token, and kept only when the signer answered without
//! refusing that token: whatever one caller leaves behind can only reach
//! that same caller again. Requests without a bearer token never reuse and
//! are never reused.
//!
//! An instance is dropped, never reused, after a trap, a timeout or any
//! error, after `max_uses` requests, and after `idle_ttl` unused. Idle
//! instances are a cache of at most `max_idle`: when a caller gives one back
//! to a full cache, the least recently used goes.
//!
//! **Keeping only while it pays.** With many callers that rarely return (a
//! dataplane serving many namespaces), a kept instance is evicted before its
//! caller comes back, and keeping it only costs. The pool remembers the last
//! `max_idle` callers that gave an instance back (their token hashes, no
//! instance) and keeps a moving average (over about 64 give-backs) of how
//! often the caller giving back is among them: the requests a full cache
//! could have served. While fewer than one in [`KEEP_BELOW`] could have
//! been, give-backs drop their instance; the average goes on, so keeping
//! resumes when callers start to return.
//!
//! **Why no request is refused below `--max-concurrency`.** wasmtime's
//! pooling allocator has room for `max_concurrency + max_idle` instances
//! (see `SignerHost`), and every instance alive is counted in one of:
//! - the requests that hold a concurrency slot (at most `max_concurrency`),
//!   each with at most one instance: the one it runs, or, once it gave that
//!   back, the victim it evicted and is still dropping (it drops the victim
//!   before it lets go of its slot);
//! - the idle cache (at most `max_idle`: a give-back that fills it past that
//!   takes the victim out in the same locked step);
//! - instances expired by their TTL, dropped while the lock is held, so they
//!   count as idle until their pool slot is free.
//!
//! So a request that holds a slot and starts a fresh instance always finds a
//! pool slot free, and no fresh request waits for an eviction: victims are
//! dropped by the request that gave back, outside the lock, after its answer
//! is ready. (Before, a fresh instance evicted idle ones to make room in a
//! pool of `max_concurrency`, and had to drop them under the lock.)

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// Who sent a request, for reuse only: the SHA-256 of its bearer token.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct Caller([u8; 32]);

impl Caller {
    /// `None` unless the request carries a bearer token, read as the signer
    /// reads it (`Bearer `/`bearer `, trimmed, not empty). An instance whose
    /// answer was not a success (2xx) is not kept either: only a token the
    /// signer accepted names a caller.
    pub(crate) fn of(headers: &http::HeaderMap) -> Option<Caller> {
        let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
        let token = value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer "))?.trim();
        (!token.is_empty()).then(|| Caller(Sha256::digest(token.as_bytes()).into()))
    }
}

/// An instance that served a request and may serve its caller again.
/// `I` is the instance: its wasmtime store and exports in serve-signer.
struct Warm<I> {
    instance: I,
    /// Requests it has served.
    uses: u32,
    caller: Caller,
    idle_since: Instant,
}

/// Keeping stops while fewer than one request in this many could have been
/// served by a kept instance.
pub(crate) const KEEP_BELOW: u32 = 16;

/// The moving average's scale: [`Outlook::score`] is the share of requests a
/// full cache could have served, in 1/`SCALE`.
const SCALE: u32 = 1 << 16;

/// How the average follows: each request moves it 1/`FOLLOW` of the way.
const FOLLOW: u32 = 64;

/// Idle instances, each tied to the caller it served.
pub(crate) struct InstancePool<I> {
    idle: Mutex<Idle<I>>,
    max_uses: u32,
    max_idle: usize,
    idle_ttl: Duration,
}

/// What the lock guards: the idle instances and the outlook of keeping them.
struct Idle<I> {
    warm: VecDeque<Warm<I>>,
    outlook: Outlook,
}

/// Whether keeping instances pays (see the module documentation).
struct Outlook {
    /// The last `max_idle` callers that gave an instance back, kept or not.
    recent: VecDeque<Caller>,
    /// Moving average of the requests whose caller was in `recent`, in 1/SCALE.
    score: u32,
}

impl Outlook {
    fn note_request(&mut self, caller: Caller) {
        let could = if self.recent.contains(&caller) { SCALE } else { 0 };
        self.score = self.score - self.score / FOLLOW + could / FOLLOW;
    }

    fn note_give_back(&mut self, caller: Caller, max_idle: usize) {
        if let Some(at) = self.recent.iter().position(|c| *c == caller) {
            self.recent.remove(at);
        }
        self.recent.push_back(caller);
        if self.recent.len() > max_idle {
            self.recent.pop_front();
        }
    }

    fn pays(&self) -> bool {
        self.score >= SCALE / KEEP_BELOW
    }
}

impl<I> InstancePool<I> {
    /// `max_uses` of 1 (or `max_idle` of 0) turns reuse off.
    pub(crate) fn new(max_uses: u32, max_idle: usize, idle_ttl: Duration) -> Self {
        let max_uses = if max_idle == 0 { 1 } else { max_uses.max(1) };
        let outlook = Outlook { recent: VecDeque::new(), score: SCALE };
        InstancePool { idle: Mutex::new(Idle { warm: VecDeque::new(), outlook }), max_uses, max_idle, idle_ttl }
    }

    pub(crate) fn reuses(&self) -> bool {
        self.max_uses > 1
    }

    /// How long an idle instance waits for its caller.
    pub(crate) fn idle_ttl(&self) -> Duration {
        self.idle_ttl
    }

    #[cfg(test)]
    pub(crate) fn set_idle_ttl(&mut self, idle_ttl: Duration) {
        self.idle_ttl = idle_ttl;
    }

    /// Drops the idle instances that waited longer than the idle TTL.
    pub(crate) fn drop_expired(&self) {
        let mut idle = self.lock();
        let expired = self.drain_expired(&mut idle.warm);
        drop(expired); // Under the lock: see the module documentation.
        drop(idle);
    }

    /// The most recently used idle instance of `caller`, if any, with the
    /// number of requests it has served.
    pub(crate) fn take(&self, caller: Caller) -> Option<(I, u32)> {
        let mut idle = self.lock();
        let expired = self.drain_expired(&mut idle.warm);
        drop(expired); // Under the lock: see the module documentation.
        let found = idle.warm.iter().rposition(|w| w.caller == caller).and_then(|i| idle.warm.remove(i));
        drop(idle);
        found.map(|w| (w.instance, w.uses))
    }

    /// Keeps `instance` for `caller`'s next request, unless it has served
    /// enough or keeping does not pay now. When the cache is full, the least
    /// recently used idle instance is taken out and dropped here, after the
    /// lock is released: the caller must still hold its concurrency slot (see
    /// the module documentation).
    pub(crate) fn give_back(&self, caller: Caller, instance: I, uses: u32) {
        let mut idle = self.lock();
        // Counted here, not at take: only a request whose token the signer
        // accepted gives back, so junk tokens cannot turn keeping off.
        idle.outlook.note_request(caller);
        idle.outlook.note_give_back(caller, self.max_idle);
        if uses >= self.max_uses || !idle.outlook.pays() {
            drop(idle);
            drop(instance);
            return;
        }
        idle.warm.push_back(Warm { instance, uses, caller, idle_since: Instant::now() });
        let victim = if idle.warm.len() > self.max_idle { idle.warm.pop_front() } else { None };
        drop(idle);
        drop(victim);
    }

    pub(crate) fn idle_count(&self) -> usize {
        self.lock().warm.len()
    }

    /// Whether give-backs keep their instance now.
    #[cfg(test)]
    pub(crate) fn keeping(&self) -> bool {
        self.lock().outlook.pays()
    }

    fn drain_expired(&self, idle: &mut VecDeque<Warm<I>>) -> Vec<Warm<I>> {
        let mut expired = Vec::new();
        while idle.front().is_some_and(|w| w.idle_since.elapsed() >= self.idle_ttl) {
            expired.extend(idle.pop_front());
        }
        expired
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Idle<I>> {
        self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// An instance whose drop takes a while and says when it began and ended.
    struct Slow {
        dropping: Arc<AtomicBool>,
        dropped: Arc<AtomicBool>,
    }

    impl Drop for Slow {
        fn drop(&mut self) {
            self.dropping.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(300));
            self.dropped.store(true, Ordering::SeqCst);
        }
    }

    fn caller(token: &str) -> Caller {
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
        Caller::of(&headers).unwrap()
    }

    /// A victim evicted by a give-back is dropped after the lock is
    /// released: others take and give back while it is still dropping.
    #[test]
    fn a_full_cache_evicts_the_least_recently_used_and_drops_it_outside_the_lock() {
        let pool = Arc::new(InstancePool::new(10, 1, Duration::from_secs(60)));
        let slow = || (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let ((a_dropping, a_dropped), (b_dropping, b_dropped)) = (slow(), slow());
        pool.give_back(caller("A"), Slow { dropping: a_dropping.clone(), dropped: a_dropped.clone() }, 1);
        let giving = std::thread::spawn({
            let pool = pool.clone();
            let b = Slow { dropping: b_dropping.clone(), dropped: b_dropped.clone() };
            move || pool.give_back(caller("B"), b, 1)
        });
        while !a_dropping.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        // A is being dropped by the thread that gave B back; the cache is usable meanwhile.
        assert_eq!(pool.idle_count(), 1, "the cache holds at most max_idle");
        let (b, uses) = pool.take(caller("B")).expect("B is cached");
        assert!(pool.take(caller("A")).is_none(), "A was evicted");
        assert!(!a_dropped.load(Ordering::SeqCst), "the lock was held while the victim dropped");
        assert_eq!(uses, 1);
        giving.join().unwrap();
        assert!(a_dropped.load(Ordering::SeqCst), "the victim is gone when give_back returns");
        assert!(!b_dropping.load(Ordering::SeqCst));
        drop(b);
    }

    #[test]
    fn the_least_recently_used_goes_first_and_a_caller_gets_only_its_own() {
        let pool = InstancePool::new(10, 2, Duration::from_secs(60));
        pool.give_back(caller("A"), "a", 1);
        pool.give_back(caller("B"), "b", 1);
        // A is used again: now B is the least recently used.
        let (a, uses) = pool.take(caller("A")).unwrap();
        assert_eq!((a, uses), ("a", 1));
        pool.give_back(caller("A"), a, 2);
        // The cache holds two: C's give-back evicts B.
        pool.give_back(caller("C"), "c", 1);
        assert_eq!(pool.idle_count(), 2);
        assert!(pool.take(caller("B")).is_none(), "B was the least recently used");
        assert_eq!(pool.take(caller("C")).map(|(i, _)| i), Some("c"));
        assert!(pool.take(caller("D")).is_none(), "nobody else's instance");
        // Served enough: not kept.
        pool.give_back(caller("A"), "a", 10);
        assert_eq!(pool.take(caller("A")), Some(("a", 2)));
        assert!(pool.take(caller("A")).is_none());
        // No room at all: reuse is off.
        let off = InstancePool::new(10, 0, Duration::from_secs(60));
        assert!(!off.reuses());
        off.give_back(caller("A"), "a", 1);
        assert_eq!(off.idle_count(), 0);
    }

    /// One request of `caller`, as serve-signer makes it: take, else a fresh instance; then give back.
    fn serve(pool: &InstancePool<String>, caller: Caller) -> bool {
        let (instance, uses) = pool.take(caller).map_or(("fresh".to_owned(), 0), |(i, u)| (i, u));
        pool.give_back(caller, instance, uses + 1);
        uses > 0
    }

    #[test]
    fn keeping_stops_while_callers_do_not_return_and_resumes_when_they_do() {
        let pool = InstancePool::new(1000, 8, Duration::from_secs(60));
        // One caller again and again: every request but the first reuses.
        let reused = (0..100).filter(|_| serve(&pool, caller("steady"))).count();
        assert_eq!(reused, 99);
        assert!(pool.keeping());
        // A thousand callers in turn, never back within the cache's eight: keeping stops.
        for round in 0..3 {
            for n in 0..1000 {
                assert!(!serve(&pool, caller(&format!("{round}-{n}"))), "a new caller reused an instance");
            }
        }
        assert!(!pool.keeping(), "keeping went on with no caller returning");
        assert!(pool.take(caller("2-999")).is_none(), "the last give-back was kept");
        assert_eq!(pool.idle_count(), 8, "the instances kept before it stopped wait out their TTL");
        for n in 0..100 {
            serve(&pool, caller(&format!("x-{n}")));
        }
        assert!(pool.take(caller("x-99")).is_none(), "a give-back was kept while keeping was off");
        assert!(pool.take(caller("steady")).is_none(), "the steady caller's instance was evicted long ago");
        // Four callers in turn (within the cache's eight): the count sees
        // they come back, keeping resumes, and they reuse.
        let callers: Vec<Caller> = (0..4).map(|n| caller(&format!("back-{n}"))).collect();
        let mut reused = 0;
        for i in 0..2000 {
            reused += usize::from(serve(&pool, callers[i % 4]));
        }
        assert!(pool.keeping());
        assert!(reused > 1900, "{reused} of 2000 reused");
    }
}
