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
    let m = write_archive(out, &snap, dir, Some("[mqtt]\nmax_connections = 7\n"), None).unwrap();
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
    let restored = restore(
        &archive,
        &fresh,
        &RestoreOptions {
            config_out: Some(&config),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(restored.manifest, manifest);
    assert_eq!(restored.config.as_deref(), Some(config.as_path()));
    assert_eq!(
        std::fs::read_to_string(&config).unwrap(),
        format!(
            "[mqtt]\nmax_connections = 7\n\n[storage]\ndata_dir = \"{}\"\n",
            fresh.display()
        )
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
    let err = restore(&archive, &fresh, &RestoreOptions::default())
        .unwrap_err()
        .to_string();
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
    let err = restore(&archive, &fresh, &RestoreOptions::default())
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        format!(
            "{}: data/artifacts/abc does not match its digest in the manifest",
            archive.display()
        )
    );
    // Files unpacked before the damaged one were removed again, the staging dir too.
    assert!(!fresh.exists());
    assert_eq!(leftovers(out_dir.path()), ["b.tar"]);

    std::fs::write(&archive, b"not a tar at all, just some text").unwrap();
    assert!(restore(&archive, &fresh, &RestoreOptions::default()).is_err());
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
    let err = restore(&archive, &fresh, &RestoreOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.ends_with("data/../../escape is not a plain relative path"),
        "{err}"
    );
    assert!(!out_dir.path().join("escape").exists());
}

/// The names in `dir`, sorted.
fn leftovers(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The config could not be written after the data was: the data stayed in place and a second
/// try was refused ("already holds a database"). Now nothing is left, and the retry works.
#[test]
fn a_failed_restore_leaves_nothing_behind_and_can_be_run_again() {
    let (dir, store) = populated();
    let out_dir = tempfile::tempdir().unwrap();
    let archive = out_dir.path().join("b.tar");
    archive_of(dir.path(), &store, &archive);
    let fresh = out_dir.path().join("restored");
    let nowhere = out_dir.path().join("no-such-dir/fleetgate.toml");
    let options = RestoreOptions {
        config_out: Some(&nowhere),
        ..Default::default()
    };
    let err = restore(&archive, &fresh, &options).unwrap_err().to_string();
    assert!(err.contains("no-such-dir"), "{err}");
    assert!(!fresh.exists());
    assert_eq!(leftovers(out_dir.path()), ["b.tar"]);

    // An empty data dir that already exists (as the package makes it) is filled in place.
    std::fs::create_dir(&fresh).unwrap();
    let config = out_dir.path().join("fleetgate.toml");
    let options = RestoreOptions {
        config_out: Some(&config),
        ..Default::default()
    };
    restore(&archive, &fresh, &options).unwrap();
    assert_eq!(
        leftovers(&fresh),
        ["artifacts", "fleetgate.redb", "rollback.key"]
    );
    assert_eq!(
        leftovers(out_dir.path()),
        ["b.tar", "fleetgate.toml", "restored"]
    );

    // A data dir holding anything else is not touched.
    let other = out_dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("notes.txt"), "mine").unwrap();
    let err = restore(&archive, &other, &RestoreOptions::default())
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        format!(
            "{} is not empty; restore onto a new or empty data dir",
            other.display()
        )
    );
    assert_eq!(leftovers(&other), ["notes.txt"]);
}

/// An archive with `manifest` first and then `entries` (name, type, link target, bytes),
/// written as a hostile tool would.
fn crafted(path: &Path, manifest: &Manifest, entries: &[(&str, tar::EntryType, &str, &[u8])]) {
    let mut tar = tar::Builder::new(File::create(path).unwrap());
    append(
        &mut tar,
        MANIFEST,
        &serde_json::to_vec(manifest).unwrap(),
        0o600,
    )
    .unwrap();
    for (name, kind, link, bytes) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(*kind);
        header.set_size(bytes.len() as u64);
        header.set_mode(0o600);
        header.set_path(name).unwrap();
        if !link.is_empty() {
            header.set_link_name(link).unwrap();
        }
        header.set_cksum();
        tar.append(&header, *bytes).unwrap();
    }
    tar.into_inner().unwrap();
}

#[test]
fn links_and_other_non_regular_entries_are_refused() {
    let out_dir = tempfile::tempdir().unwrap();
    for (kind, link) in [
        (tar::EntryType::Link, "data/fleetgate.redb"),
        (tar::EntryType::Link, "/etc/passwd"),
        (tar::EntryType::Symlink, "/etc/passwd"),
        (tar::EntryType::Directory, ""),
    ] {
        // A hard link has no content of its own: its digest is the empty file's.
        let manifest = Manifest {
            format: FORMAT,
            created_ms: 1,
            gateway_version: "0".into(),
            files: vec![FileEntry {
                path: "data/api-token".into(),
                bytes: 0,
                sha256: sha256_hex(b""),
            }],
        };
        let archive = out_dir.path().join("evil.tar");
        crafted(&archive, &manifest, &[("data/api-token", kind, link, b"")]);
        let fresh = out_dir.path().join("d");
        let err = restore(&archive, &fresh, &RestoreOptions::default())
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            format!(
                "{}: data/api-token is a {kind:?} entry; a backup holds regular files only",
                archive.display()
            ),
            "{kind:?}"
        );
        assert!(!fresh.exists());
    }
}

#[test]
fn a_signed_manifest_proves_the_archive_unchanged() {
    let (dir, store) = populated();
    let out_dir = tempfile::tempdir().unwrap();
    let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
    let public = key.verifying_key().to_bytes();
    let archive = out_dir.path().join("signed.tar");
    let snap = dir.path().join("backup-snapshot-9.redb");
    store.snapshot(&snap).unwrap();
    write_archive(&archive, &snap, dir.path(), None, Some(&key)).unwrap();
    let unsigned = out_dir.path().join("unsigned.tar");
    write_archive(&unsigned, &snap, dir.path(), None, None).unwrap();

    let trusting = |k: [u8; 32]| RestoreOptions {
        trusted_key: Some(k),
        ..Default::default()
    };
    let fresh = out_dir.path().join("a");
    let restored = restore(&archive, &fresh, &trusting(public)).unwrap();
    assert_eq!(restored.verified_by, Some(public));

    // The wrong key, no signature, a changed manifest: refused before anything is unpacked.
    let other = ed25519_dalek::SigningKey::from_bytes(&[4; 32])
        .verifying_key()
        .to_bytes();
    let mut changed = std::fs::read(&archive).unwrap();
    let needle = b"\"bytes\": 70000";
    let at = changed
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap();
    changed[at + 9] = b'6';
    let changed_path = out_dir.path().join("changed.tar");
    std::fs::write(&changed_path, &changed).unwrap();
    for (path, key, error) in [
        (
            &archive,
            other,
            format!(
                "the manifest is signed by key {}, not by the trusted key {}",
                hex(&public),
                hex(&other)
            ),
        ),
        (
            &unsigned,
            public,
            "the manifest is not signed, and a signature by the trusted key was asked for"
                .to_owned(),
        ),
        (
            &changed_path,
            public,
            "the manifest signature does not verify: the archive was changed".to_owned(),
        ),
    ] {
        let fresh = out_dir.path().join("b");
        let err = restore(path, &fresh, &trusting(key))
            .unwrap_err()
            .to_string();
        assert_eq!(err, format!("{}: {error}", path.display()));
        assert!(!fresh.exists());
    }
    // Without a trusted key, a signed archive restores on its digests alone.
    let restored = restore(
        &archive,
        &out_dir.path().join("c"),
        &RestoreOptions::default(),
    )
    .unwrap();
    assert_eq!(restored.verified_by, None);
}

#[test]
fn the_restored_config_points_at_the_restored_data_dir() {
    let dir = Path::new("/srv/restored");
    let cases = [
        (
            "[mqtt]\nmax_connections = 7\n",
            "[mqtt]\nmax_connections = 7\n\n[storage]\ndata_dir = \"/srv/restored\"\n",
        ),
        (
            "# the site's gateway\n[storage]\n# where it lives\ndata_dir = \"/var/lib/fleetgate\" # old\ncache_bytes = 1048576\n",
            "# the site's gateway\n[storage]\n# where it lives\ndata_dir = \"/srv/restored\"\ncache_bytes = 1048576\n",
        ),
        (
            "storage.cache_bytes = 1048576\n",
            "storage.cache_bytes = 1048576\nstorage.data_dir = \"/srv/restored\"\n",
        ),
        (
            "storage = { cache_bytes = 1048576 }\n",
            "storage = { cache_bytes = 1048576 , data_dir = \"/srv/restored\" }\n",
        ),
    ];
    for (before, after) in cases {
        let text = point_at(before, dir).unwrap();
        assert_eq!(text, after, "{before}");
        let config = fleetgate_config::Config::from_toml_str(&text, "restored").unwrap();
        assert_eq!(config.storage.data_dir, dir);
    }
    assert_eq!(
        point_at("storage = 5\n", dir).unwrap_err(),
        "storage is not a table"
    );
    // A relative data dir is made absolute: the config may be read from anywhere.
    let text = point_at("", Path::new("restored")).unwrap();
    let config = fleetgate_config::Config::from_toml_str(&text, "restored").unwrap();
    assert_eq!(
        config.storage.data_dir,
        std::env::current_dir().unwrap().join("restored")
    );
}
