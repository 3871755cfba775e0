//! rumqttd's codec runs on bytes devices send, and hostile bytes can make it panic at will.
//! Sessions catch such a panic (a malformed packet, counted) and must not print it: every
//! one would be a stack of lines in the journal. Any other panic is still printed. Its own
//! test binary, because the panic hook is global to the process.

use std::sync::atomic::{AtomicUsize, Ordering};

static PRINTED: AtomicUsize = AtomicUsize::new(0);

#[test]
fn a_codec_panic_is_caught_silently_and_other_panics_are_printed() {
    std::panic::set_hook(Box::new(|_| {
        PRINTED.fetch_add(1, Ordering::SeqCst);
    }));
    for _ in 0..3 {
        let caught = fleetgate::broker::fuzzing::codec_guard(|| -> u8 { panic!("codec") });
        assert_eq!(caught, None);
    }
    assert_eq!(PRINTED.load(Ordering::SeqCst), 0);
    assert_eq!(fleetgate::broker::fuzzing::codec_guard(|| 7), Some(7));
    let elsewhere = std::panic::catch_unwind(|| panic!("a bug elsewhere"));
    assert!(elsewhere.is_err());
    assert_eq!(PRINTED.load(Ordering::SeqCst), 1);
}
