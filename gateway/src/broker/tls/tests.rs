use std::os::unix::fs::PermissionsExt;

use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

fn config(client_ca: Option<PathBuf>) -> MqttTls {
    MqttTls {
        listen: "127.0.0.1:0".parse().unwrap(),
        cert: None,
        key: None,
        names: vec!["localhost".into(), "127.0.0.1".into()],
        client_ca,
    }
}

fn refused(result: Result<TlsAcceptor, TlsError>) -> String {
    match result {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// A client that trusts the PEM certificates in `ca`, optionally with a client certificate.
fn client(ca: &Path, identity: Option<(String, String)>) -> tokio_rustls::TlsConnector {
    let mut roots = RootCertStore::empty();
    for c in certs(ca).unwrap() {
        roots.add(c).unwrap();
    }
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
    };
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// Runs a handshake over an in-memory pipe and sends one byte each way; the client's result.
async fn handshake(
    server: &TlsAcceptor,
    client: &tokio_rustls::TlsConnector,
) -> Result<(), String> {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let server = server.clone();
    let accept = tokio::spawn(async move {
        let mut s = server.accept(b).await.map_err(|e| e.to_string())?;
        let mut byte = [0u8; 1];
        s.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
        s.write_all(&byte).await.map_err(|e| e.to_string())?;
        s.flush().await.map_err(|e| e.to_string())
    });
    let name = ServerName::try_from("localhost").unwrap();
    let client_side = async {
        let mut c = client.connect(name, a).await.map_err(|e| e.to_string())?;
        c.write_all(b"x").await.map_err(|e| e.to_string())?;
        c.flush().await.map_err(|e| e.to_string())?;
        let mut byte = [0u8; 1];
        c.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(byte)
    };
    let got = client_side.await;
    let served = accept.await.unwrap();
    served?;
    assert_eq!(got?, *b"x");
    Ok(())
}

#[tokio::test]
async fn a_generated_certificate_is_private_reused_and_trusted_by_name_and_address() {
    let dir = tempfile::tempdir().unwrap();
    let first = acceptor(&config(None), dir.path()).unwrap();
    let (cert, key) = (
        dir.path().join(DIR).join(CERT_FILE),
        dir.path().join(DIR).join(KEY_FILE),
    );
    assert_eq!(mode(&key), 0o600);
    assert_eq!(mode(&dir.path().join(DIR)), 0o700);
    let pem = std::fs::read(&cert).unwrap();
    handshake(&first, &client(&cert, None)).await.unwrap();

    // A second start reuses the files.
    let second = acceptor(&config(None), dir.path()).unwrap();
    assert_eq!(std::fs::read(&cert).unwrap(), pem);
    handshake(&second, &client(&cert, None)).await.unwrap();

    // A client trusting another certificate refuses this one.
    let other = tempfile::tempdir().unwrap();
    acceptor(&config(None), other.path()).unwrap();
    let stranger = client(&other.path().join(DIR).join(CERT_FILE), None);
    assert!(handshake(&second, &stranger).await.is_err());

    // Half a pair is replaced by a new pair.
    std::fs::remove_file(&cert).unwrap();
    acceptor(&config(None), dir.path()).unwrap();
    assert_ne!(std::fs::read(&cert).unwrap(), pem);
    assert_eq!(mode(&key), 0o600);
}

#[test]
fn a_key_readable_by_others_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    acceptor(&config(None), dir.path()).unwrap();
    let key = dir.path().join(DIR).join(KEY_FILE);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = refused(acceptor(&config(None), dir.path()));
    assert!(err.contains("readable by others"), "{err}");

    // The same for a configured key.
    let mut cfg = config(None);
    cfg.cert = Some(dir.path().join(DIR).join(CERT_FILE));
    cfg.key = Some(key.clone());
    let err = refused(acceptor(&cfg, dir.path()));
    assert!(err.contains("readable by others"), "{err}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    acceptor(&cfg, dir.path()).unwrap();
}

#[test]
fn configured_files_that_are_not_pem_are_named_in_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.pem");
    auth::write_private(&junk, "not a certificate").unwrap();
    let mut cfg = config(None);
    cfg.cert = Some(junk.clone());
    cfg.key = Some(junk.clone());
    let err = refused(acceptor(&cfg, dir.path()));
    assert!(
        err.contains("junk.pem") && err.contains("no certificate"),
        "{err}"
    );
    cfg.cert = Some(dir.path().join("missing.pem"));
    let err = refused(acceptor(&cfg, dir.path()));
    assert!(err.contains("missing.pem"), "{err}");
}

#[tokio::test]
async fn with_a_client_ca_only_clients_with_a_certificate_it_signed_get_through() {
    let dir = tempfile::tempdir().unwrap();
    // A CA and a device certificate it signed.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, ca_cert.pem()).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, &ca_key);
    let device_key = rcgen::KeyPair::generate().unwrap();
    let device_cert = rcgen::CertificateParams::new(vec!["device-1".to_owned()])
        .unwrap()
        .signed_by(&device_key, &issuer)
        .unwrap();
    // A certificate the CA did not sign.
    let rogue = rcgen::generate_simple_self_signed(vec!["device-1".to_owned()]).unwrap();

    let server = acceptor(&config(Some(ca_path)), dir.path()).unwrap();
    let cert = dir.path().join(DIR).join(CERT_FILE);
    let signed = Some((device_cert.pem(), device_key.serialize_pem()));
    handshake(&server, &client(&cert, signed)).await.unwrap();
    assert!(handshake(&server, &client(&cert, None)).await.is_err());
    let unsigned = Some((rogue.cert.pem(), rogue.signing_key.serialize_pem()));
    assert!(handshake(&server, &client(&cert, unsigned)).await.is_err());

    let mut bad = config(Some(dir.path().join("no-such-ca.pem")));
    bad.names = vec!["localhost".into()];
    let err = refused(acceptor(&bad, dir.path()));
    assert!(err.contains("no-such-ca.pem"), "{err}");
}
