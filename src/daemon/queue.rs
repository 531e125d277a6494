//! A bounded hand-off queue between threads whose overload policy is explicit: when full,
//! the oldest *droppable* item (an unlabeled sample) goes first; only when labeled items
//! alone fill the queue does the oldest of them go. Memory stays bounded whatever arrives,
//! and every push hands back what it dropped so the caller can count it by kind.
//! Consumers take whole batches so the backbone runs batched.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// Whether an item may be dropped under overload.
pub trait Droppable {
    fn droppable(&self) -> bool;
}

pub struct BoundedQueue<T> {
    inner: Mutex<State<T>>,
    ready: Condvar,
    capacity: usize,
}

struct State<T> {
    items: VecDeque<T>,
    closed: bool,
}

impl<T: Droppable> BoundedQueue<T> {
    pub fn new(capacity: usize) -> Self {
        BoundedQueue {
            inner: Mutex::new(State {
                items: VecDeque::with_capacity(capacity),
                closed: false,
            }),
            ready: Condvar::new(),
            capacity,
        }
    }

    /// Adds an item; returns the item dropped to make room, if any (possibly `item` itself,
    /// when it is unlabeled and the queue is full of labeled items).
    pub fn push(&self, item: T) -> Option<T> {
        let mut state = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut dropped = None;
        if state.items.len() >= self.capacity {
            if let Some(i) = state.items.iter().position(Droppable::droppable) {
                dropped = state.items.remove(i);
            } else if item.droppable() {
                return Some(item);
            } else {
                // Labeled items alone fill the queue: the oldest is the least useful.
                dropped = state.items.pop_front();
            }
        }
        state.items.push_back(item);
        drop(state);
        self.ready.notify_one();
        dropped
    }

    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .items
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits up to `wait` for at least one item, then moves up to `max` into `out`.
    /// Returns false once the queue is closed and empty.
    pub fn pop_batch(&self, max: usize, wait: Duration, out: &mut Vec<T>) -> bool {
        out.clear();
        let state = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (mut state, _) = self
            .ready
            .wait_timeout_while(state, wait, |s| s.items.is_empty() && !s.closed)
            .unwrap_or_else(|e| e.into_inner());
        let n = max.min(state.items.len());
        out.extend(state.items.drain(..n));
        !(state.closed && out.is_empty())
    }

    /// Wakes consumers; after the remaining items are taken, `pop_batch` returns false.
    pub fn close(&self) {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
        self.ready.notify_all();
    }
}
