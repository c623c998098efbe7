//! X.509 client certificates at the TLS layer, and the facts about a certificate the hub
//! matches: the listeners ask for a client certificate and take any well-formed one
//! (`RequestAnyCertificate`), so that the decision, and the reason for a refusal, is made at
//! CONNECT where the identity is known (`devices.rs::authenticate_x509`, with the CAs of
//! `ca_certs.rs`). Certificates are read with `x509-parser` and chains verified with
//! `rustls-webpki` (the verifier rustls itself uses); neither is our code.

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, UnixTime};
use sha1::Digest;

use super::metrics::Refusal;

/// The chain a TLS client presented (leaf first), as the handshake left it. Cloned into the
/// connection's task; absent when the client sent none.
#[derive(Clone)]
pub struct ClientChain(pub Arc<[CertificateDer<'static>]>);

impl std::fmt::Debug for ClientChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClientChain({} certificates)", self.0.len())
    }
}

impl ClientChain {
    /// The peer's chain of a finished handshake, if it sent one.
    pub fn of(conn: &rustls::ServerConnection) -> Option<ClientChain> {
        conn.peer_certificates().filter(|c| !c.is_empty()).map(|c| ClientChain(c.to_vec().into()))
    }
}

/// The signature algorithms of the process's crypto provider (aws-lc-rs), for chains and
/// handshake signatures alike.
pub fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms
}

/// A client certificate verifier that asks for a certificate, does not require one, and takes
/// any chain whose certificates parse: the registry decides at CONNECT. The handshake still
/// proves the client holds the leaf's private key (its signatures are verified here).
#[derive(Debug)]
pub struct RequestAnyCertificate {
    algs: WebPkiSupportedAlgorithms,
}

impl RequestAnyCertificate {
    pub fn new() -> Arc<RequestAnyCertificate> {
        Arc::new(RequestAnyCertificate { algs: algorithms() })
    }
}

impl ClientCertVerifier for RequestAnyCertificate {
    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: a device offers its one certificate whatever CAs the hub names.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        for der in std::iter::once(end_entity).chain(intermediates) {
            if x509_parser::parse_x509_certificate(der).is_err() {
                return Err(rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding));
            }
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Uppercase hex SHA-1 and SHA-256 of a certificate's DER: the two thumbprints IoT Hub matches.
pub fn thumbprints(der: &[u8]) -> (String, String) {
    (hex(&sha1::Sha1::digest(der)), hex(&sha2::Sha256::digest(der)))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

/// The first common name of a certificate's subject, if it has one in a string type.
pub fn subject_cn(cert: &x509_parser::certificate::X509Certificate<'_>) -> Option<String> {
    cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).map(str::to_owned)
}

/// What webpki's refusal of a chain means for the metrics.
pub fn refusal_of(e: &webpki::Error) -> Refusal {
    match e {
        webpki::Error::CertExpired { .. } => Refusal::CertExpired,
        webpki::Error::CertNotValidYet { .. } => Refusal::CertNotYetValid,
        _ => Refusal::CertUntrusted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thumbprints_are_sha1_and_sha256_in_uppercase_hex() {
        let (a, b) = thumbprints(b"abc");
        assert_eq!(a, "A9993E364706816ABA3E25717850C26C9CD0D89D");
        assert_eq!(b, "BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD");
        assert!(crate::hub::registry::valid_thumbprint(&a) && crate::hub::registry::valid_thumbprint(&b));
    }
}
