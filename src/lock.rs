//! Taking a lock whatever an earlier holder did.
//!
//! A lock is poisoned when a thread panicked while holding it. Here that thread is a
//! worker whose handler panicked: the pool catches the panic, its request is answered 500,
//! and the worker goes on (`pool`). Every critical section under these locks leaves its
//! state usable at each point it could panic (counters, caches, maps of waiters), so the
//! server goes on with it rather than turn one panic into a panic in every later request.

use std::sync::RwLockWriteGuard;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard};

/// Locks `mutex`, poisoned or not.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Takes `lock` for reading, poisoned or not.
pub(crate) fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

/// Takes `lock` for writing, poisoned or not.
pub(crate) fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

/// Waits on `condvar`, taking `guard`'s lock back poisoned or not.
pub(crate) fn wait<'a, T>(condvar: &Condvar, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    condvar.wait(guard).unwrap_or_else(PoisonError::into_inner)
}
