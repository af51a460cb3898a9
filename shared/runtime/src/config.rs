//! One `Config` for every binary, read from `CH_*` environment variables (README lists them).

use std::time::Duration;

use thiserror::Error;

/// How the read side keeps up with the write side (issue: synchronisation modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// Projectors pull and apply asynchronously (default).
    Eventual,
    /// Projectors apply up to `batch_max` events or `batch_wait` per transaction.
    Batch,
    /// Command replies wait until the projectors applied their event.
    Immediate,
    /// Batch size follows the lag.
    Adaptive,
}

impl SyncMode {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "eventual" => Some(SyncMode::Eventual),
            "batch" => Some(SyncMode::Batch),
            "immediate" => Some(SyncMode::Immediate),
            "adaptive" => Some(SyncMode::Adaptive),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SyncMode::Eventual => "eventual",
            SyncMode::Batch => "batch",
            SyncMode::Immediate => "immediate",
            SyncMode::Adaptive => "adaptive",
        }
    }
}

#[derive(Debug, Error)]
#[error("configuration: {0}")]
pub struct ConfigError(pub String);

/// TLS to NATS beyond what a `tls://` URL and the system's CA certificates give.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatsTls {
    /// `CH_NATS_CA_FILE`: PEM CA certificates the server's certificate is verified against
    /// (instead of the system's); TLS is then required.
    pub ca_file: Option<std::path::PathBuf>,
    /// `CH_NATS_CERT_FILE` and `CH_NATS_KEY_FILE`: the client certificate and its key, PEM,
    /// for a server that verifies its clients (`verify: true`); TLS is then required.
    pub client_cert: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

impl NatsTls {
    /// Reads each file: the CA file must hold a certificate, the client certificate file one
    /// too and the key file a private key, all PEM. (async-nats reads them only as it
    /// connects, and then says no more than "TLS error".)
    ///
    /// # Errors
    /// A [`ConfigError`] naming the variable, the file and what is wrong with it.
    pub fn check(&self) -> Result<(), ConfigError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::PrivateKeyDer;
        let certs = |var: &str, path: &std::path::Path| {
            pem_certificates(path).map_err(|e| ConfigError(format!("{var}={e}")))
        };
        if let Some(ca) = &self.ca_file {
            certs("CH_NATS_CA_FILE", ca)?;
        }
        if let Some((cert, key)) = &self.client_cert {
            certs("CH_NATS_CERT_FILE", cert)?;
            PrivateKeyDer::from_pem_file(key)
                .map_err(|e| ConfigError(format!("CH_NATS_KEY_FILE={}: {e}", key.display())))?;
        }
        Ok(())
    }
}

/// The PEM certificates of the file at `path`, at least one (CA files of NATS and Postgres,
/// a client certificate).
///
/// # Errors
/// `<path>: <why>` when the file cannot be read or holds no certificate.
pub(crate) fn pem_certificates(
    path: &std::path::Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let found = rustls::pki_types::CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if found.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(found)
}

#[derive(Debug, Clone)]
pub struct Config {
    /// `CH_NATS_URL`, default `nats://127.0.0.1:14222` (the project's own nats-server).
    pub nats_url: String,
    /// `CH_NATS_CA_FILE`, `CH_NATS_CERT_FILE` and `CH_NATS_KEY_FILE`: TLS to NATS with a CA
    /// of one's own and a client certificate (mutual TLS).
    pub nats_tls: NatsTls,
    /// `CH_DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/cipherhorizon`.
    pub database_url: String,
    /// `CH_DB_SCHEMA`, default `public`: the Postgres schema of the read models.
    pub db_schema: String,
    /// `CH_SUBJECT_PREFIX`, default `ch`.
    pub prefix: String,
    /// `CH_SYNC`, default `eventual`.
    pub sync: SyncMode,
    /// `CH_BATCH_MAX`, default 500: most events per projector transaction.
    pub batch_max: usize,
    /// `CH_BATCH_WAIT_MS`, default 0 (5 in `batch` mode): how long a projector waits to fill a batch.
    pub batch_wait: Duration,
    /// `CH_REPLAY_BATCH_MAX`, default 50000: most events per transaction when a projector
    /// replays the stream (a rebuild, a catch-up after downtime or a reset); it receives,
    /// decodes and applies them in chunks of a quarter of that, at most 5000.
    pub replay_batch_max: usize,
    /// `CH_IMMEDIATE_TIMEOUT_MS`, default 2000: bound of the `immediate` mode's wait.
    pub immediate_timeout: Duration,
    /// `CH_QUERY_TIMEOUT_MS`, default 10000: how long a query worker's read of the read models
    /// may take (after any `min_stream_seq` wait) before the query is answered `unavailable`.
    pub query_timeout: Duration,
    /// `CH_DB_POOL`, default 16: Postgres connections per process.
    pub db_pool_size: usize,
    /// `CH_LOG_FORMAT`: `text` (default) or `json`.
    pub log_json: bool,
    /// `CH_WORKER_THREADS`, default 1: Tokio runtime threads of a worker binary. 1 runs the
    /// current-thread runtime, the cheapest where many small processes share a few cores
    /// (no cross-thread wake-ups); more run the multi-thread runtime with that many.
    pub worker_threads: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            nats_url: "nats://127.0.0.1:14222".into(),
            nats_tls: NatsTls::default(),
            database_url: "postgres://postgres@127.0.0.1:5432/cipherhorizon".into(),
            db_schema: "public".into(),
            prefix: "ch".into(),
            sync: SyncMode::Eventual,
            batch_max: 500,
            batch_wait: Duration::ZERO,
            replay_batch_max: 50_000,
            immediate_timeout: Duration::from_millis(2000),
            query_timeout: Duration::from_millis(10_000),
            db_pool_size: 16,
            log_json: false,
            worker_threads: 1,
        }
    }
}

fn valid_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl Config {
    /// What a worker tells about its configuration in its micro service's metadata
    /// (`nats micro info`), so that a client (the benchmark) reads the deployment's mode
    /// rather than assume its own environment's: `ch_sync` and the figures it turns on.
    pub fn service_metadata(&self) -> std::collections::HashMap<String, String> {
        [
            ("ch_sync", self.sync.as_str().to_owned()),
            ("ch_batch_max", self.batch_max.to_string()),
            ("ch_batch_wait_ms", self.batch_wait.as_millis().to_string()),
            ("ch_replay_batch_max", self.replay_batch_max.to_string()),
            (
                "ch_immediate_timeout_ms",
                self.immediate_timeout.as_millis().to_string(),
            ),
            ("ch_db_pool", self.db_pool_size.to_string()),
            ("ch_worker_threads", self.worker_threads.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// The Tokio runtime a worker binary runs on (`CH_WORKER_THREADS`).
    ///
    /// # Errors
    /// When the runtime cannot be built (out of threads or file descriptors).
    pub fn runtime(&self) -> std::io::Result<tokio::runtime::Runtime> {
        if self.worker_threads <= 1 {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        } else {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(self.worker_threads)
                .enable_all()
                .build()
        }
    }

    /// Reads the environment.
    ///
    /// # Errors
    /// [`ConfigError`] naming the variable when a value is invalid.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads configuration from any key lookup (tests pass a map).
    ///
    /// # Errors
    /// [`ConfigError`] naming the variable when a value is invalid.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut c = Config::default();
        if let Some(v) = get("CH_NATS_URL") {
            if v.trim().is_empty() {
                return Err(ConfigError(
                    "CH_NATS_URL is empty: a server URL (nats://host:4222), or several \
                     separated by commas; unset, it is nats://127.0.0.1:14222"
                        .into(),
                ));
            }
            // A Secret made from a file often ends in a newline.
            c.nats_url = v.trim().to_owned();
        }
        let path = |k: &str| {
            get(k)
                .filter(|v| !v.is_empty())
                .map(std::path::PathBuf::from)
        };
        c.nats_tls = NatsTls {
            ca_file: path("CH_NATS_CA_FILE"),
            client_cert: match (path("CH_NATS_CERT_FILE"), path("CH_NATS_KEY_FILE")) {
                (Some(cert), Some(key)) => Some((cert, key)),
                (None, None) => None,
                _ => {
                    return Err(ConfigError(
                        "CH_NATS_CERT_FILE and CH_NATS_KEY_FILE go together (a client \
                         certificate and its key)"
                            .into(),
                    ))
                }
            },
        };
        if let Some(v) = get("CH_DATABASE_URL") {
            // Trimmed: a newline from a Secret's file was taken into the database's name (and
            // that database created, empty).
            let v = v.trim();
            if v.is_empty() {
                return Err(ConfigError(
                    "CH_DATABASE_URL is empty: a PostgreSQL URL \
                     (postgres://user@host:5432/database); unset, it is \
                     postgres://postgres@127.0.0.1:5432/cipherhorizon"
                        .into(),
                ));
            }
            c.database_url = v.to_owned();
        }
        if let Some(v) = get("CH_DB_SCHEMA") {
            // Lower case: the sessions' search_path names it unquoted, which Postgres folds to
            // lower case, while `CREATE SCHEMA` quotes it (`MySchema` made one, used another).
            if !valid_token(&v) || v.bytes().any(|b| b.is_ascii_uppercase()) {
                return Err(ConfigError(format!(
                    "CH_DB_SCHEMA={v:?} must match [a-z0-9_-]{{1,32}}"
                )));
            }
            if v.starts_with("pg_") {
                return Err(ConfigError(format!(
                    "CH_DB_SCHEMA={v:?}: PostgreSQL reserves schema names that begin with pg_ \
                     (one derived from CH_SUBJECT_PREFIX too: set CH_DB_SCHEMA)"
                )));
            }
            c.db_schema = v;
        }
        if let Some(v) = get("CH_SUBJECT_PREFIX") {
            if !valid_token(&v) {
                return Err(ConfigError(format!(
                    "CH_SUBJECT_PREFIX={v:?} must be one subject token of [A-Za-z0-9_-]{{1,32}}"
                )));
            }
            c.prefix = v;
        }
        if let Some(v) = get("CH_SYNC") {
            c.sync = SyncMode::parse(&v).ok_or_else(|| {
                ConfigError(format!(
                    "CH_SYNC={v:?}: expected eventual, batch, immediate or adaptive"
                ))
            })?;
            if c.sync == SyncMode::Batch {
                c.batch_wait = Duration::from_millis(5);
            }
        }
        // A number out of its range is refused, naming the range, as any other bad value.
        let num =
            |k: &str, range: std::ops::RangeInclusive<u64>| -> Result<Option<u64>, ConfigError> {
                get(k)
                    .map(|v| match v.parse::<u64>() {
                        Ok(n) if range.contains(&n) => Ok(n),
                        Ok(_) => Err(ConfigError(format!(
                            "{k}={v:?} is out of range: {} to {}",
                            range.start(),
                            range.end()
                        ))),
                        Err(_) => Err(ConfigError(format!("{k}={v:?} is not a whole number"))),
                    })
                    .transpose()
            };
        if let Some(n) = num("CH_BATCH_MAX", 1..=10_000)? {
            c.batch_max = n as usize;
        }
        if let Some(n) = num("CH_REPLAY_BATCH_MAX", 1..=1_000_000)? {
            c.replay_batch_max = n as usize;
        }
        if let Some(n) = num("CH_BATCH_WAIT_MS", 0..=60_000)? {
            c.batch_wait = Duration::from_millis(n);
        }
        if let Some(n) = num("CH_IMMEDIATE_TIMEOUT_MS", 0..=60_000)? {
            c.immediate_timeout = Duration::from_millis(n);
        }
        if let Some(n) = num("CH_QUERY_TIMEOUT_MS", 100..=600_000)? {
            c.query_timeout = Duration::from_millis(n);
        }
        if let Some(n) = num("CH_WORKER_THREADS", 1..=256)? {
            c.worker_threads = n as usize;
        }
        if let Some(n) = num("CH_DB_POOL", 1..=256)? {
            c.db_pool_size = n as usize;
        }
        c.log_json = match get("CH_LOG_FORMAT").as_deref() {
            None | Some("text") => false,
            Some("json") => true,
            Some(other) => {
                return Err(ConfigError(format!(
                    "CH_LOG_FORMAT={other:?}: expected text or json"
                )))
            }
        };
        Ok(c)
    }
}

/// A NATS or Postgres address with its password hidden, for logs and messages: the
/// `user:password@` of a URL (of each, in a comma-separated list of NATS servers), and a
/// `password` parameter (`?password=...`, or `password = '...'` in a key=value connection
/// string). A Postgres URL's credentials end at its first `@`, as tokio-postgres reads them;
/// anything else is taken for a NATS server (async-nats takes one without a scheme, or in
/// capitals), whose credentials are hidden up to its last `@` (a password may hold `@`, `/`
/// or `#`), a user alone (a token) with them.
pub fn redact(url: &str) -> String {
    hide_password_parameters(url)
        .split(',')
        .map(|one| {
            let (scheme, rest) = match one.split_once("://") {
                Some((scheme, rest)) => (Some(scheme), rest),
                None => (None, one),
            };
            let postgres =
                scheme.is_some_and(|s| s.trim().to_ascii_lowercase().starts_with("postgres"));
            if postgres {
                return match rest.split_once('@') {
                    Some((userinfo, host)) => match userinfo.split_once(':') {
                        Some((user, _)) => {
                            format!("{}://{user}:***@{host}", scheme.unwrap_or_default())
                        }
                        None => one.to_owned(),
                    },
                    None => one.to_owned(),
                };
            }
            if scheme.is_none() && rest.contains('=') {
                // A key=value connection string: its password is hidden above.
                return one.to_owned();
            }
            let shown = scheme.map_or(String::new(), |s| format!("{s}://"));
            match rest.rfind('@') {
                Some(at) => match rest[..at].split_once(':') {
                    Some((user, _)) => format!("{shown}{user}:***@{}", &rest[at + 1..]),
                    None => format!("{shown}***@{}", &rest[at + 1..]),
                },
                None => one.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Every `password` key's value as `***`: in URL parameters (up to the next `&`) and in
/// key=value strings (spaces around `=` allowed; a quoted value to its closing quote, `\`
/// escaping).
fn hide_password_parameters(s: &str) -> String {
    const KEY: &str = "password";
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find(KEY) {
        let (head, tail) = rest.split_at(i + KEY.len());
        out.push_str(head);
        let after_key = tail.trim_start_matches(' ');
        let Some(value) = after_key.strip_prefix('=') else {
            rest = tail;
            continue;
        };
        out.push_str(&tail[..tail.len() - value.len()]);
        let spaces = value.len() - value.trim_start_matches(' ').len();
        out.push_str(&value[..spaces]);
        let value = &value[spaces..];
        out.push_str("***");
        let end = if let Some(quoted) = value.strip_prefix('\'') {
            let mut escaped = false;
            quoted
                .char_indices()
                .find(|&(_, c)| {
                    let closes = c == '\'' && !escaped;
                    escaped = c == '\\' && !escaped;
                    closes
                })
                .map_or(value.len(), |(j, _)| j + 2)
        } else {
            value
                .find(|c: char| c == '&' || c.is_whitespace())
                .unwrap_or(value.len())
        };
        rest = &value[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
        assert_eq!(
            redact("nats://a:b@n1:4222,nats://c:d@n2:4222"),
            "nats://a:***@n1:4222,nats://c:***@n2:4222"
        );
        assert_eq!(
            redact("postgres://u@h/db?sslmode=require&password=s3cret&x=1"),
            "postgres://u@h/db?sslmode=require&password=***&x=1"
        );
        assert_eq!(
            redact("host=h user=u password=s3cret dbname=d"),
            "host=h user=u password=*** dbname=d"
        );
        // The credentials end at the first `@`, whatever the password holds.
        assert_eq!(redact("postgres://u:pa/ss@h/db"), "postgres://u:***@h/db");
        assert_eq!(
            redact("postgres://h/db?application_name=a@b"),
            "postgres://h/db?application_name=a@b"
        );
        assert_eq!(
            redact("host=h password = s3cret user=u"),
            "host=h password = *** user=u"
        );
        assert_eq!(
            redact(r"host=h password='a b\' c' user=u"),
            "host=h password=*** user=u"
        );
        assert_eq!(redact("passwordless=1"), "passwordless=1");
        // NATS: a token is hidden whole, and a password may hold an `@`.
        assert_eq!(redact("nats://MyT0ken@h:4222"), "nats://***@h:4222");
        assert_eq!(redact("nats://u:p@ss@h:4222"), "nats://u:***@h:4222");
        assert_eq!(
            redact("nats://u:p@n1:4222, tls://t@n2:4222"),
            "nats://u:***@n1:4222, tls://***@n2:4222"
        );
        // As async-nats takes them too: no scheme, capitals; a password holding `/` or `#`.
        assert_eq!(redact("s3cr3t@127.0.0.1:4222"), "***@127.0.0.1:4222");
        assert_eq!(redact("NATS://tok@h:4222"), "NATS://***@h:4222");
        assert_eq!(redact("u:p@ss@h:4222"), "u:***@h:4222");
        assert_eq!(redact("nats://u:ab/cd#e@h:4222"), "nats://u:***@h:4222");
        assert_eq!(redact("POSTGRES://u:secret@h/db"), "POSTGRES://u:***@h/db");
    }

    fn cfg(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| m.get(k).cloned())
    }

    #[test]
    fn defaults_and_overrides() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.prefix, "ch");
        assert_eq!(c.sync, SyncMode::Eventual);
        let c = cfg(&[("CH_SUBJECT_PREFIX", "t1"), ("CH_SYNC", "batch")]).unwrap();
        assert_eq!(c.prefix, "t1");
        assert_eq!(c.batch_wait, Duration::from_millis(5));
    }

    #[test]
    fn worker_threads_choose_the_runtime() {
        use tokio::runtime::RuntimeFlavor;
        let one = cfg(&[]).unwrap().runtime().unwrap();
        assert_eq!(one.handle().runtime_flavor(), RuntimeFlavor::CurrentThread);
        let c = cfg(&[("CH_WORKER_THREADS", "3"), ("CH_REPLAY_BATCH_MAX", "700")]).unwrap();
        assert_eq!(c.replay_batch_max, 700);
        let three = c.runtime().unwrap();
        assert_eq!(three.handle().runtime_flavor(), RuntimeFlavor::MultiThread);
        assert_eq!(three.metrics().num_workers(), 3);
        assert!(cfg(&[("CH_WORKER_THREADS", "two")]).is_err());
    }

    #[test]
    fn rejects_prefix_with_wildcards_and_bad_modes() {
        assert!(cfg(&[("CH_SUBJECT_PREFIX", "a.b")]).is_err());
        assert!(cfg(&[("CH_SUBJECT_PREFIX", ">")]).is_err());
        assert!(cfg(&[("CH_SYNC", "fast")]).is_err());
        assert!(cfg(&[("CH_BATCH_MAX", "x")]).is_err());
    }

    #[test]
    fn empty_urls_are_refused_and_urls_trimmed() {
        let e = cfg(&[("CH_NATS_URL", " ")]).unwrap_err();
        assert!(e.0.starts_with("CH_NATS_URL is empty"), "{}", e.0);
        let e = cfg(&[("CH_DATABASE_URL", "\n")]).unwrap_err();
        assert!(e.0.starts_with("CH_DATABASE_URL is empty"), "{}", e.0);
        let c = cfg(&[
            ("CH_NATS_URL", "nats://n:4222\n"),
            ("CH_DATABASE_URL", "postgres://u@h/db\n"),
        ])
        .unwrap();
        assert_eq!(
            (c.nats_url.as_str(), c.database_url.as_str()),
            ("nats://n:4222", "postgres://u@h/db")
        );
    }

    #[test]
    fn numbers_out_of_range_are_refused_with_the_range() {
        let e = cfg(&[("CH_BATCH_MAX", "50000")]).unwrap_err();
        assert_eq!(e.0, "CH_BATCH_MAX=\"50000\" is out of range: 1 to 10000");
        let e = cfg(&[("CH_DB_POOL", "0")]).unwrap_err();
        assert!(
            e.0.starts_with("CH_DB_POOL=\"0\" is out of range"),
            "{}",
            e.0
        );
        assert!(cfg(&[("CH_IMMEDIATE_TIMEOUT_MS", "60001")]).is_err());
        assert!(cfg(&[("CH_QUERY_TIMEOUT_MS", "99")]).is_err());
        assert_eq!(
            cfg(&[("CH_QUERY_TIMEOUT_MS", "250")])
                .unwrap()
                .query_timeout,
            Duration::from_millis(250)
        );
        assert_eq!(cfg(&[]).unwrap().query_timeout, Duration::from_secs(10));
        let c = cfg(&[("CH_BATCH_MAX", "10000"), ("CH_BATCH_WAIT_MS", "0")]).unwrap();
        assert_eq!((c.batch_max, c.batch_wait), (10_000, Duration::ZERO));
    }

    #[test]
    fn nats_tls_files_and_a_certificate_without_its_key() {
        assert_eq!(cfg(&[]).unwrap().nats_tls, NatsTls::default());
        let c = cfg(&[
            ("CH_NATS_CA_FILE", "/ca.pem"),
            ("CH_NATS_CERT_FILE", "/c.pem"),
            ("CH_NATS_KEY_FILE", "/k.pem"),
        ])
        .unwrap();
        assert_eq!(
            c.nats_tls.ca_file.as_deref(),
            Some(std::path::Path::new("/ca.pem"))
        );
        assert!(c.nats_tls.client_cert.is_some());
        let e = cfg(&[("CH_NATS_CERT_FILE", "/c.pem")]).unwrap_err();
        assert!(e.0.contains("CH_NATS_KEY_FILE"), "{}", e.0);
        // Files that are not there, or hold no certificate, are named with their variable.
        let e = c.nats_tls.check().unwrap_err();
        assert!(e.0.starts_with("CH_NATS_CA_FILE=/ca.pem: "), "{}", e.0);
        let empty = std::env::temp_dir().join(format!("ch-empty-{}.pem", std::process::id()));
        std::fs::write(&empty, "").unwrap();
        let tls = NatsTls {
            ca_file: Some(empty.clone()),
            client_cert: None,
        };
        let e = tls.check().unwrap_err();
        std::fs::remove_file(&empty).unwrap();
        assert!(e.0.ends_with("no PEM certificate in it"), "{}", e.0);
        assert!(NatsTls::default().check().is_ok());
    }

    #[test]
    fn rejects_a_schema_in_upper_case_and_an_unknown_log_format() {
        let e = cfg(&[("CH_DB_SCHEMA", "Bench")]).unwrap_err();
        assert!(e.0.contains("CH_DB_SCHEMA"), "{}", e.0);
        let e = cfg(&[("CH_DB_SCHEMA", "pg_desk")]).unwrap_err();
        assert!(e.0.contains("reserves schema names"), "{}", e.0);
        assert_eq!(
            cfg(&[("CH_DB_SCHEMA", "pgdesk")]).unwrap().db_schema,
            "pgdesk"
        );
        assert_eq!(
            cfg(&[("CH_DB_SCHEMA", "bench_1")]).unwrap().db_schema,
            "bench_1"
        );
        let e = cfg(&[("CH_LOG_FORMAT", "JSON")]).unwrap_err();
        assert!(e.0.contains("CH_LOG_FORMAT"), "{}", e.0);
        assert!(cfg(&[("CH_LOG_FORMAT", "json")]).unwrap().log_json);
        assert!(!cfg(&[("CH_LOG_FORMAT", "text")]).unwrap().log_json);
    }
}
