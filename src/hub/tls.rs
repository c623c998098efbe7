//! TLS for both listeners. On first start the emulator makes an ECDSA P-256 CA and a server
//! certificate for the configured names and keeps them in the data dir; later starts reuse them,
//! re-issuing only the server certificate when the set of names changed. User-supplied PEM files
//! replace all of it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, anyhow};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::config::TlsFiles;
use crate::fsio::{MAX_INPUT_FILE, read_capped, read_text_capped, write_atomic, write_private};

/// Server configs for the two listeners, and the CA clients must trust. Both ask clients for a
/// certificate (X.509 devices; not required).
pub struct TlsMaterial {
    /// No ALPN: MQTT clients do not negotiate one.
    pub mqtt: Arc<ServerConfig>,
    /// ALPN `h2` and `http/1.1` for the REST, DPS and WebSocket endpoint.
    pub https: Arc<ServerConfig>,
    pub ca_file: PathBuf,
}

const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca.key.pem";
const SERVER_CERT: &str = "server.pem";
const SERVER_KEY: &str = "server.key.pem";
const SERVER_NAMES: &str = "server.names";

pub fn load_or_create(files: &TlsFiles, data_dir: &Path, hostnames: &[String]) -> anyhow::Result<TlsMaterial> {
    let (chain_path, key_path, ca_file) = match (&files.cert_file, &files.key_file, &files.ca_file) {
        (Some(c), Some(k), Some(ca)) => (c.clone(), k.clone(), ca.clone()),
        _ => ensure_generated(data_dir, hostnames)?,
    };
    // Read with a size cap first: the PEM readers would follow an endless file forever.
    let chain_pem = read_capped(&chain_path, MAX_INPUT_FILE)
        .with_context(|| format!("{}: cannot read the certificate chain", chain_path.display()))?;
    let chain = CertificateDer::pem_slice_iter(&chain_pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: cannot read the certificate chain", chain_path.display()))?;
    if chain.is_empty() {
        return Err(anyhow!("{}: no certificate in the file", chain_path.display()));
    }
    let key_pem = read_capped(&key_path, MAX_INPUT_FILE)
        .with_context(|| format!("{}: cannot read the private key", key_path.display()))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .with_context(|| format!("{}: cannot read the private key", key_path.display()))?;
    let ca_file =
        std::fs::canonicalize(&ca_file).with_context(|| format!("{}: the CA file is missing", ca_file.display()))?;
    let mqtt = server_config(chain.clone(), key.clone_key(), &[])?;
    let https = server_config(chain, key, &[b"h2", b"http/1.1"])?;
    Ok(TlsMaterial { mqtt, https, ca_file })
}

fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    alpn: &[&[u8]],
) -> anyhow::Result<Arc<ServerConfig>> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])?
        // Asked for, never required: X.509 devices are decided at CONNECT (`x509.rs`).
        .with_client_cert_verifier(super::x509::RequestAnyCertificate::new())
        .with_single_cert(chain, key)
        .context("the server certificate and key do not match")?;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// Makes the CA once, and the server certificate whenever the names it must cover changed.
fn ensure_generated(dir: &Path, hostnames: &[String]) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    let (ca_cert, ca_key) = (dir.join(CA_CERT), dir.join(CA_KEY));
    if !ca_cert.exists() || !ca_key.exists() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "fleetsim emulator CA");
        params.distinguished_name.push(DnType::OrganizationName, "fleetsim");
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let cert = params.self_signed(&key)?;
        write_private(&ca_key, key.serialize_pem().as_bytes())?;
        write_atomic(&ca_cert, cert.pem().as_bytes(), 0o644)?;
        // A new CA invalidates any server certificate signed by an old one.
        let _ = std::fs::remove_file(dir.join(SERVER_NAMES));
    }
    let (server_cert, server_key, names_file) = (dir.join(SERVER_CERT), dir.join(SERVER_KEY), dir.join(SERVER_NAMES));
    let wanted = hostnames.join("\n");
    let current = read_text_capped(&names_file, MAX_INPUT_FILE).unwrap_or_default();
    if current != wanted || !server_cert.exists() || !server_key.exists() {
        let ca_key_pair = KeyPair::from_pem(&read_text_capped(&ca_key, MAX_INPUT_FILE)?)
            .context("the stored CA key is unreadable")?;
        let issuer = Issuer::from_ca_cert_pem(&read_text_capped(&ca_cert, MAX_INPUT_FILE)?, ca_key_pair)
            .context("the stored CA is unreadable")?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(hostnames.to_vec())?;
        params.distinguished_name.push(DnType::CommonName, hostnames[0].clone());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &issuer)?;
        write_private(&server_key, key.serialize_pem().as_bytes())?;
        write_atomic(&server_cert, cert.pem().as_bytes(), 0o644)?;
        write_atomic(&names_file, wanted.as_bytes(), 0o644)?;
    }
    Ok((server_cert, server_key, ca_cert))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_once_and_reissues_only_for_new_names() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        load_or_create(&TlsFiles::default(), dir.path(), &names).unwrap();
        let ca1 = std::fs::read(dir.path().join(CA_CERT)).unwrap();
        let srv1 = std::fs::read(dir.path().join(SERVER_CERT)).unwrap();
        load_or_create(&TlsFiles::default(), dir.path(), &names).unwrap();
        assert_eq!(std::fs::read(dir.path().join(SERVER_CERT)).unwrap(), srv1);
        let more = vec!["hub.example".to_owned(), "localhost".to_owned()];
        let m = load_or_create(&TlsFiles::default(), dir.path(), &more).unwrap();
        assert_eq!(std::fs::read(dir.path().join(CA_CERT)).unwrap(), ca1);
        assert_ne!(std::fs::read(dir.path().join(SERVER_CERT)).unwrap(), srv1);
        assert!(m.ca_file.is_absolute());
    }
}
