//! TLS client settings for the upstream broker and for webhooks: trusted roots (a configured
//! CA file, or the system's), an optional client certificate, the ring provider only.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

#[derive(Debug, thiserror::Error)]
pub enum ClientTlsError {
    #[error("{}: {what}", path.display())]
    File { path: PathBuf, what: String },
    #[error("no trusted root certificates: the system has none readable ({0}); set a CA file")]
    NoRoots(String),
    #[error("TLS settings: {0}")]
    Config(#[from] rustls::Error),
    #[error("server_name {0:?} is not a host name or IP address")]
    ServerName(String),
    #[error("TLS verifier: {0}")]
    Verifier(#[from] rustls::client::VerifierBuilderError),
}

/// Checks the server's certificate as usual, but for a configured name instead of the host
/// connected to (a broker reached by IP address whose certificate names it).
#[derive(Debug)]
struct NamedVerifier {
    inner: Arc<WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl ServerCertVerifier for NamedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, ClientTlsError> {
    let err = |what: String| ClientTlsError::File {
        path: path.to_owned(),
        what,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("holds no PEM certificate".to_owned()));
    }
    Ok(certs)
}

/// Root certificates: those in `ca`, or the system's.
pub fn roots(ca: Option<&Path>) -> Result<Vec<CertificateDer<'static>>, ClientTlsError> {
    match ca {
        Some(path) => certs(path),
        None => {
            let found = rustls_native_certs::load_native_certs();
            if found.certs.is_empty() {
                let why = found
                    .errors
                    .first()
                    .map_or("none found".to_owned(), ToString::to_string);
                return Err(ClientTlsError::NoRoots(why));
            }
            Ok(found.certs)
        }
    }
}

/// A rustls client config: roots from `ca` (or the system's), a client certificate from
/// `cert` and `key` when both are given, and with `server_name` the name the server's
/// certificate must hold. Reads files: call it off the async workers.
pub fn client_config(
    ca: Option<&Path>,
    cert_and_key: Option<(&Path, &Path)>,
    server_name: Option<&str>,
) -> Result<Arc<rustls::ClientConfig>, ClientTlsError> {
    let mut store = RootCertStore::empty();
    let (added, _) = store.add_parsable_certificates(roots(ca)?);
    if added == 0 {
        return Err(ClientTlsError::NoRoots(
            "no certificate in it is a usable root".to_owned(),
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match server_name {
        None => builder.with_root_certificates(store),
        Some(name) => {
            let name = ServerName::try_from(name.to_owned())
                .map_err(|_| ClientTlsError::ServerName(name.to_owned()))?;
            let inner =
                WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider).build()?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NamedVerifier { inner, name }))
        }
    };
    let config = match cert_and_key {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            crate::auth::check_private(key).map_err(|e| ClientTlsError::File {
                path: key.to_owned(),
                what: e.to_string(),
            })?;
            let chain = certs(cert)?;
            let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| ClientTlsError::File {
                path: key.to_owned(),
                what: format!("no private key: {e}"),
            })?;
            builder.with_client_auth_cert(chain, key_der)?
        }
    };
    Ok(Arc::new(config))
}
