use super::*;

#[test]
fn secrets_are_random_hex_and_checked_by_digest() {
    let a = new_secret().unwrap();
    let b = new_secret().unwrap();
    assert_eq!(a.len(), 64);
    assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
    assert_ne!(a, b);
    let creds = Credentials::default();
    creds.set("d1", digest(&a));
    assert!(creds.check("d1", &a));
    assert!(!creds.check("d1", &b));
    assert!(!creds.check("d2", &a));
    creds.remove("d1");
    assert!(!creds.check("d1", &a));
}

#[test]
fn operator_token_precedence_and_file_mode() {
    let dir = tempfile::tempdir().unwrap();
    let (t, src) = operator_token(
        Some("from-config-0123456789"),
        Some("env".into()),
        dir.path(),
    )
    .unwrap();
    assert_eq!(
        (t.as_str(), src),
        ("from-config-0123456789", TokenSource::Config)
    );
    let (t, src) = operator_token(None, Some(" env-token \n".into()), dir.path()).unwrap();
    assert_eq!((t.as_str(), src), ("env-token", TokenSource::Env));

    let (generated, src) = operator_token(None, None, dir.path()).unwrap();
    let path = dir.path().join(TOKEN_FILE);
    assert_eq!(src, TokenSource::File(path.clone()));
    let (again, _) = operator_token(None, Some("  ".into()), dir.path()).unwrap();
    assert_eq!(
        again, generated,
        "the generated token is reused on the next start"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = operator_token(None, None, dir.path()).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied);
    }
}
