//! The CA certificates the hub holds, as IoT Hub manages them (Microsoft: "Certificates" in the
//! IoT Hub resource provider REST API; "Tutorial: Create and upload certificates for testing"):
//! uploaded by name, unverified until proof of possession (a verification code, then a
//! certificate with that code as its CN signed by the CA's key), or verified at upload when the
//! upload says `isVerified: true` or the hub's `behaviour.ca_proof_of_possession` is off. Only
//! verified ones are trust anchors for `certificateAuthority` devices (`x509.rs`); removing one
//! refuses its devices from their next connect.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};
use serde::{Deserialize, Serialize};

use super::metrics::Refusal;

/// IoT Hub's limit of CA certificates per hub ("IoT Hub quotas and throttling": 25).
pub const MAX_CERTIFICATES: usize = 25;

/// One CA certificate the hub holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaCert {
    pub name: String,
    /// The certificate's DER.
    pub der: Vec<u8>,
    /// The subject as text (`CN=...`).
    pub subject: String,
    /// Uppercase hex SHA-1 of the DER, as IoT Hub shows it.
    pub thumbprint: String,
    pub expiry: SystemTime,
    pub verified: bool,
    pub created: SystemTime,
    pub updated: SystemTime,
    /// Bumped on every change; the etag is derived from it.
    pub version: u64,
    /// The code the last `generateVerificationCode` gave, which the proof must carry as its CN.
    pub verification_code: Option<String>,
}

impl CaCert {
    pub fn etag(&self) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(format!("{:016x}", self.version))
    }
}

/// Why a CA operation is refused; each is one of IoT Hub's errors (`http/service.rs` maps them).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CaError {
    #[error("the certificate `{0}` does not exist")]
    NotFound(String),
    #[error("`{0}` is not a valid certificate name (1-64 letters, digits, `-`, `.` or `_`)")]
    BadName(String),
    #[error("the certificate is not a PEM or base64-encoded X.509 CA certificate")]
    BadCertificate,
    #[error("the etag does not match the certificate's current one")]
    PreconditionFailed,
    #[error("the hub holds {MAX_CERTIFICATES} certificates already")]
    TooMany,
    #[error("no verification code was generated for this certificate")]
    NoVerificationCode,
    #[error("the proof of possession is not a certificate signed by this CA with the verification code as its CN")]
    BadProof,
}

#[derive(Default)]
struct Inner {
    certs: BTreeMap<String, CaCert>,
    /// The verified ones, as webpki trust anchors (rebuilt on every change).
    anchors: Arc<Vec<TrustAnchor<'static>>>,
}

/// The hub's CA certificates. Reads at CONNECT take the read lock only to clone the anchors.
#[derive(Default)]
pub struct CaCerts {
    inner: RwLock<Inner>,
}

/// A certificate from an upload body: PEM text, or base64 of DER or of PEM (what Azure takes).
pub fn decode(text: &str) -> Result<Vec<u8>, CaError> {
    use base64::Engine;
    let text = text.trim();
    let der = if text.contains("-----BEGIN") {
        CertificateDer::from_pem_slice(text.as_bytes()).map_err(|_| CaError::BadCertificate)?.to_vec()
    } else {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(text.split_whitespace().collect::<String>())
            .map_err(|_| CaError::BadCertificate)?;
        match std::str::from_utf8(&raw) {
            Ok(s) if s.contains("-----BEGIN") => return decode(s),
            _ => raw,
        }
    };
    x509_parser::parse_x509_certificate(&der).map_err(|_| CaError::BadCertificate)?;
    Ok(der)
}

/// An ARM resource name IoT Hub takes for a certificate: 1-64 of `A-Za-z0-9-._`.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
}

fn unix(t: SystemTime) -> UnixTime {
    UnixTime::since_unix_epoch(t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or(Duration::ZERO))
}

fn to_system(t: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(t.max(0) as u64)
}

/// Accepts any extended key usage: proofs of possession are made by hand with whatever a
/// script puts in them; only the signature and the CN matter.
struct AnyUsage;

impl webpki::ExtendedKeyUsageValidator for AnyUsage {
    fn validate(&self, _: webpki::KeyPurposeIdIter<'_, '_>) -> Result<(), webpki::Error> {
        Ok(())
    }
}

impl CaCerts {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    fn rebuild(inner: &mut Inner) {
        let anchors = inner
            .certs
            .values()
            .filter(|c| c.verified)
            .filter_map(|c| {
                let der = CertificateDer::from(c.der.as_slice());
                webpki::anchor_from_trusted_cert(&der).ok().map(|a| a.to_owned())
            })
            .collect();
        inner.anchors = Arc::new(anchors);
    }

    pub fn get(&self, name: &str) -> Option<CaCert> {
        self.read().certs.get(name).cloned()
    }

    pub fn list(&self) -> Vec<CaCert> {
        self.read().certs.values().cloned().collect()
    }

    /// Puts back one the store kept.
    pub fn restore(&self, cert: CaCert) {
        let mut inner = self.write();
        inner.certs.insert(cert.name.clone(), cert);
        Self::rebuild(&mut inner);
    }

    /// Uploads (creates or replaces) `name`. A replacement needs `if_match` to match (`*` or
    /// the etag) when given, and starts unverified again unless `verified`, as a new upload
    /// does. Each change calls `persist` with the new state (`None`: removed) under the lock,
    /// so the store sees changes in the order they were made.
    pub fn put(
        &self,
        name: &str,
        certificate: &str,
        verified: bool,
        if_match: Option<&str>,
        now: SystemTime,
        persist: impl FnOnce(Option<&CaCert>),
    ) -> Result<CaCert, CaError> {
        if !valid_name(name) {
            return Err(CaError::BadName(name.to_owned()));
        }
        let der = decode(certificate)?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).map_err(|_| CaError::BadCertificate)?;
        let subject = parsed.subject().to_string();
        let expiry = to_system(parsed.validity().not_after.timestamp());
        drop(parsed);
        let mut inner = self.write();
        let old = inner.certs.get(name);
        if let (Some(old), Some(cond)) = (old, if_match)
            && !super::registry::etag_matches(cond, &old.etag())
        {
            return Err(CaError::PreconditionFailed);
        }
        if old.is_none() && inner.certs.len() >= MAX_CERTIFICATES {
            return Err(CaError::TooMany);
        }
        let cert = CaCert {
            name: name.to_owned(),
            subject,
            thumbprint: super::x509::thumbprints(&der).0,
            der,
            expiry,
            verified,
            created: old.map_or(now, |o| o.created),
            updated: now,
            version: old.map_or(1, |o| o.version + 1),
            verification_code: None,
        };
        inner.certs.insert(name.to_owned(), cert.clone());
        Self::rebuild(&mut inner);
        persist(Some(&cert));
        Ok(cert)
    }

    /// Removes `name` (its devices are refused from their next connect).
    pub fn remove(
        &self,
        name: &str,
        if_match: Option<&str>,
        persist: impl FnOnce(Option<&CaCert>),
    ) -> Result<(), CaError> {
        let mut inner = self.write();
        let old = inner.certs.get(name).ok_or_else(|| CaError::NotFound(name.to_owned()))?;
        if let Some(cond) = if_match
            && !super::registry::etag_matches(cond, &old.etag())
        {
            return Err(CaError::PreconditionFailed);
        }
        inner.certs.remove(name);
        Self::rebuild(&mut inner);
        persist(None);
        Ok(())
    }

    fn change(
        &self,
        name: &str,
        if_match: Option<&str>,
        persist: impl FnOnce(Option<&CaCert>),
        f: impl FnOnce(&mut CaCert) -> Result<(), CaError>,
    ) -> Result<CaCert, CaError> {
        let mut inner = self.write();
        let cert = inner.certs.get_mut(name).ok_or_else(|| CaError::NotFound(name.to_owned()))?;
        if let Some(cond) = if_match
            && !super::registry::etag_matches(cond, &cert.etag())
        {
            return Err(CaError::PreconditionFailed);
        }
        f(cert)?;
        cert.version += 1;
        let out = cert.clone();
        Self::rebuild(&mut inner);
        persist(Some(&out));
        Ok(out)
    }

    /// A new verification code for `name` (replacing any earlier one).
    pub fn generate_code(
        &self,
        name: &str,
        if_match: Option<&str>,
        now: SystemTime,
        persist: impl FnOnce(Option<&CaCert>),
    ) -> Result<CaCert, CaError> {
        self.change(name, if_match, persist, |c| {
            c.verification_code = Some(uuid::Uuid::new_v4().simple().to_string().to_uppercase());
            c.updated = now;
            Ok(())
        })
    }

    /// Proof of possession: `proof` (PEM or base64) must be signed by `name`'s key, have the
    /// last verification code as its subject CN, and be valid at `now`. Marks `name` verified.
    pub fn verify(
        &self,
        name: &str,
        if_match: Option<&str>,
        proof: &str,
        now: SystemTime,
        persist: impl FnOnce(Option<&CaCert>),
    ) -> Result<CaCert, CaError> {
        let proof = decode(proof).map_err(|_| CaError::BadProof)?;
        self.change(name, if_match, persist, |c| {
            let code = c.verification_code.as_deref().ok_or(CaError::NoVerificationCode)?;
            let (_, parsed) = x509_parser::parse_x509_certificate(&proof).map_err(|_| CaError::BadProof)?;
            if super::x509::subject_cn(&parsed).as_deref() != Some(code) {
                return Err(CaError::BadProof);
            }
            let ca = CertificateDer::from(c.der.as_slice());
            let anchor = webpki::anchor_from_trusted_cert(&ca).map_err(|_| CaError::BadProof)?;
            let proof_der = CertificateDer::from(proof.as_slice());
            let leaf = webpki::EndEntityCert::try_from(&proof_der).map_err(|_| CaError::BadProof)?;
            let algs = super::x509::algorithms();
            leaf.verify_for_usage(algs.all, &[anchor], &[], unix(now), AnyUsage, None, None)
                .map_err(|_| CaError::BadProof)?;
            c.verified = true;
            c.verification_code = None;
            c.updated = now;
            Ok(())
        })
    }

    /// Whether `leaf` (with the `intermediates` the client sent) chains to a verified CA at
    /// `now`, for client authentication. `CertExpired`, `CertNotYetValid` or `CertUntrusted`.
    pub fn verify_chain(
        &self,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'static>],
        now: SystemTime,
    ) -> Result<(), Refusal> {
        let anchors = self.read().anchors.clone();
        if anchors.is_empty() {
            return Err(Refusal::CertUntrusted);
        }
        let cert = webpki::EndEntityCert::try_from(leaf).map_err(|_| Refusal::CertUntrusted)?;
        let algs = super::x509::algorithms();
        cert.verify_for_usage(algs.all, &anchors, intermediates, unix(now), webpki::KeyUsage::client_auth(), None, None)
            .map(|_| ())
            .map_err(|e| super::x509::refusal_of(&e))
    }
}
