use super::*;

/// The PKCS#8 v1 PEM of the key whose seed is 32 bytes of 7 (what `openssl pkey` prints for it).
const SEVENS_PEM: &str = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIAcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcH\n-----END PRIVATE KEY-----";
/// Its public key.
const SEVENS_PUBLIC: &str = "ea4a6c63e29c520abef5507b132ec5f9954776aebebe7b92421eea691446d22c";
/// A key file as fleetgate 0.1 wrote it: PKCS#8 v2 with the public key attached.
const OLD_V2_PEM: &str = "-----BEGIN PRIVATE KEY-----\nMFECAQEwBQYDK2VwBCIEINvCxGyjFuwqGUtlvEADpisAEh6OLAFqiNADyDh5uHyE\ngSEAIEOMEjrpJJYegcbHQNukaZM6ahr8SfrMI8l2we4whFE=\n-----END PRIVATE KEY-----";
const OLD_V2_PUBLIC: &str = "20438c123ae924961e81c6c740dba469933a6a1afc49facc23c976c1ee308451";

#[test]
fn load_or_create_makes_the_key_once_then_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    let stem = dir.path().join("rollback");
    let first = load_or_create(&stem).unwrap();
    let again = load_or_create(&stem).unwrap();
    assert_eq!(first.to_bytes(), again.to_bytes());
    let public = std::fs::read_to_string(stem.with_extension("pub")).unwrap();
    assert_eq!(public.trim(), hex(first.verifying_key().as_bytes()));
}

#[test]
fn a_generated_key_round_trips_and_its_file_is_private() {
    let dir = tempfile::tempdir().unwrap();
    let stem = dir.path().join("release");
    let key = generate().unwrap();
    write(&key, &stem).unwrap();
    let back = read(&stem.with_extension("key")).unwrap();
    assert_eq!(back.to_bytes(), key.to_bytes());
    let public = std::fs::read_to_string(stem.with_extension("pub")).unwrap();
    assert_eq!(public.trim(), hex(key.verifying_key().as_bytes()));
    assert_eq!(
        fleetgate_config::parse_key(public.trim()).unwrap(),
        key.verifying_key().to_bytes()
    );
    assert!(
        std::fs::read_to_string(stem.with_extension("key"))
            .unwrap()
            .starts_with("-----BEGIN PRIVATE KEY-----")
    );

    let again = write(&generate().unwrap(), &stem).unwrap_err();
    assert!(
        again
            .to_string()
            .ends_with("exists already; not overwriting a key"),
        "{again}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let path = stem.with_extension("key");
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(
            read(&path)
                .unwrap_err()
                .to_string()
                .contains("readable by others")
        );
    }
}

#[test]
fn a_key_file_is_pkcs8_v1_exactly_as_openssl_writes_it() {
    let key = SigningKey::from_bytes(&[7; 32]);
    assert_eq!(to_pem(&key).unwrap(), SEVENS_PEM);
    assert_eq!(hex(key.verifying_key().as_bytes()), SEVENS_PUBLIC);
}

#[test]
fn key_files_of_openssl_and_of_earlier_versions_are_read() {
    let dir = tempfile::tempdir().unwrap();
    for (name, pem, public) in [
        ("v1.key", SEVENS_PEM, SEVENS_PUBLIC),
        ("v2.key", OLD_V2_PEM, OLD_V2_PUBLIC),
    ] {
        let path = dir.path().join(name);
        auth::write_private(&path, pem).unwrap();
        let key = read(&path).unwrap();
        assert_eq!(hex(key.verifying_key().as_bytes()), public, "{name}");
    }
}

/// OpenSSL 3 (`openssl pkey`) loads a generated key file and derives the same public key.
#[test]
fn openssl_reads_a_generated_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let stem = dir.path().join("release");
    let key = generate().unwrap();
    write(&key, &stem).unwrap();
    let out = std::process::Command::new("openssl")
        .args(["pkey", "-pubout", "-outform", "DER", "-in"])
        .arg(stem.with_extension("key"))
        .output()
        .expect("openssl runs (apt-get install openssl; .ci/run installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // SubjectPublicKeyInfo of an ed25519 key: a 12-byte prefix, then the 32 key bytes.
    assert_eq!(out.stdout.len(), 44);
    assert_eq!(&out.stdout[12..], key.verifying_key().as_bytes());
}

#[test]
fn generate_never_writes_through_a_link_or_over_a_public_key() {
    let dir = tempfile::tempdir().unwrap();
    let stem = dir.path().join("release");
    // A dangling link where the private key would go: the key must not land at its target.
    let target = dir.path().join("elsewhere.key");
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(&target, stem.with_extension("key")).unwrap();
        let err = write(&generate().unwrap(), &stem).unwrap_err().to_string();
        assert!(
            err.ends_with("release.key: exists already; not overwriting a key"),
            "{err}"
        );
        assert!(!target.exists());
        assert!(!stem.with_extension("pub").exists());
        std::fs::remove_file(stem.with_extension("key")).unwrap();
    }
    // An existing public key file stays as it was, and no private key is left behind.
    std::fs::write(stem.with_extension("pub"), "keep me\n").unwrap();
    let err = write(&generate().unwrap(), &stem).unwrap_err().to_string();
    assert!(
        err.ends_with("release.pub: exists already; not overwriting a key"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(stem.with_extension("pub")).unwrap(),
        "keep me\n"
    );
    assert!(std::fs::symlink_metadata(stem.with_extension("key")).is_err());
}

#[test]
fn a_public_key_is_read_from_hex_or_from_a_pub_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.pub");
    std::fs::write(&path, format!("{SEVENS_PUBLIC}\n")).unwrap();
    let want = fleetgate_config::parse_key(SEVENS_PUBLIC).unwrap();
    assert_eq!(read_public(SEVENS_PUBLIC).unwrap(), want);
    assert_eq!(read_public(path.to_str().unwrap()).unwrap(), want);
    let err = read_public("nope").unwrap_err().to_string();
    assert!(err.starts_with("nope: "), "{err}");
}
