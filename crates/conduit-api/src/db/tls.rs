//! TLS to PostgreSQL over rustls, with libpq's `sslmode` and `sslrootcert`.
//!
//! tokio-postgres knows `sslmode` `disable`, `prefer` and `require` only and leaves
//! certificate checks to the connector, so both parameters are taken out of
//! `database.url` here and the connector checks what libpq would:
//!
//! | `sslmode`     | TLS                              | certificate checked                |
//! |---------------|----------------------------------|------------------------------------|
//! | `disable`     | never                            | -                                  |
//! | `prefer`      | when the server offers it        | no (chain only with `sslrootcert`) |
//! | `require`     | always                           | no (chain only with `sslrootcert`) |
//! | `verify-ca`   | always                           | chain to a trusted CA              |
//! | `verify-full` | always                           | chain and host name                |
//!
//! The trusted CAs are the file `sslrootcert` names, or the system roots when it is unset
//! or `system`. As in libpq, `prefer` and `require` with an explicit `sslrootcert` check
//! the chain like `verify-ca`.

use std::{
    fmt,
    future::Future,
    io,
    path::PathBuf,
    pin::Pin,
    sync::Arc,
    task::{Context as TaskContext, Poll},
};

use anyhow::{anyhow, bail};
use rustls::{
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        WebPkiServerVerifier,
    },
    crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider},
    pki_types::{CertificateDer, ServerName, UnixTime},
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> anyhow::Result<Self> {
        Ok(match value {
            "disable" => Self::Disable,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            // libpq's `allow` tries plain text first; nothing here wants that.
            other => bail!(
                "database.url: sslmode {other:?} is not supported \
                 (use disable, prefer, require, verify-ca or verify-full)"
            ),
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }

    /// What tokio-postgres is told: it only decides whether TLS is attempted.
    pub fn for_driver(self) -> tokio_postgres::config::SslMode {
        match self {
            Self::Disable => tokio_postgres::config::SslMode::Disable,
            Self::Prefer => tokio_postgres::config::SslMode::Prefer,
            Self::Require | Self::VerifyCa | Self::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        }
    }
}

/// The TLS parameters of `database.url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsParams {
    pub mode: SslMode,
    /// `sslrootcert`; `None` (or `system`) means the system roots.
    pub root_cert: Option<String>,
}

impl Default for TlsParams {
    fn default() -> Self {
        Self {
            mode: SslMode::Prefer,
            root_cert: None,
        }
    }
}

impl TlsParams {
    fn ca_file(&self) -> Option<PathBuf> {
        self.root_cert
            .as_deref()
            .filter(|p| !p.is_empty() && *p != "system")
            .map(PathBuf::from)
    }

    /// How far the server's certificate is checked.
    fn check(&self) -> Check {
        match self.mode {
            SslMode::VerifyFull => Check::Full,
            SslMode::VerifyCa => Check::Chain,
            SslMode::Prefer | SslMode::Require if self.ca_file().is_some() => Check::Chain,
            SslMode::Disable | SslMode::Prefer | SslMode::Require => Check::None,
        }
    }

    /// The settings as an error names them: `sslmode=verify-full, sslrootcert=/ca.pem`.
    fn describe(&self) -> String {
        match &self.root_cert {
            Some(root) => format!("sslmode={}, sslrootcert={root}", self.mode.name()),
            None if self.check() == Check::None => format!("sslmode={}", self.mode.name()),
            None => format!("sslmode={}, system root certificates", self.mode.name()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    None,
    Chain,
    Full,
}

/// Takes `sslmode` and `sslrootcert` out of a connection string (URL or `key=value`
/// form), returning the rest for tokio-postgres and the two parameters.
pub fn split_tls_params(url: &str) -> anyhow::Result<(String, TlsParams)> {
    let mut mode = None;
    let mut root_cert = None;
    let mut take = |key: &str, value: String| -> anyhow::Result<bool> {
        match key {
            "sslmode" => mode = Some(SslMode::parse(&value)?),
            "sslrootcert" => root_cert = Some(value),
            _ => return Ok(false),
        }
        Ok(true)
    };
    let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        match url.split_once('?') {
            None => url.to_owned(),
            Some((base, query)) => {
                let mut kept = Vec::new();
                for pair in query.split('&').filter(|p| !p.is_empty()) {
                    let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                    if !take(&percent_decode(key)?, percent_decode(value)?)? {
                        kept.push(pair);
                    }
                }
                if kept.is_empty() {
                    base.to_owned()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
        }
    } else {
        let mut kept = Vec::new();
        for (key, value, raw) in key_values(url)? {
            if !take(&key, value)? {
                kept.push(raw);
            }
        }
        kept.join(" ")
    };
    let params = TlsParams {
        mode: mode.unwrap_or(SslMode::Prefer),
        root_cert,
    };
    Ok((rest, params))
}

fn percent_decode(s: &str) -> anyhow::Result<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| anyhow!("database.url: bad percent-encoding in {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| anyhow!("database.url: {s:?} is not UTF-8 once decoded"))
}

/// The `key = value` pairs of a libpq key/value connection string (values may be
/// single-quoted with backslash escapes), each with its original text.
fn key_values(s: &str) -> anyhow::Result<Vec<(String, String, &str)>> {
    let mut pairs = Vec::new();
    let mut rest = s.trim_start();
    while !rest.is_empty() {
        let start = rest;
        let eq = rest
            .find('=')
            .ok_or_else(|| anyhow!("database.url: expected key=value in {rest:?}"))?;
        let key = rest[..eq].trim().to_owned();
        rest = rest[eq + 1..].trim_start();
        let mut value = String::new();
        if let Some(quoted) = rest.strip_prefix('\'') {
            let mut chars = quoted.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, escaped)) = chars.next() {
                            value.push(escaped);
                        }
                    }
                    '\'' => {
                        end = Some(i + 1);
                        break;
                    }
                    c => value.push(c),
                }
            }
            let end = end.ok_or_else(|| anyhow!("database.url: unterminated quote"))?;
            rest = &quoted[end..];
        } else {
            let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
            value.push_str(&rest[..end]);
            rest = &rest[end..];
        }
        let raw = start[..start.len() - rest.len()].trim();
        pairs.push((key, value, raw));
        rest = rest.trim_start();
    }
    Ok(pairs)
}

/// The connector the pool and the start-up connections use. Cheap to clone.
#[derive(Clone)]
pub struct MakeRustls {
    config: Arc<ClientConfig>,
    describe: Arc<str>,
}

impl fmt::Debug for MakeRustls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MakeRustls")
            .field("settings", &self.describe)
            .finish()
    }
}

impl MakeRustls {
    /// Builds the client configuration for `params`, reading the CA file or the system
    /// roots now, so a missing or unreadable one stops the service at start-up.
    pub fn new(params: &TlsParams) -> anyhow::Result<Self> {
        let provider = conduit_core::tls::crypto_provider();
        let verifier: Arc<dyn ServerCertVerifier> = match params.check() {
            Check::None => Arc::new(AnyCertificate(provider.clone())),
            check => {
                let roots = Arc::new(roots(params)?);
                let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                    .build()
                    .map_err(|e| anyhow!("database.url {}: {e}", params.describe()))?;
                if check == Check::Full {
                    webpki
                } else {
                    Arc::new(ChainOnly(webpki))
                }
            }
        };
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| anyhow!("configuring TLS for the database: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(Self {
            config: Arc::new(config),
            describe: params.describe().into(),
        })
    }
}

fn roots(params: &TlsParams) -> anyhow::Result<RootCertStore> {
    let mut store = RootCertStore::empty();
    match params.ca_file() {
        Some(path) => {
            let certs =
                conduit_core::tls::read_pem_certificates(&path, "database.url sslrootcert")?;
            let (added, _ignored) = store.add_parsable_certificates(certs);
            if added == 0 {
                bail!(
                    "database.url sslrootcert: {} holds no usable CA certificate",
                    path.display()
                );
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _ignored) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                bail!(
                    "database.url {}: no system root certificates found; name a CA file with sslrootcert",
                    params.describe()
                );
            }
        }
    }
    Ok(store)
}

/// `require` and `prefer` without a CA: any certificate, as libpq; the handshake
/// signatures are still checked, so the server holds the certificate's key.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to a trusted CA; the host name is not compared.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The name is checked after the chain, so a name error means the chain passed.
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Why the TLS set-up or handshake with PostgreSQL failed. A refused certificate or a
/// TLS protocol error carries the `rustls::Error` (a configuration problem, reported at
/// once); a connection broken mid-handshake carries its `io::Error` (an outage, retried).
#[derive(Debug)]
pub enum TlsError {
    BadHostName {
        host: String,
        describe: Arc<str>,
    },
    Refused {
        host: String,
        describe: Arc<str>,
        cause: rustls::Error,
    },
    Broken(io::Error),
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadHostName { host, describe } => write!(
                f,
                "database.url ({describe}): {host:?} is not a valid TLS server name"
            ),
            Self::Refused {
                host,
                describe,
                cause,
            } if conduit_core::tls::is_certificate_refusal(cause) => write!(
                f,
                "the certificate of PostgreSQL server {host} was refused under database.url {describe}"
            ),
            Self::Refused { host, describe, .. } => write!(
                f,
                "TLS with PostgreSQL server {host} failed under database.url {describe}"
            ),
            Self::Broken(_) => f.write_str("the connection broke during the TLS handshake"),
        }
    }
}

impl std::error::Error for TlsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::BadHostName { .. } => None,
            Self::Refused { cause, .. } => Some(cause),
            Self::Broken(e) => Some(e),
        }
    }
}

impl<S> MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = TlsError;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, TlsError> {
        let name = ServerName::try_from(domain.to_owned()).map_err(|_| TlsError::BadHostName {
            host: domain.to_owned(),
            describe: self.describe.clone(),
        })?;
        Ok(RustlsConnect {
            config: self.config.clone(),
            name,
            describe: self.describe.clone(),
        })
    }
}

/// One connection's TLS handshake.
pub struct RustlsConnect {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
    describe: Arc<str>,
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = TlsError;
    type Future = Pin<Box<dyn Future<Output = Result<RustlsStream<S>, TlsError>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let host = self.name.to_str().into_owned();
            tokio_rustls::TlsConnector::from(self.config)
                .connect(self.name, stream)
                .await
                .map(RustlsStream)
                .map_err(|e| match conduit_core::tls::rustls_error(&e) {
                    Some(cause) => TlsError::Refused {
                        host,
                        describe: self.describe,
                        cause: cause.clone(),
                    },
                    None => TlsError::Broken(e),
                })
        })
    }
}

/// A TLS stream to PostgreSQL.
pub struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for RustlsStream<S> {
    /// No `tls-server-end-point` binding: SCRAM authenticates without it (tokio-postgres'
    /// default `channel_binding=prefer`).
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_parameters_are_taken_out() {
        let (rest, p) = split_tls_params(
            "postgres://u:p@db.example:5432/conduit?sslmode=verify-full&application_name=x&sslrootcert=%2Fetc%2Fca.pem",
        )
        .unwrap();
        assert_eq!(
            rest,
            "postgres://u:p@db.example:5432/conduit?application_name=x"
        );
        assert_eq!(p.mode, SslMode::VerifyFull);
        assert_eq!(p.root_cert.as_deref(), Some("/etc/ca.pem"));
        assert_eq!(p.check(), Check::Full);

        let (rest, p) = split_tls_params("postgresql://h/db?sslmode=require").unwrap();
        assert_eq!(rest, "postgresql://h/db");
        assert_eq!(p.check(), Check::None);
        assert_eq!(
            p.mode.for_driver(),
            tokio_postgres::config::SslMode::Require
        );

        let (rest, p) = split_tls_params("postgres://h/db").unwrap();
        assert_eq!(rest, "postgres://h/db");
        assert_eq!(p, TlsParams::default());
        assert!(split_tls_params("postgres://h/db?sslmode=allow").is_err());
        assert!(split_tls_params("postgres://h/db?sslmode=verify").is_err());
    }

    #[test]
    fn key_value_parameters_are_taken_out() {
        let (rest, p) = split_tls_params(
            "host=127.0.0.1 user=postgres sslmode = verify-ca sslrootcert='/tmp/my ca.pem' dbname=x",
        )
        .unwrap();
        assert_eq!(rest, "host=127.0.0.1 user=postgres dbname=x");
        assert_eq!(p.mode, SslMode::VerifyCa);
        assert_eq!(p.root_cert.as_deref(), Some("/tmp/my ca.pem"));
        let parsed: tokio_postgres::Config = rest.parse().unwrap();
        assert_eq!(parsed.get_dbname(), Some("x"));
    }

    #[test]
    fn a_ca_file_makes_require_check_the_chain_as_libpq_does() {
        let p = TlsParams {
            mode: SslMode::Require,
            root_cert: Some("/ca.pem".into()),
        };
        assert_eq!(p.check(), Check::Chain);
        let system = TlsParams {
            mode: SslMode::Require,
            root_cert: Some("system".into()),
        };
        assert_eq!(system.check(), Check::None);
        let ca = TlsParams {
            mode: SslMode::VerifyCa,
            root_cert: None,
        };
        assert_eq!(ca.check(), Check::Chain);
        assert_eq!(ca.describe(), "sslmode=verify-ca, system root certificates");
    }

    #[test]
    fn a_missing_ca_file_is_a_configuration_error() {
        let p = TlsParams {
            mode: SslMode::VerifyFull,
            root_cert: Some("/nonexistent/conduit-ca.pem".into()),
        };
        let err = MakeRustls::new(&p).unwrap_err();
        let text = format!("{err:#}");
        assert!(
            text.contains("sslrootcert") && text.contains("/nonexistent/conduit-ca.pem"),
            "{text}"
        );
        assert!(err.chain().all(|c| c.downcast_ref::<io::Error>().is_none()));
    }
}
