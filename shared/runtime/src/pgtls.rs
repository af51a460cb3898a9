//! TLS to PostgreSQL, as `CH_DATABASE_URL` asks for it in libpq's words: `sslmode=require`,
//! `verify-ca` or `verify-full` encrypt the sessions and verify the server's certificate and
//! host name, against the CA certificates of `sslrootcert=<PEM file>` when given, else the
//! system's (`sslrootcert=system`, or none; `SSL_CERT_FILE` / `SSL_CERT_DIR` may point
//! elsewhere). `disable` and `prefer`, the default, connect without TLS, and so do Unix
//! sockets, as with libpq.
//!
//! Stricter than libpq, where `require` encrypts without verifying: an unverified connection
//! protects only against a passive listener, and a worker's sessions carry every read model.
//! tokio-postgres knows `require` only, and no `sslrootcert`: both are taken out of a URL
//! (`postgres://...?sslmode=verify-full&sslrootcert=...`) here before it is parsed. A
//! key/value string (`host=... sslmode=require`) is passed on as it is: there, tokio-postgres
//! refuses `verify-*` and `sslrootcert`, and [`key_value_hint`] says to use a URL.

use std::path::PathBuf;
use std::sync::Arc;

use percent_encoding::percent_decode_str;
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
    Replace(&'static str),
}

/// `sslrootcert` is taken out (into `root_cert`), `sslmode=verify-*` becomes `require`.
fn param(key: &str, value: String, root_cert: &mut Option<PathBuf>) -> Param {
    match (key, value.as_str()) {
        ("sslrootcert", _) => {
            *root_cert = Some(PathBuf::from(value));
            Param::Drop
        }
        ("sslmode", "verify-ca" | "verify-full") => Param::Replace("sslmode=require"),
        _ => Param::Keep,
    }
}

/// Takes `sslrootcert` out of a URL (`postgres://...?a=b&...`; the parameters kept are copied
/// as they were) and writes `sslmode=verify-ca` / `verify-full` as `require`. Anything else
/// (a key/value string) is returned as it is.
pub(crate) fn split(url: &str) -> Split {
    let unchanged = || Split {
        url: url.to_owned(),
        root_cert: None,
    };
    let Some(rest) = after_scheme(url) else {
        return unchanged();
    };
    // The query starts at the first `?` after the credentials (which end at the first `@`,
    // as tokio-postgres reads them: a password may hold a `?`).
    let after_credentials = rest.find('@').map_or(0, |at| at + 1);
    let Some(q) = rest[after_credentials..].find('?') else {
        return unchanged();
    };
    let query_at = url.len() - rest.len() + after_credentials + q;
    let (base, query) = (&url[..query_at], &url[query_at + 1..]);
    let mut root_cert = None;
    let params: Vec<&str> = query
        .split('&')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode_str(v).decode_utf8_lossy().into_owned();
            match param(k, v, &mut root_cert) {
                Param::Keep => Some(pair),
                Param::Drop => None,
                Param::Replace(s) => Some(s),
            }
        })
        .collect();
    let url = if params.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", params.join("&"))
    };
    Split { url, root_cert }
}

/// What follows the scheme of a URL (`postgres://` or `postgresql://`); `None` for a
/// key/value string.
fn after_scheme(url: &str) -> Option<&str> {
    url.strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
}

/// What to add to tokio-postgres' refusal of a key/value string that asks for TLS in libpq's
/// words it does not know (`None` for any other refusal).
pub(crate) fn key_value_hint(url: &str) -> Option<&'static str> {
    let libpq_only = url.contains("sslrootcert") || url.contains("verify-");
    (after_scheme(url).is_none() && libpq_only).then_some(
        "sslmode=verify-ca/verify-full and sslrootcert are read from a URL \
         (postgres://user@host/db?sslmode=verify-full&sslrootcert=/path/ca.pem), not from a \
         key/value string",
    )
}

/// The TLS connector of sessions with `sslmode` `mode` (after [`split`]) and `sslrootcert`
/// `root_cert`: `None` without TLS (`disable`, `prefer`).
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
    match root_cert.filter(|p| *p != std::path::Path::new("system")) {
        Some(path) => {
            let certs =
                crate::config::pem_certificates(path).map_err(|e| format!("sslrootcert={e}"))?;
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
    fn tls_parameters_are_taken_out_of_urls_only() {
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
        // A password may hold `?`, `verify-` and `sslrootcert`: the query starts after it.
        assert_eq!(
            split("postgres://u:a?sslrootcert=verify-@h/db?sslmode=verify-full"),
            s(
                "postgres://u:a?sslrootcert=verify-@h/db?sslmode=require",
                None
            )
        );
        assert_eq!(
            split("postgres://u:a?b@h/db"),
            s("postgres://u:a?b@h/db", None)
        );
        // Key/value strings are passed on untouched (their quoting is tokio-postgres' to read).
        let kv = "host=h password='a  b verify-x' sslmode=verify-ca sslrootcert=/ca.pem";
        assert_eq!(split(kv), s(kv, None));
        assert!(key_value_hint(kv).is_some());
        assert!(key_value_hint("host=h password='a  b'").is_none());
        assert!(key_value_hint("postgres://h/db?sslmode=verify-full").is_none());
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
