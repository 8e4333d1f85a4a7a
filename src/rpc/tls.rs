//! TLS for the gRPC services: a server's certificate and key (and, for mutual TLS, the CA whose
//! certificates clients must present), and a client's trust roots (and its own certificate for
//! mutual TLS). Files are PEM; rustls does the rest (through tonic's `tls-ring` feature).
//!
//! Every file is read and checked when the process starts, so a wrong path or a file of the
//! wrong kind is an error naming the flag and the file, not a failed handshake later.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// Where a server's TLS files are.
#[derive(Debug, Clone, Default)]
pub struct ServerTlsFiles {
    /// The server's certificate chain (PEM).
    pub cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    pub key: Option<PathBuf>,
    /// Clients must present a certificate signed by this CA (PEM): mutual TLS.
    pub client_ca: Option<PathBuf>,
}

/// A server's TLS settings, read and checked.
#[derive(Debug, Clone)]
pub struct ServerTls {
    identity: Identity,
    client_ca: Option<Certificate>,
}

impl ServerTls {
    /// Reads the files named with the flags `--{prefix}cert`, `--{prefix}key` and
    /// `--{prefix}client-ca` (for the error messages). `Ok(None)`: no TLS (no files given).
    pub fn load(files: &ServerTlsFiles, prefix: &str) -> Result<Option<ServerTls>, String> {
        let (cert, key) = match (&files.cert, &files.key) {
            (None, None) => {
                if let Some(ca) = &files.client_ca {
                    return Err(format!(
                        "--{prefix}client-ca {}: client certificates need TLS; give --{prefix}cert and --{prefix}key too",
                        ca.display()
                    ));
                }
                return Ok(None);
            }
            (Some(_), None) => return Err(format!("--{prefix}cert needs --{prefix}key")),
            (None, Some(_)) => return Err(format!("--{prefix}key needs --{prefix}cert")),
            (Some(c), Some(k)) => (c, k),
        };
        let cert = read_pem(cert, &format!("--{prefix}cert"), &["CERTIFICATE"])?;
        let key = read_pem(key, &format!("--{prefix}key"), &["PRIVATE KEY"])?;
        let client_ca = read_ca(files.client_ca.as_deref(), &format!("--{prefix}client-ca"))?;
        let tls = ServerTls {
            identity: Identity::from_pem(cert, key),
            client_ca,
        };
        // Build the rustls configuration now: a key that does not match its certificate, or
        // that rustls cannot use, fails here rather than at the first connection.
        tonic::transport::Server::builder()
            .tls_config(tls.config())
            .map_err(|e| format!("--{prefix}cert/--{prefix}key: {}", error_chain(&e)))?;
        Ok(Some(tls))
    }

    /// Whether clients must present a certificate.
    pub fn requires_client_certificates(&self) -> bool {
        self.client_ca.is_some()
    }

    /// The configuration for `Server::tls_config`.
    pub(crate) fn config(&self) -> ServerTlsConfig {
        let config = ServerTlsConfig::new().identity(self.identity.clone());
        match &self.client_ca {
            Some(ca) => config.client_ca_root(ca.clone()),
            None => config,
        }
    }
}

/// Where a client's TLS files are.
#[derive(Debug, Clone, Default)]
pub struct ClientTlsFiles {
    /// The CA (PEM) that signed the servers' certificates; without it, the public web's roots
    /// (Mozilla's list) are trusted.
    pub ca: Option<PathBuf>,
    /// The client's own certificate chain (PEM), for servers that require one.
    pub cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub key: Option<PathBuf>,
}

/// A client's TLS settings, read and checked. Used for `https://` servers.
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    ca: Option<Certificate>,
    identity: Option<Identity>,
}

impl ClientTls {
    /// Reads the files named with the flags `--{prefix}ca`, `--{prefix}cert` and
    /// `--{prefix}key` (for the error messages). `Ok(None)` when none is given: `https://`
    /// servers are then checked against the public web's roots.
    pub fn load(files: &ClientTlsFiles, prefix: &str) -> Result<Option<ClientTls>, String> {
        let ca = read_ca(files.ca.as_deref(), &format!("--{prefix}ca"))?;
        let identity = match (&files.cert, &files.key) {
            (None, None) => None,
            (Some(_), None) => return Err(format!("--{prefix}cert needs --{prefix}key")),
            (None, Some(_)) => return Err(format!("--{prefix}key needs --{prefix}cert")),
            (Some(c), Some(k)) => Some(Identity::from_pem(
                read_pem(c, &format!("--{prefix}cert"), &["CERTIFICATE"])?,
                read_pem(k, &format!("--{prefix}key"), &["PRIVATE KEY"])?,
            )),
        };
        if ca.is_none() && identity.is_none() {
            return Ok(None);
        }
        Ok(Some(ClientTls { ca, identity }))
    }

    /// Whether it presents a client certificate.
    pub fn has_identity(&self) -> bool {
        self.identity.is_some()
    }

    /// The configuration for an `https://` endpoint; `domain` overrides the name the server's
    /// certificate must carry (the URL's host otherwise).
    pub(crate) fn config(&self, domain: Option<&str>) -> ClientTlsConfig {
        let mut config = ClientTlsConfig::new();
        config = match &self.ca {
            Some(ca) => config.ca_certificate(ca.clone()),
            None => config.with_webpki_roots(),
        };
        if let Some(id) = &self.identity {
            config = config.identity(id.clone());
        }
        if let Some(d) = domain {
            config = config.domain_name(d);
        }
        config
    }
}

/// Connects to `url`, over TLS with `tls` (or the public web's roots) when it is `https://`.
pub async fn connect(
    url: &str,
    tls: Option<&ClientTls>,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let mut endpoint = tonic::transport::Endpoint::from_shared(url.to_string())?;
    if url.starts_with("https://") {
        endpoint = endpoint.tls_config(tls.cloned().unwrap_or_default().config(None))?;
    }
    endpoint.connect().await
}

/// A PEM file's bytes, checked to hold a block whose label ends with one of `labels` (so that a
/// key given as a certificate, or a DER file, is named at once).
/// The CA certificate named with `flag`, if one is.
fn read_ca(path: Option<&Path>, flag: &str) -> Result<Option<Certificate>, String> {
    path.map(|p| read_pem(p, flag, &["CERTIFICATE"]).map(Certificate::from_pem))
        .transpose()
}

fn read_pem(path: &Path, flag: &str, labels: &[&str]) -> Result<Vec<u8>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{flag} {}: {e}", path.display()))?;
    let text = String::from_utf8_lossy(&bytes);
    let found = text.lines().any(|l| {
        l.strip_prefix("-----BEGIN ")
            .and_then(|rest| rest.strip_suffix("-----"))
            .is_some_and(|label| labels.iter().any(|want| label.ends_with(want)))
    });
    if !found {
        return Err(format!(
            "{flag} {}: no PEM block `-----BEGIN {}-----` in the file ({} bytes)",
            path.display(),
            labels.join("` or `"),
            bytes.len()
        ));
    }
    Ok(bytes)
}

/// A failed call's reason: the status message, then its sources (the transport's, the TLS
/// library's), joined by ": ".
pub fn status_reason(status: &tonic::Status) -> String {
    with_sources(
        status.message().to_string(),
        std::error::Error::source(status),
    )
}

/// What to try when a worker's health check failed with `why`, for the coordinator's flags:
/// the failures a TLS setup most often meets, which name their cause poorly on their own.
pub(crate) fn worker_hint(why: &str, https: bool, client_certificate: bool) -> &'static str {
    let closed = why.contains("broken pipe") || why.contains("reset by peer");
    if closed && https && !client_certificate {
        " (a worker that requires client certificates closes the connection like this: give \
         the coordinator one with --workers-tls-cert)"
    } else if closed && !https {
        " (if the worker serves TLS, name it with https://)"
    } else if why.contains("UnknownIssuer") {
        " (give the CA that signed the worker's certificate with --workers-tls-ca)"
    } else {
        ""
    }
}

/// An error with its sources, joined by ": ".
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    with_sources(e.to_string(), e.source())
}

/// `out`, then `source` and each of its sources, joined by ": " (one already in the text,
/// as some errors repeat their source's message, is left out).
fn with_sources(mut out: String, mut source: Option<&(dyn std::error::Error + 'static)>) -> String {
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// Each misuse names its flag and file: a missing file, a key given as a certificate, a
    /// certificate without its key, client certificates without TLS, a key that is not one, a
    /// key for another certificate.
    #[test]
    fn bad_files_are_named_with_their_flags() {
        let dir = std::env::temp_dir().join(format!("arbor-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert = write(&dir, "cert.pem", &ck.cert.pem());
        let key = write(&dir, "key.pem", &ck.signing_key.serialize_pem());
        let junk = write(
            &dir,
            "junk.pem",
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        );
        let missing = dir.join("nope.pem");
        let server = |cert: Option<&PathBuf>, key: Option<&PathBuf>, ca: Option<&PathBuf>| {
            ServerTls::load(
                &ServerTlsFiles {
                    cert: cert.cloned(),
                    key: key.cloned(),
                    client_ca: ca.cloned(),
                },
                "tls-",
            )
        };
        let err = |r: Result<Option<ServerTls>, String>| r.map(|_| ()).unwrap_err();

        assert!(server(None, None, None).unwrap().is_none());
        let ok = server(Some(&cert), Some(&key), Some(&cert))
            .unwrap()
            .unwrap();
        assert!(ok.requires_client_certificates());

        let e = err(server(Some(&missing), Some(&key), None));
        assert!(
            e.starts_with("--tls-cert ") && e.contains("nope.pem"),
            "{e}"
        );
        let e = err(server(Some(&key), Some(&key), None));
        assert!(
            e.starts_with("--tls-cert ") && e.contains("BEGIN CERTIFICATE"),
            "{e}"
        );
        let e = err(server(Some(&cert), Some(&cert), None));
        assert!(
            e.starts_with("--tls-key ") && e.contains("PRIVATE KEY"),
            "{e}"
        );
        assert_eq!(
            err(server(Some(&cert), None, None)),
            "--tls-cert needs --tls-key"
        );
        let e = err(server(None, None, Some(&cert)));
        assert!(
            e.starts_with("--tls-client-ca ") && e.contains("--tls-cert"),
            "{e}"
        );
        let e = err(server(Some(&cert), Some(&junk), None));
        assert!(e.starts_with("--tls-cert/--tls-key: "), "{e}");
        let other = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let other_key = write(&dir, "other-key.pem", &other.signing_key.serialize_pem());
        let e = err(server(Some(&cert), Some(&other_key), None));
        assert!(
            e.contains("KeyMismatch"),
            "a key for another certificate: {e}"
        );

        let client = |ca: Option<&PathBuf>, cert: Option<&PathBuf>, key: Option<&PathBuf>| {
            ClientTls::load(
                &ClientTlsFiles {
                    ca: ca.cloned(),
                    cert: cert.cloned(),
                    key: key.cloned(),
                },
                "workers-tls-",
            )
        };
        assert!(client(None, None, None).unwrap().is_none());
        assert!(client(Some(&cert), None, None).unwrap().is_some());
        let e = client(Some(&key), None, None).unwrap_err();
        assert!(
            e.starts_with("--workers-tls-ca ") && e.contains("key.pem"),
            "{e}"
        );
        let e = client(None, None, Some(&key)).unwrap_err();
        assert_eq!(e, "--workers-tls-key needs --workers-tls-cert");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
