//! The registry's unit tests: parking, waking, deadlines, the cap and resident waiters,
//! with the time passed in.

use super::*;
use std::time::Duration;
use uuid::Uuid;

fn event(seq: u64, ts: u64, name: Option<&str>) -> Arc<Event> {
    Arc::new(Event {
        seq,
        ts,
        id: Uuid::new_v4(),
        name: name.map(Into::into),
        data: "{}".into(),
    })
}

fn wait(reply: u32, filter: Option<&str>, deadline: Instant) -> Wait<u32> {
    Wait {
        reply,
        filter: filter.map(Into::into),
        limit: 10,
        deadline,
    }
}

#[test]
fn publish_wakes_parked_waiters_once() {
    let reg = Registry::new(100, 8);
    let later = Instant::now() + Duration::from_secs(60);
    assert!(matches!(
        reg.poll("c", &Start::Now, wait(1, None, later)),
        Poll::Unknown(1)
    ));
    assert!(matches!(
        reg.park_after("c", 0, wait(1, None, later)),
        Poll::Parked { earliest: true, .. }
    ));
    assert!(matches!(
        reg.poll("c", &Start::Now, wait(2, None, later)),
        Poll::Parked {
            earliest: false,
            ..
        }
    ));
    let woken = reg
        .publish("c", &[event(1, 5, None), event(2, 5, None)], |_| None)
        .unwrap();
    assert_eq!(woken.len(), 1, "same cursor, same answer: one group");
    assert_eq!(woken[0].replies, vec![1, 2]);
    assert_eq!(woken[0].events.len(), 2);
    assert_eq!(reg.parked(), 0);
    assert!(
        reg.publish("c", &[event(3, 6, None)], |_| None)
            .unwrap()
            .is_empty()
    );
}

#[test]
fn a_resident_waiter_stays_parked_past_each_wake_up() {
    let (reg, later) = (
        Registry::new(100, 8),
        Instant::now() + Duration::from_secs(60),
    );
    let parked = reg.park_after("c", 0, wait(1, None, later));
    assert!(matches!(parked, Poll::Parked { cursor: 0, .. }));
    // Reply 1 is resident: its handle (101) is woken, and it stays parked.
    let resident = |r: &u32| (*r == 1).then_some(r + 100);
    let woken = reg.publish("c", &[event(1, 5, None)], resident).unwrap();
    assert_eq!(woken[0].replies, vec![101]);
    assert_eq!(reg.parked(), 1);
    let woken = reg
        .publish("c", &[event(2, 6, None), event(3, 6, None)], resident)
        .unwrap();
    let seqs: Vec<u64> = woken[0].events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [2, 3], "each wake-up after the one before");
    assert_eq!(reg.expire(later), vec![1], "it leaves at its deadline");
}

#[test]
fn park_after_sees_events_registered_since_the_read() {
    let reg = Registry::new(100, 8);
    let later = Instant::now() + Duration::from_secs(60);
    reg.publish("c", &[event(1, 5, None)], |_| None).unwrap();
    match reg.park_after("c", 0, wait(1, None, later)) {
        Poll::Ready(1, events) => assert_eq!(events[0].seq, 1),
        _ => panic!("an event registered after the read must answer at once"),
    }
}

#[test]
fn filters_keep_waiting_past_other_names() {
    let reg = Registry::new(100, 8);
    let later = Instant::now() + Duration::from_secs(60);
    assert!(matches!(
        reg.park_after("s", 0, wait(7, Some("A"), later)),
        Poll::Parked { .. }
    ));
    assert!(
        reg.publish("s", &[event(1, 1, Some("B"))], |_| None)
            .unwrap()
            .is_empty()
    );
    let woken = reg
        .publish("s", &[event(2, 2, Some("A"))], |_| None)
        .unwrap();
    assert_eq!(woken[0].replies, vec![7]);
    assert_eq!(woken[0].events[0].seq, 2);
}

#[test]
fn expire_and_drain_answer_each_reply_once() {
    let reg = Registry::new(100, 8);
    let now = Instant::now();
    reg.park_after("a", 0, wait(1, None, now + Duration::from_secs(1)));
    reg.park_after("a", 0, wait(2, None, now + Duration::from_secs(5)));
    assert_eq!(reg.next_deadline(), Some(now + Duration::from_secs(1)));
    assert_eq!(reg.expire(now + Duration::from_secs(2)), vec![1]);
    assert_eq!(reg.close(), vec![2]);
    assert!(matches!(
        reg.park_after("a", 0, wait(3, None, now)),
        Poll::Closed(3)
    ));
    assert!(reg.expire(now + Duration::from_secs(10)).is_empty());
    assert_eq!(reg.parked(), 0);
}

#[test]
fn cap_refuses_extra_waiters() {
    let reg = Registry::new(1, 8);
    let later = Instant::now() + Duration::from_secs(60);
    assert!(matches!(
        reg.park_after("a", 0, wait(1, None, later)),
        Poll::Parked { .. }
    ));
    assert!(matches!(
        reg.park_after("a", 0, wait(2, None, later)),
        Poll::Full(2)
    ));
}

#[test]
fn resume_ahead_of_memory_is_not_delivered_twice() {
    // A client read event 4 from the store before the writer registered it here, then
    // resumed from it: memory must not guess a cursor that would deliver 4 again.
    let reg = Registry::new(100, 8);
    let later = Instant::now() + Duration::from_secs(60);
    reg.publish(
        "c",
        &[
            event(1, 100, None),
            event(2, 105, None),
            event(3, 110, None),
        ],
        |_| None,
    )
    .unwrap();
    let fourth = event(4, 115, None);
    let start = Start::Since {
        ms: 115,
        last_id: Some(fourth.id),
    };
    let Poll::Unknown(reply) = reg.poll("c", &start, wait(1, None, later)) else {
        panic!("memory cannot resolve a last_id it has not seen");
    };
    // The store resolves the cursor to 4; the client parks after it.
    assert!(matches!(
        reg.park_after("c", 4, wait(reply, None, later)),
        Poll::Parked { .. }
    ));
    assert!(
        reg.publish("c", &[fourth], |_| None).unwrap().is_empty(),
        "event 4 was already delivered"
    );
}

#[test]
fn since_resolves_from_the_tail() {
    let reg: Registry<u32> = Registry::new(100, 8);
    let e = [
        event(1, 10, None),
        event(2, 20, None),
        event(3, 20, None),
        event(4, 30, None),
    ];
    reg.publish("c", &e, |_| None).unwrap();
    let inner = reg.lock();
    let cat = inner.categories.get("c").unwrap();
    assert_eq!(resolve_in_tail(cat, 20, None), Some(3));
    assert_eq!(resolve_in_tail(cat, 20, Some(&e[1].id)), Some(2));
    assert_eq!(resolve_in_tail(cat, 20, Some(&Uuid::new_v4())), Some(1));
    assert_eq!(resolve_in_tail(cat, 10, None), Some(1));
    assert_eq!(
        resolve_in_tail(cat, 5, None),
        Some(0),
        "the tail starts at the first event"
    );
    assert_eq!(
        resolve_in_tail(cat, 99, None),
        None,
        "a client ahead of memory may have seen unregistered events"
    );
    assert_eq!(resolve_in_tail(cat, 30, Some(&Uuid::new_v4())), None);
    drop(inner);
    let late = [event(9, 50, None), event(10, 60, None)];
    reg.publish("d", &late, |_| None).unwrap();
    let inner = reg.lock();
    let cat = inner.categories.get("d").unwrap();
    assert_eq!(
        resolve_in_tail(cat, 40, None),
        None,
        "older events may exist on disk"
    );
    assert_eq!(resolve_in_tail(cat, 50, None), Some(9));
}

#[test]
fn take_where_takes_only_the_matching_replies() {
    let reg = Registry::new(100, 8);
    let later = Instant::now() + Duration::from_secs(60);
    for reply in 1..=4 {
        reg.park_after("a", 0, wait(reply, None, later));
    }
    assert!(reg.any(|r| *r == 2));
    assert!(!reg.any(|r| *r > 4));
    let mut taken = reg.take_where(|r| r % 2 == 0);
    taken.sort_unstable();
    assert_eq!(taken, vec![2, 4]);
    assert!(!reg.any(|r| r % 2 == 0));
    let woken = reg.publish("a", &[event(1, 1, None)], |_| None).unwrap();
    let mut rest = woken[0].replies.clone();
    rest.sort_unstable();
    assert_eq!(
        rest,
        vec![1, 3],
        "the others are still parked, and only they"
    );
    assert_eq!(reg.next_deadline(), None);
}

#[test]
fn events_already_registered_are_skipped_and_a_gap_is_refused() {
    let reg = Registry::new(100, 8);
    let later = Instant::now() + Duration::from_secs(60);
    reg.publish("c", &[event(1, 5, None), event(2, 5, None)], |_| None)
        .unwrap();
    reg.park_after("c", 2, wait(1, None, later));
    // Another node committed 3 and 4: this node's 5 must not be delivered before them.
    assert!(reg.publish("c", &[event(5, 9, None)], |_| None).is_none());
    assert_eq!(reg.parked(), 1, "nothing was delivered past the gap");
    let woken = reg
        .publish("c", &[event(2, 5, None), event(3, 6, None)], |_| None)
        .unwrap();
    let seqs: Vec<u64> = woken[0].events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [3], "event 2 was registered already");
}

#[cfg(feature = "postgres")]
#[test]
fn an_announcement_past_memory_sends_waiters_to_the_store_and_others_to_it() {
    let reg = Registry::new(100, 8);
    let later = Instant::now() + Duration::from_secs(60);
    reg.publish("idle", &[event(1, 5, None)], |_| None).unwrap();
    assert_eq!(reg.announce("idle", 1), None, "nothing new");
    assert_eq!(reg.announce("idle", 3), None, "nobody waits");
    let Poll::Unknown(reply) = reg.poll("idle", &Start::After(1), wait(1, None, later)) else {
        panic!("memory no longer reaches the head: the store must answer");
    };
    assert!(matches!(
        reg.park_after("idle", 1, wait(reply, None, later)),
        Poll::Unknown(_)
    ));
    assert_eq!(reg.announce("new", 7), None);
    assert!(matches!(
        reg.park_after("new", 6, wait(2, None, later)),
        Poll::Unknown(_)
    ));
    reg.park_after("busy", 4, wait(3, None, later));
    assert_eq!(
        reg.announce("busy", 6),
        Some(4),
        "read after 4, then publish"
    );
}
