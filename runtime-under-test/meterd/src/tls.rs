//! TLS between runtimes: self-signed identities kept in the state folder. Clients pin the
//! server's certificate; the server learns each client runtime's certificate (its key) and binds
//! the runtime's id to it on first contact.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms, ring};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme,
};
use sha2::{Digest, Sha256};

/// A TLS setup failure.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A key or certificate file could not be read or written.
    #[error("Cannot access {path}")]
    File {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The self-signed certificate could not be generated.
    #[error("Cannot generate the server certificate")]
    Generate(#[source] rcgen::Error),
    /// rustls refused the configuration.
    #[error("Invalid TLS configuration")]
    Config(#[source] rustls::Error),
    /// A pin is not 64 hex digits.
    #[error("Invalid certificate pin {0:?} (expected 64 hex digits)")]
    BadPin(String),
}

/// A runtime's (or a server's) certificate and key.
#[derive(Debug)]
pub struct Identity {
    /// The certificate, DER.
    pub cert: CertificateDer<'static>,
    /// The PKCS#8 private key, DER.
    pub key: PrivatePkcs8KeyDer<'static>,
}

impl Identity {
    /// SHA-256 of the certificate DER, lower-case hex: what clients pin, and how a server knows
    /// a client runtime.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.cert)
    }

    /// A fresh self-signed identity, kept nowhere.
    pub fn generate() -> Result<Identity, TlsError> {
        let generated = rcgen::generate_simple_self_signed(vec!["meterd".to_owned()])
            .map_err(TlsError::Generate)?;
        Ok(Identity {
            cert: generated.cert.der().clone(),
            key: PrivatePkcs8KeyDer::from(generated.signing_key.serialize_der()),
        })
    }
}

/// SHA-256 of a certificate DER, lower-case hex.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    hex::encode(Sha256::digest(cert.as_ref()))
}

/// Parses a pin (64 hex digits, `:` separators allowed).
pub fn parse_pin(text: &str) -> Result<[u8; 32], TlsError> {
    let cleaned: String = text.chars().filter(|c| *c != ':').collect();
    let bytes = hex::decode(cleaned.trim()).map_err(|_| TlsError::BadPin(text.to_owned()))?;
    bytes
        .try_into()
        .map_err(|_| TlsError::BadPin(text.to_owned()))
}

fn file_error(path: &Path) -> impl FnOnce(io::Error) -> TlsError + '_ {
    move |source| TlsError::File {
        path: path.to_owned(),
        source,
    }
}

/// Loads the server identity from `state`, creating it on first start; writes `<state>/server.pin`.
pub fn load_or_create_identity(state: &Path) -> Result<Identity, TlsError> {
    let identity = load_or_create(state, "server")?;
    let pin_path = state.join("server.pin");
    write_atomic(
        &pin_path,
        format!("{}\n", identity.fingerprint()).as_bytes(),
    )?;
    Ok(identity)
}

/// Loads this runtime's own key pair from `state` (`runtime.key.der`, mode 0600), creating it on
/// first start: what it authenticates with to network servers.
pub fn load_or_create_runtime_identity(state: &Path) -> Result<Identity, TlsError> {
    load_or_create(state, "runtime")
}

fn load_or_create(state: &Path, name: &str) -> Result<Identity, TlsError> {
    let cert_path = state.join(format!("{name}.crt.der"));
    let key_path = state.join(format!("{name}.key.der"));
    if cert_path.exists() && key_path.exists() {
        return Ok(Identity {
            cert: CertificateDer::from(fs::read(&cert_path).map_err(file_error(&cert_path))?),
            key: PrivatePkcs8KeyDer::from(fs::read(&key_path).map_err(file_error(&key_path))?),
        });
    }
    let identity = Identity::generate()?;
    write_private(&key_path, identity.key.secret_pkcs8_der())?;
    write_atomic(&cert_path, identity.cert.as_ref())?;
    tracing::info!(name, fingerprint = %identity.fingerprint(), "Created TLS identity");
    Ok(identity)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, bytes).map_err(file_error(&tmp))?;
    fs::rename(&tmp, path).map_err(file_error(path))
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(file_error(&tmp))?;
    file.write_all(bytes).map_err(file_error(&tmp))?;
    fs::rename(&tmp, path).map_err(file_error(path))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

/// The rustls server configuration for an identity: every client must present a certificate
/// (any self-signed one; the server binds runtime ids to them).
pub fn server_config(identity: &Identity) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let verifier = AnyClientCert {
        algorithms: provider.signature_verification_algorithms,
    };
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(
            vec![identity.cert.clone()],
            PrivateKeyDer::Pkcs8(identity.key.clone_key()),
        )
        .map_err(TlsError::Config)?;
    Ok(Arc::new(config))
}

/// The rustls client configuration that accepts only the server certificate with this SHA-256
/// and authenticates as `identity`.
pub fn client_config(pin: [u8; 32], identity: &Identity) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let verifier = PinnedCertVerifier {
        pin,
        algorithms: provider.signature_verification_algorithms,
    };
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(
            vec![identity.cert.clone()],
            PrivateKeyDer::Pkcs8(identity.key.clone_key()),
        )
        .map_err(TlsError::Config)?;
    Ok(Arc::new(config))
}

/// The server name clients present (the pin, not the name, authenticates the server).
pub fn server_name() -> ServerName<'static> {
    ServerName::try_from("meterd").expect("static name is valid")
}

/// Accepts exactly one server certificate, identified by its SHA-256; signatures still verified.
#[derive(Debug)]
struct PinnedCertVerifier {
    pin: [u8; 32],
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedCertVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let digest: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if digest == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "server certificate {} does not match the pinned {}",
                hex::encode(digest),
                hex::encode(self.pin)
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The fingerprint of the certificate a client authenticated with, once the handshake is done.
pub fn client_fingerprint(connection: &rustls::ServerConnection) -> Option<String> {
    connection
        .peer_certificates()
        .and_then(|certs| certs.first())
        .map(fingerprint)
}

/// Requires a client certificate and the proof that the client holds its key; trusts no
/// authority (a runtime's certificate is self-signed: the server binds ids to keys itself).
#[derive(Debug)]
struct AnyClientCert {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for AnyClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_created_once_and_pinned() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create_identity(dir.path()).unwrap();
        let second = load_or_create_identity(dir.path()).unwrap();
        assert_eq!(first.fingerprint(), second.fingerprint());
        let pin = fs::read_to_string(dir.path().join("server.pin")).unwrap();
        assert_eq!(pin.trim(), first.fingerprint());
        assert_eq!(parse_pin(pin.trim()).unwrap().len(), 32);
        assert!(parse_pin("abc").is_err());
        server_config(&first).unwrap();
        let runtime = load_or_create_runtime_identity(dir.path()).unwrap();
        assert_ne!(runtime.fingerprint(), first.fingerprint());
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dir.path().join("runtime.key.der"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        client_config([0; 32], &runtime).unwrap();
    }
}
