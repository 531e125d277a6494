//! The daemon's overload policy, driven past capacity: the oldest unlabeled item goes first,
//! a labeled one only when labeled items alone fill the queue, and a byte-budgeted queue
//! drops as many as it takes to fit. What was dropped is handed back, so it can be counted.

use std::time::Duration;

use edgemt::daemon::queue::{BoundedQueue, Droppable};

#[derive(Debug, Clone, PartialEq)]
struct Item {
    id: u32,
    labeled: bool,
    bytes: usize,
}

impl Droppable for Item {
    fn droppable(&self) -> bool {
        !self.labeled
    }
    fn weight(&self) -> usize {
        self.bytes
    }
}

fn item(id: u32, labeled: bool) -> Item {
    Item {
        id,
        labeled,
        bytes: 1,
    }
}

fn drain(q: &BoundedQueue<Item>) -> Vec<u32> {
    let mut out = Vec::new();
    q.pop_batch(1000, Duration::from_millis(10), &mut out);
    out.iter().map(|i| i.id).collect()
}

#[test]
fn a_full_queue_drops_its_oldest_unlabeled_item_and_keeps_every_label() {
    let q = BoundedQueue::new(4);
    // L1 U2 L3 U4, then four more unlabeled: each push drops the oldest unlabeled.
    let mut dropped = Vec::new();
    for (id, labeled) in [(1, true), (2, false), (3, true), (4, false)] {
        assert!(q.push(item(id, labeled)).is_none());
    }
    for id in 5..=8 {
        dropped.extend(q.push(item(id, false)).map(|i| i.id));
    }
    assert_eq!(dropped, [2, 4, 5, 6]);
    assert_eq!(drain(&q), [1, 3, 7, 8], "arrival order kept");
}

#[test]
fn a_queue_full_of_labels_refuses_an_unlabeled_newcomer_and_drops_the_oldest_label_for_a_new_one() {
    let q = BoundedQueue::new(3);
    for id in 1..=3 {
        q.push(item(id, true));
    }
    assert_eq!(
        q.push(item(4, false)).map(|i| i.id),
        Some(4),
        "the newcomer goes"
    );
    assert_eq!(
        q.push(item(5, true)).map(|i| i.id),
        Some(1),
        "the oldest label goes"
    );
    assert_eq!(drain(&q), [2, 3, 5]);
}

#[test]
fn a_byte_budget_drops_as_many_unlabeled_items_as_a_large_one_needs() {
    let q = BoundedQueue::new(100);
    for id in 1..=5 {
        q.push(Item {
            id,
            labeled: id == 2,
            bytes: 20,
        });
    }
    let mut dropped = Vec::new();
    q.push_with(
        Item {
            id: 6,
            labeled: false,
            bytes: 50,
        },
        |d| dropped.push(d.id),
    );
    assert_eq!(
        dropped,
        [1, 3, 4],
        "three unlabeled of 20 bytes make room for 50"
    );
    assert_eq!(drain(&q), [2, 5, 6]);
    // Larger than the whole budget: refused outright, nothing else lost.
    let mut dropped = Vec::new();
    q.push(item(7, false));
    q.push_with(
        Item {
            id: 8,
            labeled: true,
            bytes: 101,
        },
        |d| dropped.push(d.id),
    );
    assert_eq!(dropped, [8]);
    assert_eq!(drain(&q), [7]);
}

#[test]
fn a_closed_queue_hands_out_what_it_holds_then_reports_the_end() {
    let q = BoundedQueue::new(4);
    q.push(item(1, false));
    q.close();
    let mut out = Vec::new();
    assert!(q.pop_batch(10, Duration::from_millis(10), &mut out));
    assert_eq!(out.len(), 1);
    assert!(!q.pop_batch(10, Duration::from_millis(10), &mut out));
}
