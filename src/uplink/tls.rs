//! The rustls client configuration of the upstream connection (ring provider).
//!
//! Invariants:
//! - The broker is verified against the CA file when one is configured, and against the
//!   Mozilla roots compiled into the binary (webpki-roots) otherwise; never unverified.
//! - Certificate and key files are read once, when the uplink starts, so a broken file
//!   is reported at startup with its path rather than at every reconnect.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};

use super::config::TlsConfig;
use super::error::Error;

/// A TLS setting that is wrong, with nothing underneath.
fn tls_error(what: impl Into<String>) -> Error {
    Error::Tls {
        what: what.into(),
        source: None,
    }
}

/// A TLS setting that is wrong because of `source`, which stays attached.
fn tls_failure(
    what: impl Into<String>,
    source: impl std::error::Error + Send + Sync + 'static,
) -> Error {
    Error::Tls {
        what: what.into(),
        source: Some(Box::new(source)),
    }
}

fn open(path: &Path, what: &str) -> Result<BufReader<File>, Error> {
    File::open(path)
        .map(BufReader::new)
        .map_err(|e| tls_failure(format!("cannot read the {what} {}", path.display()), e))
}

fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = rustls_pemfile::certs(&mut open(path, what)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_failure(format!("the {what} {} is not valid PEM", path.display()), e))?;
    if certs.is_empty() {
        return Err(tls_error(format!(
            "the {what} {} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    rustls_pemfile::private_key(&mut open(path, "key file")?)
        .map_err(|e| {
            tls_failure(
                format!("the key file {} is not valid PEM", path.display()),
                e,
            )
        })?
        .ok_or_else(|| {
            tls_error(format!(
                "the key file {} holds no PKCS#8, PKCS#1 or SEC1 private key",
                path.display()
            ))
        })
}

/// Builds the client configuration: trust roots, optional client certificate, ALPN.
///
/// # Errors
/// [`Error::Tls`] naming the file or setting that is wrong.
pub fn client_config(tls: &TlsConfig) -> Result<Arc<ClientConfig>, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_failure("TLS protocol versions", e))?;
    let mut roots = RootCertStore::empty();
    match &tls.ca_file {
        Some(path) => {
            for cert in read_certs(path, "CA file")? {
                roots.add(cert).map_err(|e| {
                    tls_failure(
                        format!(
                            "a certificate in the CA file {} is unusable",
                            path.display()
                        ),
                        e,
                    )
                })?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let builder = builder.with_root_certificates(roots);
    let mut config = match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => {
            let chain = read_certs(cert, "client certificate file")?;
            builder
                .with_client_auth_cert(chain, read_key(key)?)
                .map_err(|e| {
                    tls_failure(
                        format!(
                            "client certificate {} and key {} do not fit together",
                            cert.display(),
                            key.display()
                        ),
                        e,
                    )
                })?
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = tls.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(Arc::new(config))
}

/// A failed handshake with `host`, with what to do about the common certificate
/// problems: a broker whose CA this gateway does not know (a private CA, a self-signed
/// certificate), a certificate for another name, one that expired (or a clock that is
/// wrong, as on a Pi without a real-time clock).
pub fn handshake_error(host: &str, source: std::io::Error) -> Error {
    use rustls::CertificateError;
    let certificate = source
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .and_then(|e| match e {
            rustls::Error::InvalidCertificate(cert) => Some(cert),
            _ => None,
        });
    let hint = match certificate {
        Some(CertificateError::UnknownIssuer) => {
            "; the broker's certificate is signed by a CA this gateway does not trust: set upstream.tls.ca_file to that CA's PEM file"
        }
        Some(CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }) => {
            "; the broker's certificate is for another name: connect by the name it has, or set upstream.tls.server_name"
        }
        Some(CertificateError::Expired | CertificateError::ExpiredContext { .. }) => {
            "; the broker's certificate has expired, or this gateway's clock is wrong (check timedatectl)"
        }
        _ => "",
    };
    tls_failure(format!("handshake with {host}{hint}"), source)
}

/// The name for SNI and certificate verification: the configured one or the URL host.
///
/// # Errors
/// [`Error::Tls`] when the name is neither a DNS name nor an IP address.
pub fn server_name(tls: &TlsConfig, url_host: &str) -> Result<ServerName<'static>, Error> {
    let name = tls.server_name.as_deref().unwrap_or(url_host);
    ServerName::try_from(name.to_owned())
        .map_err(|_| tls_error(format!("{name:?} is not a valid TLS server name")))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Files {
        dir: tempfile::TempDir,
    }

    impl Files {
        fn path(&self, name: &str) -> std::path::PathBuf {
            self.dir.path().join(name)
        }
    }

    fn generate() -> Files {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["client".to_owned()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.path().join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).unwrap();
        std::fs::write(dir.path().join("empty.pem"), "").unwrap();
        Files { dir }
    }

    #[test]
    fn builds_with_ca_file_client_cert_and_alpn() {
        let files = generate();
        let tls = TlsConfig {
            ca_file: Some(files.path("ca.pem")),
            cert_file: Some(files.path("cert.pem")),
            key_file: Some(files.path("key.pem")),
            server_name: None,
            alpn: vec!["x-amzn-mqtt-ca".to_owned()],
        };
        let config = client_config(&tls).unwrap();
        assert!(config.client_auth_cert_resolver.has_certs());
        assert_eq!(config.alpn_protocols, [b"x-amzn-mqtt-ca".to_vec()]);
    }

    #[test]
    fn builds_with_builtin_roots() {
        let config = client_config(&TlsConfig::default()).unwrap();
        assert!(!config.client_auth_cert_resolver.has_certs());
    }

    #[test]
    fn file_problems_name_the_file() {
        let files = generate();
        let missing = TlsConfig {
            ca_file: Some(files.path("missing.pem")),
            ..TlsConfig::default()
        };
        let err = client_config(&missing).unwrap_err().to_string();
        assert!(
            err.contains("missing.pem") && err.contains("CA file"),
            "{err}"
        );

        let empty = TlsConfig {
            ca_file: Some(files.path("empty.pem")),
            ..TlsConfig::default()
        };
        let err = client_config(&empty).unwrap_err().to_string();
        assert!(err.contains("no PEM certificate"), "{err}");

        let key_is_cert = TlsConfig {
            cert_file: Some(files.path("cert.pem")),
            key_file: Some(files.path("cert.pem")),
            ..TlsConfig::default()
        };
        let err = client_config(&key_is_cert).unwrap_err().to_string();
        assert!(err.contains("no PKCS#8"), "{err}");

        let mismatched = TlsConfig {
            cert_file: Some(files.path("ca.pem")),
            key_file: Some(files.path("key.pem")),
            ..TlsConfig::default()
        };
        let err = client_config(&mismatched).unwrap_err().to_string();
        assert!(err.contains("do not fit together"), "{err}");
    }

    /// Regression: `UnknownIssuer` came with no hint of the setting that fixes it.
    #[test]
    fn an_unknown_issuer_points_at_the_ca_file_setting() {
        let source = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        let text = handshake_error("broker.example.net", source).to_string();
        assert!(
            text.starts_with("TLS: handshake with broker.example.net; the broker's certificate is signed by a CA this gateway does not trust: set upstream.tls.ca_file"),
            "{text}"
        );
        assert!(text.ends_with("UnknownIssuer"), "{text}");
        let other = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        let text = handshake_error("h", other).to_string();
        assert!(text.starts_with("TLS: handshake with h: "), "{text}");
    }

    #[test]
    fn server_name_defaults_to_the_url_host() {
        let tls = TlsConfig::default();
        assert_eq!(
            server_name(&tls, "broker.example.com").unwrap(),
            ServerName::try_from("broker.example.com").unwrap()
        );
        assert!(matches!(
            server_name(&tls, "127.0.0.1").unwrap(),
            ServerName::IpAddress(_)
        ));
        let named = TlsConfig {
            server_name: Some("iot.example.com".to_owned()),
            ..TlsConfig::default()
        };
        assert_eq!(
            server_name(&named, "10.0.0.1").unwrap(),
            ServerName::try_from("iot.example.com").unwrap()
        );
        let bad = TlsConfig {
            server_name: Some("bad name".to_owned()),
            ..TlsConfig::default()
        };
        assert!(server_name(&bad, "h").is_err());
    }
}
