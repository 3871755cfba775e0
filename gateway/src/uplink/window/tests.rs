use super::*;

/// Requests entries `seqs` and lets the client number them from `first_pkid` on.
fn sent(w: &mut Window, seqs: &[Option<u64>], first_pkid: u16) {
    for (i, s) in seqs.iter().enumerate() {
        w.request(*s);
        w.published(first_pkid + i as u16).unwrap();
    }
}

#[test]
fn in_order_acknowledgements_move_the_cursor_one_by_one() {
    let mut w = Window::new(10);
    sent(&mut w, &[Some(11), Some(12), Some(13)], 1);
    assert_eq!((w.acked(), w.requested(), w.pending()), (10, 13, 3));
    assert_eq!(w.puback(1), Ok(Some(11)));
    assert_eq!(w.puback(2), Ok(Some(12)));
    assert_eq!(w.puback(3), Ok(Some(13)));
    assert_eq!((w.acked(), w.pending(), w.waiting()), (13, 0, 0));
}

#[test]
fn an_out_of_order_acknowledgement_holds_the_cursor_until_the_gap_closes() {
    let mut w = Window::new(0);
    sent(&mut w, &[Some(1), Some(2), Some(3)], 1);
    assert_eq!(w.puback(3), Ok(None));
    assert_eq!(w.puback(2), Ok(None));
    assert_eq!(w.acked(), 0);
    assert_eq!(w.pending(), 1);
    assert_eq!(w.puback(1), Ok(Some(3)));
}

#[test]
fn status_and_heartbeat_publishes_share_the_numbering_but_not_the_cursor() {
    let mut w = Window::new(0);
    w.request(None);
    w.request(Some(1));
    w.request(None);
    w.request(Some(2));
    for pkid in 1..=4 {
        w.published(pkid).unwrap();
    }
    assert_eq!(w.pending(), 2);
    assert_eq!(w.waiting(), 4);
    // Entry 1 (packet 2) acknowledged while the status (packet 1) is not: held.
    assert_eq!(w.puback(2), Ok(None));
    assert_eq!(w.puback(1), Ok(Some(1)));
    assert_eq!(w.puback(4), Ok(None));
    assert_eq!(w.puback(3), Ok(Some(2)));
    assert_eq!(w.waiting(), 0);
}

#[test]
fn a_packet_id_is_reused_once_acknowledged() {
    let mut w = Window::new(0);
    // Packet id 1 is acknowledged and given again while entry 2 (packet 2) still waits.
    sent(&mut w, &[Some(1), Some(2)], 1);
    assert_eq!(w.puback(1), Ok(Some(1)));
    w.request(Some(3));
    w.published(1).unwrap();
    assert_eq!(w.puback(1), Ok(None));
    assert_eq!(w.puback(2), Ok(Some(3)));
    // A second PUBACK of the same packet id finds nothing waiting.
    assert_eq!(w.puback(1), Err(WindowError::UnknownPuback(1)));
}

#[test]
fn gaps_from_dropped_entries_are_skipped() {
    // Entries 5 to 9 were dropped from a full outbox before they were sent.
    let mut w = Window::new(4);
    sent(&mut w, &[Some(10), Some(11)], 7);
    assert_eq!(w.puback(7), Ok(Some(10)));
    assert_eq!(w.puback(8), Ok(Some(11)));
}

#[test]
fn reports_without_a_request_are_errors_not_panics() {
    let mut w = Window::new(0);
    assert_eq!(w.published(3), Err(WindowError::UnexpectedPublish(3)));
    assert_eq!(w.puback(3), Err(WindowError::UnknownPuback(3)));
    w.request(Some(1));
    // Acknowledged before the client reported its packet id: not this request's.
    assert_eq!(w.puback(1), Err(WindowError::UnknownPuback(1)));
    assert_eq!((w.acked(), w.pending()), (0, 1));
}
