use std::collections::VecDeque;
use std::sync::Arc;

use super::*;

fn msg(device: &str, payload: usize) -> UplinkMsg {
    UplinkMsg {
        device: device.to_owned(),
        session: 1,
        channel: Uplink::Telemetry,
        encoding: Encoding::Json,
        payload: Bytes::from(vec![b'x'; payload]),
        telemetry: None,
        received_us: 0,
        receipt: None,
        room: None,
        rejected: 0,
    }
}

#[test]
fn receipts_report_commits_and_refusals_in_order() {
    let r = Receipts::default();
    assert_eq!(r.upto(), 0);
    r.refuse(2, Refusal::Invalid);
    r.refuse(5, Refusal::Unknown);
    r.committed(3);
    r.committed(1);
    assert_eq!(r.upto(), 3, "the watermark never goes back");
    let mut refused = VecDeque::new();
    r.take_refused(r.upto(), &mut refused);
    assert_eq!(refused, [(2, Refusal::Invalid)]);
    r.committed(5);
    r.take_refused(r.upto(), &mut refused);
    assert_eq!(refused, [(2, Refusal::Invalid), (5, Refusal::Unknown)]);
    assert!(!r.is_failed());
    r.failed();
    assert!(r.is_failed());
}

#[tokio::test]
async fn a_commit_wakes_the_waiting_session() {
    let r = Arc::new(Receipts::default());
    let waiter = {
        let r = r.clone();
        tokio::spawn(async move {
            r.changed().await;
            r.upto()
        })
    };
    r.committed(7);
    assert_eq!(waiter.await.unwrap(), 7);
}

#[tokio::test]
async fn the_queue_is_bounded_in_bytes_and_frees_them_when_the_writer_is_done() {
    let (tx, rx) = flume::bounded(100);
    // Room for two 200-byte messages (each also costs its device id and overhead).
    let per = 200 + 2 + MESSAGE_OVERHEAD;
    let q = Uplinks::new(tx, 2 * per + 10);
    q.try_send(msg("d1", 200)).unwrap();
    q.try_send(msg("d1", 200)).unwrap();
    assert_eq!(q.bytes_used(), 2 * per);
    let Err(QueueError::Full(back)) = q.try_send(msg("d1", 200)) else {
        panic!("a third message fits no more");
    };
    assert!(back.room.is_none(), "a refused message holds no room");
    // A waiting send goes in once the writer has dropped one.
    let waiting = {
        let q = q.clone();
        tokio::spawn(async move { q.send(*back).await })
    };
    tokio::task::yield_now().await;
    assert!(!waiting.is_finished());
    let first = rx.recv_async().await.unwrap();
    drop(first);
    waiting.await.unwrap().unwrap();
    assert_eq!(q.bytes_used(), 2 * per);
    assert_eq!(rx.len(), 2);
}

#[test]
fn the_queue_is_bounded_in_messages_too() {
    let (tx, rx) = flume::bounded(1);
    let q = Uplinks::new(tx, 1 << 20);
    q.try_send(msg("d1", 10)).unwrap();
    assert!(matches!(
        q.try_send(msg("d1", 10)),
        Err(QueueError::Full(_))
    ));
    assert_eq!(
        q.bytes_used(),
        10 + 2 + MESSAGE_OVERHEAD,
        "the refused one gave its bytes back"
    );
    drop(rx);
    assert!(matches!(q.try_send(msg("d1", 10)), Err(QueueError::Closed)));
}

#[test]
fn a_message_larger_than_the_budget_takes_all_of_it() {
    let (tx, _rx) = flume::bounded(10);
    let q = Uplinks::new(tx, 1000);
    q.try_send(msg("d1", 5000)).unwrap();
    assert_eq!(q.bytes_used(), 1000);
    assert!(matches!(q.try_send(msg("d1", 1)), Err(QueueError::Full(_))));
}

#[test]
fn a_message_the_session_decoded_holds_its_decoded_size_of_the_budget() {
    let (tx, _rx) = flume::bounded(10);
    let q = Uplinks::new(tx, 1 << 20);
    let sample = InputSample {
        values: vec![0.5; 100],
        prediction: None,
        confidence: None,
    };
    let t = Telemetry {
        boot: 0,
        seq: 1,
        time_ms: 0,
        hw: Default::default(),
        model: None,
        samples: vec![sample; 10],
        bins: Vec::new(),
    };
    let decoded = decoded_bytes(&t);
    // Ten samples of 100 values each, on the heap, and the vector holding them.
    let heap = 10 * 100 * 4 + 10 * size_of::<InputSample>();
    assert_eq!(decoded, size_of::<Telemetry>() + heap);
    let mut m = msg("d1", 0);
    m.telemetry = Some(Box::new(t));
    q.try_send(m).unwrap();
    assert_eq!(q.bytes_used(), 2 + MESSAGE_OVERHEAD + decoded);
}
