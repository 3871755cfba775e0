//! Every protocol message in both encodings, as the gateway's ingest and a device's command
//! handler decode them: decoding never panics, and what decodes survives re-encoding (see
//! `round_trip`). A decoded chunk is also fed to a download of the fixture artifact: it may
//! only be stored if it is the genuine chunk.

#![no_main]

use fleetgate_fuzz::{MESSAGE_CHANNELS, fixture, round_trip, split};
use fleetgate_protocol::update::{Accepted, Download};
use fleetgate_protocol::{
    Alert, Chunk, Command, CommandAck, Hello, LogLine, Telemetry, UpdateReport,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((choice, encoding, payload)) = split(data) else {
        return;
    };
    match usize::from(choice) % MESSAGE_CHANNELS.len() {
        0 => drop(round_trip::<Hello>(payload, encoding)),
        1 => drop(round_trip::<Telemetry>(payload, encoding)),
        2 => drop(round_trip::<Alert>(payload, encoding)),
        3 => drop(round_trip::<LogLine>(payload, encoding)),
        4 => drop(round_trip::<CommandAck>(payload, encoding)),
        5 => drop(round_trip::<UpdateReport>(payload, encoding)),
        6 => drop(round_trip::<Command>(payload, encoding)),
        _ => {
            if let Some(chunk) = round_trip::<Chunk>(payload, encoding) {
                download(&chunk);
            }
        }
    }
});

/// Offers `chunk` to a download of the fixture that has stored every chunk before it.
fn download(chunk: &Chunk) {
    let f = fixture();
    let index = chunk.index as usize;
    let stored = f.chunks.iter().take(index).map(Vec::as_slice);
    let mut d = Download::restore(f.manifest.clone(), stored);
    let accepted = d.accept(u64::from(chunk.index), &chunk.data, &chunk.proof);
    if accepted == Ok(Accepted::Stored) {
        assert_eq!(chunk.data, f.chunks[index], "a forged chunk was stored");
    }
}
