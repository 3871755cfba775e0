//! TLS for the MQTT front: the server certificate (configured, or self-signed and generated on
//! first start) and the rustls server config, with the ring provider.
//!
//! Invariants:
//! - A private key file readable by anyone but its owner is refused, configured or generated.
//! - A generated certificate is written once (`<data_dir>/tls/cert.pem`, `key.pem` with mode
//!   0600) and reused on every later start; a half-written pair (one file missing) is replaced.
//! - With `client_ca` set, every TLS client must present a certificate that chains to it. The
//!   certificate is not tied to a device id: the device still authenticates in CONNECT.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use fleetgate_config::MqttTls;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use tokio_rustls::TlsAcceptor;

use crate::auth;

/// Directory of the generated certificate, under the data dir.
pub const DIR: &str = "tls";
pub const CERT_FILE: &str = "cert.pem";
pub const KEY_FILE: &str = "key.pem";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {what}", path.display())]
    Pem { path: PathBuf, what: String },
    #[error("generating a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("mqtt.tls.client_ca {}: {what}", path.display())]
    ClientCa { path: PathBuf, what: String },
    #[error("the certificate and key do not make a TLS server: {0}")]
    Config(#[from] rustls::Error),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The acceptor of the TLS listener. Reads (and on first start writes) files: call it off the
/// async workers.
pub fn acceptor(cfg: &MqttTls, data_dir: &Path) -> Result<TlsAcceptor, TlsError> {
    let (cert, key) = match (&cfg.cert, &cfg.key) {
        (Some(cert), Some(key)) => (cert.clone(), key.clone()),
        _ => generated(&data_dir.join(DIR), &cfg.names)?,
    };
    auth::check_private(&key).map_err(io(&key))?;
    let chain = certs(&cert)?;
    let key = PrivateKeyDer::from_pem_file(&key).map_err(|e| TlsError::Pem {
        path: key.clone(),
        what: format!("no private key: {e}"),
    })?;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match &cfg.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let ca_err = |what: String| TlsError::ClientCa {
                path: path.clone(),
                what,
            };
            let mut roots = RootCertStore::empty();
            for ca in certs(path)? {
                roots.add(ca).map_err(|e| ca_err(e.to_string()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| ca_err(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder.with_single_cert(chain, key)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Every certificate in a PEM file; at least one.
fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = |what: String| TlsError::Pem {
        path: path.to_owned(),
        what,
    };
    let bytes = std::fs::read(path).map_err(io(path))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem(format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(pem("holds no certificate".to_owned()));
    }
    Ok(certs)
}

/// The self-signed certificate in `dir`, made for `names` if it is not there yet. Returns the
/// paths of the certificate and the key.
fn generated(dir: &Path, names: &[String]) -> Result<(PathBuf, PathBuf), TlsError> {
    let (cert, key) = (dir.join(CERT_FILE), dir.join(KEY_FILE));
    if cert.exists() && key.exists() {
        return Ok((cert, key));
    }
    create_private_dir(dir)?;
    // Removed first: a key file left over with a wider mode would keep it when rewritten.
    for path in [&cert, &key] {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(path)(e)),
            _ => {}
        }
    }
    let made = rcgen::generate_simple_self_signed(names.to_vec())?;
    auth::write_private(&key, &made.signing_key.serialize_pem()).map_err(io(&key))?;
    std::fs::write(&cert, made.cert.pem()).map_err(io(&cert))?;
    tracing::info!(cert = %cert.display(), ?names, "generated a self-signed TLS certificate");
    Ok((cert, key))
}

fn create_private_dir(dir: &Path) -> Result<(), TlsError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(io(dir))
}

#[cfg(test)]
mod tests;
