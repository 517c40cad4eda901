//! TLS shared by the services: one crypto provider (ring) for every rustls user in the
//! process, and reading a PEM file of CA certificates.
//!
//! reqwest, object_store, lapin and the PostgreSQL connector are all built on ring (the
//! workspace turns off their aws-lc-rs defaults), so a process holds exactly one provider;
//! [`install_crypto_provider`] makes it the process default as well, for any code that
//! asks rustls for "the" provider instead of naming one.

use std::{path::Path, sync::Arc};

use anyhow::{anyhow, bail};
use rustls::{
    crypto::CryptoProvider,
    pki_types::{pem::PemObject, CertificateDer},
};

/// The process's crypto provider: ring.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    install_crypto_provider();
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

/// Installs ring as the process-wide default rustls provider. Idempotent; a provider
/// installed earlier stays.
pub fn install_crypto_provider() {
    if CryptoProvider::get_default().is_none() {
        // Loses only a race with another thread installing it at the same moment.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// The certificates of a PEM file, at least one. `setting` names the configuration key
/// in errors (`amqp.ca_file`, `sslrootcert`). The errors carry no `io::Error`, so they
/// read as configuration mistakes rather than an outage to wait out.
pub fn read_pem_certificates(
    path: &Path,
    setting: &str,
) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path)
        .map_err(|e| anyhow!("{setting}: cannot read CA file {}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            anyhow!(
                "{setting}: CA file {} is not valid PEM: {e}",
                path.display()
            )
        })?;
    if certs.is_empty() {
        bail!(
            "{setting}: CA file {} holds no PEM certificate",
            path.display()
        );
    }
    Ok(certs)
}

/// The `rustls::Error` behind an error chain, if the failure was a TLS one (lapin and
/// tokio-rustls wrap it in an `io::Error`, which hides it from `source()`).
pub fn rustls_error<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut cause = Some(err);
    while let Some(e) = cause {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(tls) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(tls);
        }
        cause = e.source();
    }
    None
}

/// True when the TLS failure is the peer's certificate being refused (unknown issuer,
/// wrong name, expired, ...), as opposed to the connection breaking mid-handshake.
pub fn is_certificate_refusal(err: &rustls::Error) -> bool {
    matches!(
        err,
        rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_provider_is_installed() {
        install_crypto_provider();
        install_crypto_provider();
        let p = crypto_provider();
        assert!(!p.cipher_suites.is_empty());
        assert!(CryptoProvider::get_default().is_some());
    }

    #[test]
    fn ca_files_must_hold_certificates() {
        let dir = std::env::temp_dir().join(format!("conduit-tls-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let err = read_pem_certificates(&empty, "amqp.ca_file").unwrap_err();
        assert!(
            err.to_string().contains("amqp.ca_file") && err.to_string().contains("no PEM"),
            "{err:#}"
        );
        let missing = dir.join("missing.pem");
        let err = read_pem_certificates(&missing, "sslrootcert").unwrap_err();
        assert!(
            err.to_string().starts_with("sslrootcert: cannot read"),
            "{err:#}"
        );
        assert!(err
            .chain()
            .all(|c| c.downcast_ref::<std::io::Error>().is_none()));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn finds_rustls_errors_inside_io_errors() {
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        let any = anyhow::Error::new(io).context("connecting");
        let found = any.chain().find_map(rustls_error).unwrap();
        assert!(is_certificate_refusal(found));
        let plain = std::io::Error::other("reset");
        assert!(rustls_error(&plain).is_none());
    }
}
