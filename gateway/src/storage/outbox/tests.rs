use super::*;
use crate::storage::{DB_FILE, StorageError};

const ROOMY: Limits = Limits {
    max_messages: 1000,
    max_bytes: 1 << 20,
};

fn push(store: &Store, stream: Stream, entries: &[&str], limits: Limits) -> Vec<u64> {
    store
        .write(|t| {
            entries
                .iter()
                .map(|e| t.outbox_push(stream, e.as_bytes(), limits))
                .collect()
        })
        .unwrap()
}

fn read_all(store: &Store, stream: Stream, after: u64) -> Vec<(u64, String)> {
    store
        .outbox_read(stream, after, usize::MAX, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|(seq, v)| (seq, String::from_utf8(v).unwrap()))
        .collect()
}

fn seqs(store: &Store, stream: Stream) -> Vec<u64> {
    read_all(store, stream, 0).iter().map(|(s, _)| *s).collect()
}

#[test]
fn entries_are_numbered_from_one_per_stream_and_read_in_order() {
    let store = Store::in_memory().unwrap();
    store
        .write(|t| t.outbox_destinations(Stream::Upstream, &["upstream"]))
        .unwrap();
    store
        .write(|t| t.outbox_destinations(Stream::Webhooks, &["ops"]))
        .unwrap();
    assert_eq!(
        push(&store, Stream::Upstream, &["a", "b", "c"], ROOMY),
        [1, 2, 3]
    );
    assert_eq!(push(&store, Stream::Webhooks, &["x"], ROOMY), [1]);
    assert_eq!(push(&store, Stream::Upstream, &["d"], ROOMY), [4]);
    assert_eq!(
        read_all(&store, Stream::Upstream, 1),
        [(2, "b".into()), (3, "c".into()), (4, "d".into())]
    );
    assert_eq!(read_all(&store, Stream::Webhooks, 0), [(1, "x".into())]);
    // Bounded reads: by count, and by bytes (but always at least one entry).
    let two = store
        .outbox_read(Stream::Upstream, 0, 2, usize::MAX)
        .unwrap();
    assert_eq!(two.iter().map(|e| e.0).collect::<Vec<_>>(), [1, 2]);
    let one = store.outbox_read(Stream::Upstream, 0, 10, 1).unwrap();
    assert_eq!(one.iter().map(|e| e.0).collect::<Vec<_>>(), [1]);
    let snap = store.outbox_snapshot(Stream::Upstream).unwrap();
    assert_eq!(
        snap.state,
        StreamState {
            head: 4,
            tail: 1,
            bytes: 4,
            dropped: 0
        }
    );
    assert_eq!(snap.cursor("upstream"), Some(0));
}

#[test]
fn a_full_stream_drops_its_oldest_entries_and_counts_them() {
    let store = Store::in_memory().unwrap();
    store
        .write(|t| t.outbox_destinations(Stream::Upstream, &["upstream"]))
        .unwrap();
    let by_count = Limits {
        max_messages: 3,
        max_bytes: 1 << 20,
    };
    push(
        &store,
        Stream::Upstream,
        &["1", "2", "3", "4", "5"],
        by_count,
    );
    assert_eq!(seqs(&store, Stream::Upstream), [3, 4, 5]);
    let s = store.outbox_snapshot(Stream::Upstream).unwrap().state;
    assert_eq!((s.head, s.tail, s.bytes, s.dropped), (5, 3, 3, 2));

    // By bytes: 10-byte entries under a 20-byte bound keep two.
    let by_bytes = Limits {
        max_messages: 100,
        max_bytes: 20,
    };
    push(
        &store,
        Stream::Upstream,
        &["aaaaaaaaaa", "bbbbbbbbbb"],
        by_bytes,
    );
    assert_eq!(seqs(&store, Stream::Upstream), [6, 7]);
    let s = store.outbox_snapshot(Stream::Upstream).unwrap().state;
    assert_eq!((s.head, s.tail, s.bytes, s.dropped), (7, 6, 20, 5));
    // An entry over the bound alone is kept (the newest always is).
    push(&store, Stream::Upstream, &[&"z".repeat(40)], by_bytes);
    assert_eq!(seqs(&store, Stream::Upstream), [8]);
    let s = store.outbox_snapshot(Stream::Upstream).unwrap().state;
    assert_eq!((s.tail, s.bytes, s.dropped), (8, 40, 7));
}

#[test]
fn the_cursor_moves_only_on_acknowledgements_and_only_forward() {
    let store = Store::in_memory().unwrap();
    store
        .write(|t| t.outbox_destinations(Stream::Webhooks, &["ops", "ml"]))
        .unwrap();
    push(&store, Stream::Webhooks, &["1", "2", "3", "4"], ROOMY);
    let commits = store.commits();
    // Reading is not acknowledging.
    assert_eq!(read_all(&store, Stream::Webhooks, 0).len(), 4);
    assert_eq!(store.commits(), commits);
    let snap = store.outbox_snapshot(Stream::Webhooks).unwrap();
    assert_eq!((snap.cursor("ops"), snap.cursor("ml")), (Some(0), Some(0)));

    // One destination acknowledges 3: nothing is removed while the other has not.
    store
        .write(|t| t.outbox_ack(Stream::Webhooks, "ops", 3))
        .unwrap();
    assert_eq!(seqs(&store, Stream::Webhooks), [1, 2, 3, 4]);
    // The other acknowledges 2: 1 and 2 go.
    store
        .write(|t| t.outbox_ack(Stream::Webhooks, "ml", 2))
        .unwrap();
    assert_eq!(seqs(&store, Stream::Webhooks), [3, 4]);
    // Going back, or acknowledging the same again, changes nothing and commits nothing.
    let commits = store.commits();
    store
        .write(|t| t.outbox_ack(Stream::Webhooks, "ops", 1))
        .unwrap();
    store
        .write(|t| t.outbox_ack(Stream::Webhooks, "ml", 2))
        .unwrap();
    // An unknown destination's acknowledgement changes nothing either.
    store
        .write(|t| t.outbox_ack(Stream::Webhooks, "gone", 4))
        .unwrap();
    assert_eq!(store.commits(), commits);
    let snap = store.outbox_snapshot(Stream::Webhooks).unwrap();
    assert_eq!((snap.cursor("ops"), snap.cursor("ml")), (Some(3), Some(2)));
    // Past the head is the head.
    store
        .write(|t| t.outbox_ack(Stream::Webhooks, "ops", 99))
        .unwrap();
    store
        .write(|t| t.outbox_ack(Stream::Webhooks, "ml", 4))
        .unwrap();
    let snap = store.outbox_snapshot(Stream::Webhooks).unwrap();
    assert_eq!(snap.cursor("ops"), Some(4));
    assert!(snap.state.is_empty());
    assert_eq!(
        (snap.state.head, snap.state.tail, snap.state.bytes),
        (4, 5, 0)
    );
    // Numbers never repeat, even with the stream empty.
    assert_eq!(push(&store, Stream::Webhooks, &["5"], ROOMY), [5]);
}

#[test]
fn destinations_join_at_the_oldest_entry_and_leave_without_holding_anything() {
    let store = Store::in_memory().unwrap();
    store
        .write(|t| t.outbox_destinations(Stream::Webhooks, &["ops"]))
        .unwrap();
    push(&store, Stream::Webhooks, &["1", "2", "3"], ROOMY);
    store
        .write(|t| t.outbox_ack(Stream::Webhooks, "ops", 1))
        .unwrap();
    // A new webhook gets what is still stored, from 2 on.
    store
        .write(|t| t.outbox_destinations(Stream::Webhooks, &["ops", "ml"]))
        .unwrap();
    assert_eq!(
        store
            .outbox_snapshot(Stream::Webhooks)
            .unwrap()
            .cursor("ml"),
        Some(1)
    );
    // "ops" removed from the config: "ml" alone decides what is kept.
    store
        .write(|t| t.outbox_destinations(Stream::Webhooks, &["ml"]))
        .unwrap();
    assert_eq!(seqs(&store, Stream::Webhooks), [2, 3]);
    store
        .write(|t| t.outbox_ack(Stream::Webhooks, "ml", 2))
        .unwrap();
    assert_eq!(seqs(&store, Stream::Webhooks), [3]);
    let snap = store.outbox_snapshot(Stream::Webhooks).unwrap();
    assert_eq!(snap.cursors, [("ml".to_owned(), 2)]);
    // No destination at all (webhooks turned off): the stream is emptied.
    store
        .write(|t| t.outbox_destinations(Stream::Webhooks, &[]))
        .unwrap();
    assert!(seqs(&store, Stream::Webhooks).is_empty());
    let s = store.outbox_snapshot(Stream::Webhooks).unwrap().state;
    assert_eq!((s.head, s.tail, s.bytes), (3, 4, 0));
    // Setting the same destinations again writes nothing.
    let commits = store.commits();
    store
        .write(|t| t.outbox_destinations(Stream::Webhooks, &[]))
        .unwrap();
    assert_eq!(store.commits(), commits);
}

#[test]
fn entries_cursors_and_numbers_survive_reopening_and_aborted_writes_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path()).unwrap();
        store
            .write(|t| t.outbox_destinations(Stream::Upstream, &["upstream"]))
            .unwrap();
        push(&store, Stream::Upstream, &["a", "b", "c"], ROOMY);
        store
            .write(|t| t.outbox_ack(Stream::Upstream, "upstream", 1))
            .unwrap();
        // A transaction that fails after pushing (a failed batch) leaves no entry and no number.
        let failed: Result<()> = store.write(|t| {
            t.outbox_push(Stream::Upstream, b"lost", ROOMY)?;
            Err(StorageError::Injected)
        });
        assert!(failed.is_err());
        store.fail_next_commits(1);
        assert!(
            store
                .write(|t| t.outbox_push(Stream::Upstream, b"lost too", ROOMY))
                .is_err()
        );
    }
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(
        read_all(&store, Stream::Upstream, 0),
        [(2, "b".into()), (3, "c".into())]
    );
    let snap = store.outbox_snapshot(Stream::Upstream).unwrap();
    assert_eq!(snap.cursor("upstream"), Some(1));
    assert_eq!(push(&store, Stream::Upstream, &["d"], ROOMY), [4]);
}

#[test]
fn a_backup_snapshot_holds_the_outbox() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("a")).unwrap();
    store
        .write(|t| t.outbox_destinations(Stream::Upstream, &["upstream"]))
        .unwrap();
    push(&store, Stream::Upstream, &["a", "b"], ROOMY);
    let copy_dir = dir.path().join("b");
    std::fs::create_dir_all(&copy_dir).unwrap();
    store.snapshot(&copy_dir.join(DB_FILE)).unwrap();
    let copy = Store::open(&copy_dir).unwrap();
    assert_eq!(seqs(&copy, Stream::Upstream), [1, 2]);
    assert_eq!(
        copy.outbox_snapshot(Stream::Upstream).unwrap(),
        store.outbox_snapshot(Stream::Upstream).unwrap()
    );
}
