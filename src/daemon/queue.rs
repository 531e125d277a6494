//! A bounded hand-off queue between threads whose overload policy is explicit: when full,
//! the oldest *droppable* item (an unlabeled sample) goes first; only when labeled items
//! alone fill the queue does the oldest of them go. Memory stays bounded whatever arrives,
//! and every push hands back what it dropped so the caller can count it by kind.
//! Consumers take whole batches so the backbone runs batched. What a queue holds can be read
//! at any time ([`Depth`]), for the queue-depth metrics.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// Whether an item may be dropped under overload, and how much of the capacity it takes.
pub trait Droppable {
    /// Unlabeled items may be dropped first; a labeled one (a labeled sample or label
    /// feedback) only when labeled items alone fill the queue.
    fn droppable(&self) -> bool;
    /// Whether a drop counts in the queue's own counter (a sample or a raw message; label
    /// feedback counts only as a dropped label).
    fn is_sample(&self) -> bool {
        true
    }
    /// Capacity units this item uses: 1 for a count-bounded queue, bytes for a byte budget.
    fn weight(&self) -> usize {
        1
    }
}

/// What a queue holds at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Depth {
    pub items: usize,
    /// The items' summed weight: the same as `items` for a count-bounded queue, bytes for a
    /// byte budget.
    pub load: usize,
}

/// A queue whose depth can be read without knowing its item type, so the shared state can
/// report every queue without importing the modules that define the items.
pub trait QueueDepth: Send + Sync {
    fn depth(&self) -> Depth;
}

pub struct BoundedQueue<T> {
    inner: Mutex<State<T>>,
    ready: Condvar,
    capacity: usize,
}

struct State<T> {
    items: VecDeque<T>,
    /// Sum of the items' weights.
    load: usize,
    closed: bool,
}

impl<T: Droppable> BoundedQueue<T> {
    pub fn new(capacity: usize) -> Self {
        BoundedQueue {
            inner: Mutex::new(State {
                items: VecDeque::with_capacity(capacity.min(4096)),
                load: 0,
                closed: false,
            }),
            ready: Condvar::new(),
            capacity,
        }
    }

    /// Adds an item; returns the item dropped to make room, if any (possibly `item` itself,
    /// when it is unlabeled and the queue is full of labeled items). For queues whose items
    /// all weigh 1, at most one item goes.
    pub fn push(&self, item: T) -> Option<T> {
        let mut dropped = None;
        self.push_with(item, |d| dropped = Some(d));
        dropped
    }

    /// Adds an item, handing every item dropped to make room to `on_drop`.
    pub fn push_with(&self, item: T, mut on_drop: impl FnMut(T)) {
        let weight = item.weight();
        if weight > self.capacity {
            on_drop(item);
            return;
        }
        let mut state = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        while state.load + weight > self.capacity {
            let old = if let Some(i) = state.items.iter().position(Droppable::droppable) {
                state.items.remove(i)
            } else if item.droppable() {
                drop(state);
                on_drop(item);
                return;
            } else {
                // Labeled items alone fill the queue: the oldest is the least useful.
                state.items.pop_front()
            };
            let Some(old) = old else { break };
            state.load -= old.weight();
            on_drop(old);
        }
        state.load += weight;
        state.items.push_back(item);
        drop(state);
        self.ready.notify_one();
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
        state.load -= out.iter().map(Droppable::weight).sum::<usize>();
        !(state.closed && out.is_empty())
    }

    /// What the queue holds now.
    pub fn depth(&self) -> Depth {
        let state = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        Depth {
            items: state.items.len(),
            load: state.load,
        }
    }

    /// Wakes consumers; after the remaining items are taken, `pop_batch` returns false.
    pub fn close(&self) {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
        self.ready.notify_all();
    }
}

impl<T: Droppable + Send> QueueDepth for BoundedQueue<T> {
    fn depth(&self) -> Depth {
        BoundedQueue::depth(self)
    }
}
