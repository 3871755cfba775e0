use super::*;
use crate::model::TokenRecord;
use crate::storage::Store;

/// A data dir with a database (one token), an artifact, a key file and a stray snapshot.
fn populated() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store
        .write(|t| {
            t.insert_token(&TokenRecord {
                name: "ci".into(),
                digest: [9; 32],
                role: crate::auth::Role::Operator,
                created_ms: 5,
                created_by: "bootstrap".into(),
            })
        })
        .unwrap();
    std::fs::create_dir_all(dir.path().join("artifacts")).unwrap();
    std::fs::write(dir.path().join("artifacts/abc"), vec![1u8; 70_000]).unwrap();
    crate::auth::write_private(&dir.path().join("rollback.key"), "secret").unwrap();
    std::fs::write(dir.path().join("backup-snapshot-1.redb"), b"old").unwrap();
    (dir, store)
}

fn archive_of(dir: &Path, store: &Store, out: &Path) -> Manifest {
    let snap = dir.join("backup-snapshot-2.redb");
    store.snapshot(&snap).unwrap();
    let m = write_archive(out, &snap, dir, Some("[mqtt]\nmax_connections = 7\n")).unwrap();
    std::fs::remove_file(snap).unwrap();
    m
}

#[test]
fn a_backup_restores_onto_a_fresh_data_dir() {
    let (dir, store) = populated();
    let out_dir = tempfile::tempdir().unwrap();
    let archive = out_dir.path().join("b.tar");
    let manifest = archive_of(dir.path(), &store, &archive);
    let names: Vec<&str> = manifest.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(
        names,
        [
            "data/fleetgate.redb",
            "data/artifacts/abc",
            "data/rollback.key",
            "config/fleetgate.toml"
        ]
    );

    let fresh = out_dir.path().join("restored");
    let config = out_dir.path().join("fleetgate.toml");
    let restored = restore(&archive, &fresh, Some(&config)).unwrap();
    assert_eq!(restored.manifest, manifest);
    assert_eq!(restored.config.as_deref(), Some(config.as_path()));
    assert_eq!(
        std::fs::read_to_string(&config).unwrap(),
        "[mqtt]\nmax_connections = 7\n"
    );
    assert_eq!(
        std::fs::read(fresh.join("artifacts/abc")).unwrap(),
        vec![1u8; 70_000]
    );
    assert_eq!(file_mode(&fresh.join("rollback.key")).unwrap(), 0o600);
    assert!(!fresh.join("backup-snapshot-1.redb").exists());
    let reopened = Store::open(&fresh).unwrap();
    let tokens = reopened.tokens().unwrap();
    assert_eq!(tokens.len(), 1);
    assert_eq!((tokens[0].name.as_str(), tokens[0].digest), ("ci", [9; 32]));
    drop(reopened);

    // Never over an existing database.
    let err = restore(&archive, &fresh, None).unwrap_err().to_string();
    assert_eq!(
        err,
        format!(
            "{} already holds a database; restore onto a fresh data dir",
            fresh.display()
        )
    );
}

#[test]
fn a_damaged_backup_is_refused_and_nothing_is_put_in_place() {
    let (dir, store) = populated();
    let out_dir = tempfile::tempdir().unwrap();
    let archive = out_dir.path().join("b.tar");
    archive_of(dir.path(), &store, &archive);
    let mut bytes = std::fs::read(&archive).unwrap();
    // Flip a byte inside the artifact's 70,000 ones.
    let at = bytes
        .windows(64)
        .position(|w| w.iter().all(|&b| b == 1))
        .unwrap()
        + 10;
    bytes[at] = 2;
    std::fs::write(&archive, &bytes).unwrap();
    let fresh = out_dir.path().join("restored");
    let err = restore(&archive, &fresh, None).unwrap_err().to_string();
    assert_eq!(
        err,
        format!(
            "{}: data/artifacts/abc does not match its digest in the manifest",
            archive.display()
        )
    );
    assert!(!fresh.join(DB_FILE).exists());
    assert!(!fresh.join("artifacts/abc").exists());
    // Files unpacked before the damaged one were removed again.
    assert!(files_under(&fresh).unwrap().is_empty());

    std::fs::write(&archive, b"not a tar at all, just some text").unwrap();
    assert!(restore(&archive, &fresh, None).is_err());
}

#[test]
fn an_entry_that_climbs_out_of_the_data_dir_is_refused() {
    let out_dir = tempfile::tempdir().unwrap();
    let archive = out_dir.path().join("evil.tar");
    let evil = b"x".to_vec();
    let manifest = Manifest {
        format: FORMAT,
        created_ms: 1,
        gateway_version: "0".into(),
        files: vec![FileEntry {
            path: "data/../../escape".into(),
            bytes: 1,
            sha256: sha256_hex(&evil),
        }],
    };
    let mut tar = tar::Builder::new(File::create(&archive).unwrap());
    append(
        &mut tar,
        MANIFEST,
        &serde_json::to_vec(&manifest).unwrap(),
        0o600,
    )
    .unwrap();
    let mut header = tar::Header::new_gnu();
    header.set_size(1);
    header.set_mode(0o600);
    // `append_data` refuses `..`; write the raw name as a hostile tool would.
    header.as_gnu_mut().unwrap().name[..17].copy_from_slice(b"data/../../escape");
    header.set_cksum();
    tar.append(&header, evil.as_slice()).unwrap();
    tar.into_inner().unwrap();
    let fresh = out_dir.path().join("d");
    let err = restore(&archive, &fresh, None).unwrap_err().to_string();
    assert!(
        err.ends_with("data/../../escape is not a plain relative path"),
        "{err}"
    );
    assert!(!out_dir.path().join("escape").exists());
}
