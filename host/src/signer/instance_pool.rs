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
//! instances give way (oldest first) when a fresh one needs their pool slot.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::Store;
use wasmtime_wasi_http::p2::bindings::Proxy;

/// Who sent a request, for reuse only: the SHA-256 of its bearer token.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct Caller([u8; 32]);

impl Caller {
    /// `None` unless the request carries a bearer token, read as the signer
    /// reads it (`Bearer `/`bearer `, trimmed, not empty). An instance whose
    /// answer refused the token (401/403) is not kept either: only a token
    /// the signer accepted names a caller.
    pub(crate) fn of(headers: &http::HeaderMap) -> Option<Caller> {
        let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
        let token = value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer "))?.trim();
        (!token.is_empty()).then(|| Caller(Sha256::digest(token.as_bytes()).into()))
    }
}

/// An instance that served a request and may serve its caller again.
struct Warm<T: 'static> {
    store: Store<T>,
    proxy: Proxy,
    /// Requests it has served.
    uses: u32,
    caller: Caller,
    idle_since: Instant,
}

/// Idle instances, each tied to the caller it served.
pub(crate) struct InstancePool<T: 'static> {
    idle: Mutex<VecDeque<Warm<T>>>,
    max_uses: u32,
    idle_ttl: Duration,
}

impl<T: 'static> InstancePool<T> {
    /// `max_uses` of 1 turns reuse off.
    pub(crate) fn new(max_uses: u32, idle_ttl: Duration) -> Self {
        InstancePool { idle: Mutex::new(VecDeque::new()), max_uses: max_uses.max(1), idle_ttl }
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
        let expired = self.drain_expired(&mut self.lock());
        drop(expired);
    }

    /// The most recently used idle instance of `caller`, if any, with the
    /// number of requests it has served.
    pub(crate) fn take(&self, caller: Caller) -> Option<(Store<T>, Proxy, u32)> {
        let (found, expired) = {
            let mut idle = self.lock();
            let expired = self.drain_expired(&mut idle);
            let found = idle.iter().rposition(|w| w.caller == caller).and_then(|i| idle.remove(i));
            (found, expired)
        };
        drop(expired); // Stores are dropped outside the lock: that returns their memory.
        found.map(|w| (w.store, w.proxy, w.uses))
    }

    /// Keeps `store` for `caller`'s next request, unless it has served enough.
    pub(crate) fn give_back(&self, caller: Caller, store: Store<T>, proxy: Proxy, uses: u32) {
        if uses >= self.max_uses {
            return;
        }
        let warm = Warm { store, proxy, uses, caller, idle_since: Instant::now() };
        self.lock().push_back(warm);
    }

    /// Drops idle instances, oldest first, until at most `keep` remain.
    pub(crate) fn shrink_to(&self, keep: usize) {
        let dropped: Vec<Warm<T>> = {
            let mut idle = self.lock();
            let mut dropped = self.drain_expired(&mut idle);
            while idle.len() > keep {
                dropped.extend(idle.pop_front());
            }
            dropped
        };
        drop(dropped);
    }

    pub(crate) fn idle_count(&self) -> usize {
        self.lock().len()
    }

    fn drain_expired(&self, idle: &mut VecDeque<Warm<T>>) -> Vec<Warm<T>> {
        let mut expired = Vec::new();
        while idle.front().is_some_and(|w| w.idle_since.elapsed() >= self.idle_ttl) {
            expired.extend(idle.pop_front());
        }
        expired
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Warm<T>>> {
        self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
