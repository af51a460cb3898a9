//! TLS to PostgreSQL, as `CH_DATABASE_URL` asks for it in libpq's words: `sslmode=require`,
//! `verify-ca` or `verify-full` encrypt the sessions and verify the server's certificate and
//! host name, against the CA certificates of `sslrootcert=<PEM file>` when given, else the
//! system's (which `SSL_CERT_FILE` / `SSL_CERT_DIR` may point elsewhere). `disable` and
//! `prefer`, the default, connect without TLS.
//!
//! Stricter than libpq, where `require` encrypts without verifying: an unverified connection
//! protects only against a passive listener, and a worker's sessions carry every read model.
//! tokio-postgres knows `require` only, and no `sslrootcert`: both are taken out of the URL
//! here before it is parsed.

use std::path::PathBuf;
use std::sync::Arc;

use percent_encoding::percent_decode_str;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::RootCertStore;
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

/// A database URL with the TLS parameters tokio-postgres does not take out of it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Split {
    /// The URL as tokio-postgres parses it (`verify-*` as `require`, no `sslrootcert`).
    pub url: String,
    /// `sslrootcert`, percent-decoded.
    pub root_cert: Option<PathBuf>,
}

/// What becomes of one `key=value` parameter of a URL.
enum Param {
    Keep,
    Drop,
    Replace(String),
}

/// `sslrootcert` is taken out (into `root_cert`), `sslmode=verify-*` becomes `require`.
fn param(key: &str, value: String, root_cert: &mut Option<PathBuf>) -> Param {
    match (key, value.as_str()) {
        ("sslrootcert", _) => {
            *root_cert = Some(PathBuf::from(value));
            Param::Drop
        }
        ("sslmode", "verify-ca" | "verify-full") => Param::Replace("sslmode=require".into()),
        _ => Param::Keep,
    }
}

/// Takes `sslrootcert` out of a URL (`postgres://...?a=b&...`) or a key/value string
/// (`host=... sslmode=...`, values without spaces), and writes `sslmode=verify-ca` /
/// `verify-full` as `require`.
pub(crate) fn split(url: &str) -> Split {
    let mut root_cert = None;
    if !url.contains("sslrootcert") && !url.contains("verify-") {
        // Nothing to take out: the URL as it is (a key/value string keeps its quoting).
        return Split {
            url: url.to_owned(),
            root_cert,
        };
    }
    let mut rewrite = |pair: &str, decode: bool| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = if decode {
            percent_decode_str(v).decode_utf8_lossy().into_owned()
        } else {
            v.to_owned()
        };
        match param(k, v, &mut root_cert) {
            Param::Keep => Some(pair.to_owned()),
            Param::Drop => None,
            Param::Replace(s) => Some(s),
        }
    };
    let url = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        match url.split_once('?') {
            None => url.to_owned(),
            Some((base, query)) => {
                let params: Vec<String> =
                    query.split('&').filter_map(|p| rewrite(p, true)).collect();
                if params.is_empty() {
                    base.to_owned()
                } else {
                    format!("{base}?{}", params.join("&"))
                }
            }
        }
    } else {
        let words: Vec<String> = url
            .split_whitespace()
            .filter_map(|w| rewrite(w, false))
            .collect();
        words.join(" ")
    };
    Split { url, root_cert }
}

/// The TLS connector the sessions of `cfg` use: `None` without TLS (`disable`, `prefer`).
///
/// # Errors
/// A message when `sslrootcert` is given without TLS asked for, or cannot be read, or when
/// no CA certificate is found to verify the server with.
pub(crate) fn connector(
    mode: SslMode,
    root_cert: Option<&std::path::Path>,
) -> Result<Option<MakeRustlsConnect>, String> {
    if mode != SslMode::Require {
        return match root_cert {
            Some(p) => Err(format!(
                "sslrootcert={} needs sslmode=require, verify-ca or verify-full (prefer and \
                 disable connect without TLS)",
                p.display()
            )),
            None => Ok(None),
        };
    }
    let mut roots = RootCertStore::empty();
    match root_cert {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(Iterator::collect::<Result<Vec<_>, _>>)
                .map_err(|e| format!("sslrootcert={}: {e}", path.display()))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(format!(
                    "sslrootcert={}: no CA certificate in it",
                    path.display()
                ));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err(format!(
                    "sslmode=require: no CA certificates found on this system to verify the \
                     server with ({}); give them with sslrootcert=<PEM file>",
                    found
                        .errors
                        .first()
                        .map_or("none installed".to_owned(), ToString::to_string)
                ));
            }
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Some(MakeRustlsConnect::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(url: &str, root: Option<&str>) -> Split {
        Split {
            url: url.to_owned(),
            root_cert: root.map(PathBuf::from),
        }
    }

    #[test]
    fn tls_parameters_are_taken_out_of_urls_and_key_value_strings() {
        assert_eq!(split("postgres://u@h/db"), s("postgres://u@h/db", None));
        assert_eq!(
            split("postgres://u@h/db?sslmode=verify-full&sslrootcert=%2Fetc%2Fca%20x.pem"),
            s("postgres://u@h/db?sslmode=require", Some("/etc/ca x.pem"))
        );
        assert_eq!(
            split("postgresql://u@h/db?application_name=a&sslrootcert=/ca.pem&sslmode=prefer"),
            s(
                "postgresql://u@h/db?application_name=a&sslmode=prefer",
                Some("/ca.pem")
            )
        );
        assert_eq!(
            split("postgres://u@h/db?sslrootcert=/ca.pem"),
            s("postgres://u@h/db", Some("/ca.pem"))
        );
        assert_eq!(
            split("host=h user=u sslmode=verify-ca sslrootcert=/ca.pem dbname=d"),
            s("host=h user=u sslmode=require dbname=d", Some("/ca.pem"))
        );
    }

    #[test]
    fn a_root_certificate_without_tls_or_unreadable_is_an_error() {
        let e = connector(SslMode::Prefer, Some(std::path::Path::new("/ca.pem")))
            .err()
            .expect("an error");
        assert!(e.contains("needs sslmode=require"), "{e}");
        assert!(connector(SslMode::Prefer, None).unwrap().is_none());
        assert!(connector(SslMode::Disable, None).unwrap().is_none());
        let e = connector(
            SslMode::Require,
            Some(std::path::Path::new("/nonexistent.pem")),
        )
        .err()
        .expect("an error");
        assert!(e.contains("sslrootcert=/nonexistent.pem"), "{e}");
    }
}
