use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use super::*;
use crate::codec::{Encoding, decode, encode};
use crate::{HardwareProfile, Installed};

pub(crate) fn spec() -> ManifestSpec {
    ManifestSpec {
        kind: ArtifactKind::Model,
        name: "kws".into(),
        version: Version::new(2, 1, 0),
        release: 9,
        compat: Compat {
            classes: vec!["nrf53".into()],
            arch: Some("armv7em".into()),
            min_ram_bytes: 65536,
            min_flash_bytes: 0,
            runtime: Some(RuntimeReq {
                name: "tflm".into(),
                min_version: Version::new(2, 14, 0),
            }),
        },
        chunk_size: 256,
        created_ms: 1000,
        expires_ms: 2000,
    }
}

fn hex(bytes: &[u8]) -> String {
    use core::fmt::Write;
    let mut s = String::new();
    for b in bytes {
        write!(s, "{b:02x}").unwrap();
    }
    s
}

/// Pins the signed bytes of a manifest: devices verify signatures over exactly these bytes,
/// and the pinned SHA-256 and Merkle root pin the chunk tree construction too.
#[test]
fn manifest_golden_bytes() {
    let artifact: Vec<u8> = (0..600u32).map(|i| i as u8).collect();
    let m = Manifest::build(spec(), &artifact);
    assert_eq!(m.chunk_count(), 3);
    let bytes = encode(&m, Encoding::Postcard).unwrap();
    // 01 format; 00 Model; 03 "kws"; 05 "2.1.0"; 09 release; compat: 01 class 05 "nrf53",
    // 01 Some 07 "armv7em", 808004 ram 65536, 00 flash, 01 Some 04 "tflm" 06 "2.14.0";
    // d804 size 600; 20 + SHA-256 of bytes 0..600; 8002 chunk 256; 20 + Merkle root; e807 created
    // 1000; d00f expires 2000. The SHA-256 and root were checked against hashlib in Python
    // (RFC 6962 tree, leaf 0x00 || chunk, node 0x01 || left || right).
    assert_eq!(
        hex(&bytes),
        "0100036b777305322e312e300901056e72663533010761726d7637656d80800400010474666c6d06322e31\
         342e30d80420e3c840fb061ad02852c9c4f8e65f796b4fd684d15a38e198a5ca8f7067b2d48d800220d9d9\
         b160296b000a4ba9708246df484f3f3d257e3833db4fd5f5d2359716b94ae807d00f"
    );
    let back: Manifest = decode(&bytes, Encoding::Postcard).unwrap();
    assert_eq!(back, m);
}

#[test]
fn chunk_lengths_cover_the_artifact() {
    let m = Manifest::build(spec(), &[7u8; 600]);
    assert_eq!(
        (
            m.chunk_len(0),
            m.chunk_len(1),
            m.chunk_len(2),
            m.chunk_len(3)
        ),
        (256, 256, 88, 0)
    );
    let exact = Manifest::build(spec(), &[7u8; 512]);
    assert_eq!((exact.chunk_count(), exact.chunk_len(1)), (2, 256));
    let empty = Manifest::build(spec(), &[]);
    assert_eq!(empty.chunk_count(), 0);
}

fn hw(class: &str, ram: u64, runtime: Option<(&str, &str)>) -> HardwareProfile {
    HardwareProfile {
        arch: "armv7em".into(),
        class: class.into(),
        ram_bytes: ram,
        flash_bytes: 1 << 20,
        accelerator: None,
        runtime: runtime.map(|(n, v)| Installed {
            name: n.into(),
            version: Version::parse(v).unwrap(),
            release: 0,
        }),
    }
}

#[test]
fn compatibility_rules() {
    let c = spec().compat;
    let cases: &[(HardwareProfile, Result<(), Mismatch>)] = &[
        (hw("nrf53", 65536, Some(("tflm", "2.14.0"))), Ok(())),
        (hw("nrf53", 65536, Some(("tflm", "2.15.1"))), Ok(())),
        (
            hw("esp32", 65536, Some(("tflm", "2.14.0"))),
            Err(Mismatch::Class),
        ),
        (
            hw("nrf53", 1024, Some(("tflm", "2.14.0"))),
            Err(Mismatch::Ram),
        ),
        (
            hw("nrf53", 65536, Some(("tflm", "2.13.0"))),
            Err(Mismatch::Runtime),
        ),
        (
            hw("nrf53", 65536, Some(("onnx", "9.0.0"))),
            Err(Mismatch::Runtime),
        ),
        (hw("nrf53", 65536, None), Err(Mismatch::Runtime)),
    ];
    for (hw, want) in cases {
        assert_eq!(c.check(hw), *want, "{hw:?}");
    }
    let mut other_arch = hw("nrf53", 65536, Some(("tflm", "2.14.0")));
    other_arch.arch = "riscv32".into();
    assert_eq!(c.check(&other_arch), Err(Mismatch::Arch));
    assert_eq!(
        Compat::default().check(&other_arch),
        Ok(()),
        "empty compat accepts any device"
    );
}

#[test]
fn validation_bounds_chunk_size_and_times() {
    let mut m = Manifest::build(spec(), &[0u8; 10]);
    m.validate().unwrap();
    m.chunk_size = 100;
    assert_eq!(m.validate().unwrap_err().field, "chunk_size");
    m.chunk_size = 256;
    m.expires_ms = m.created_ms;
    assert_eq!(m.validate().unwrap_err().field, "expires_ms");
}
