//! rumqttd on its own, with a plain anonymous MQTT 3.1.1 listener: the baseline that
//! `bench/compare.sh` and `bench/ingest.sh` run the same load against (no authentication, no
//! topic policy, no decoding, no storage). Its router log is the size of the gateway's ingest
//! log before uplinks left the router (issue 11): a subscriber that falls behind it loses what
//! the broker already acknowledged, which the benchmarks count.
//!
//! Usage: `cargo run --release -p fleetgate --example bare-rumqttd -- [LISTEN] [MAX_CONNECTIONS]`
//! (defaults `127.0.0.1:1883` and 20000). Runs until killed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::ExitCode;

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

/// The gateway's former default ingest log (`mqtt.router.ingest_segment_*`, 4 MiB x 3).
const SEGMENT_BYTES: usize = 4 * 1024 * 1024;
const SEGMENT_COUNT: usize = 3;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let listen: SocketAddr = match args.next().as_deref().unwrap_or("127.0.0.1:1883").parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bare-rumqttd: LISTEN must be an address such as 127.0.0.1:1883: {e}");
            return ExitCode::from(64);
        }
    };
    let max_connections: usize = match args.next().as_deref().unwrap_or("20000").parse() {
        Ok(n) if n > 0 => n,
        _ => {
            eprintln!("bare-rumqttd: MAX_CONNECTIONS must be a positive integer");
            return ExitCode::from(64);
        }
    };
    let server = ServerSettings {
        name: "v4".to_owned(),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections: ConnectionSettings {
            connection_timeout_ms: 10_000,
            max_payload_size: 256 * 1024,
            max_inflight_count: 256,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = Config {
        router: RouterConfig {
            max_connections,
            max_outgoing_packet_count: 200,
            max_segment_size: SEGMENT_BYTES,
            max_segment_count: SEGMENT_COUNT,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("v4".to_owned(), server)])),
        ..Config::default()
    };
    eprintln!("bare-rumqttd: listening on {listen}, at most {max_connections} connections");
    match Broker::new(config).start() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bare-rumqttd: {e}");
            ExitCode::FAILURE
        }
    }
}
