//! TLS as operators configure it: to NATS with a CA of their own and client certificates
//! (mutual TLS, `CH_NATS_CA_FILE`, `CH_NATS_CERT_FILE`, `CH_NATS_KEY_FILE`), and to Postgres
//! as `CH_DATABASE_URL` asks for it in libpq's words.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ch_e2e::{NatsServer, TestEnv};
use ch_runtime::{eventstore, nats_options, NatsTls, Subjects};
use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair};

/// A CA of the test's own, a server certificate for 127.0.0.1 and a client certificate,
/// written as PEM files into `dir`.
struct Pki {
    ca: PathBuf,
    server: (PathBuf, PathBuf),
    client: (PathBuf, PathBuf),
}

fn pki(dir: &Path) -> Pki {
    let write = |name: &str, pem: String| {
        let path = dir.join(name);
        std::fs::write(&path, pem).expect("a PEM file");
        path
    };
    let ca_key = KeyPair::generate().expect("a key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).expect("the CA");
    let leaf = |san: Vec<String>, usage: ExtendedKeyUsagePurpose, name: &str| {
        let key = KeyPair::generate().expect("a key");
        let mut params = CertificateParams::new(san).expect("parameters");
        params.extended_key_usages = vec![usage];
        let cert = params
            .signed_by(&key, &ca_cert, &ca_key)
            .expect("a certificate");
        (
            write(&format!("{name}.pem"), cert.pem()),
            write(&format!("{name}-key.pem"), key.serialize_pem()),
        )
    };
    Pki {
        server: leaf(
            vec!["127.0.0.1".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
            "server",
        ),
        client: leaf(
            vec!["worker".into()],
            ExtendedKeyUsagePurpose::ClientAuth,
            "client",
        ),
        ca: write("ca.pem", ca_cert.pem()),
    }
}

/// A JetStream server that speaks only TLS with a certificate from the test's own CA and
/// verifies its clients' certificates against it: the configuration's files reach a worker's
/// connection (the store works over it), and without the client certificate, or with only
/// the system's CAs, the server is not reached.
#[tokio::test]
async fn nats_over_mutual_tls_with_a_ca_of_ones_own() {
    let mut certs = None;
    let server = NatsServer::start_with(|port, dir| {
        let p = pki(dir);
        let conf = format!(
            "listen: \"127.0.0.1:{port}\"\njetstream {{ store_dir: {:?} }}\n\
             tls {{ cert_file: {:?}, key_file: {:?}, ca_file: {:?}, verify: true, timeout: 5 }}\n",
            dir.join("store"),
            p.server.0,
            p.server.1,
            p.ca
        );
        certs = Some(p);
        conf
    })
    .await;
    let certs = certs.expect("certificates");
    let port = server.port();
    let mut cfg = ch_runtime::Config {
        nats_url: format!("tls://127.0.0.1:{port}"),
        prefix: "tls".into(),
        ..ch_runtime::Config::default()
    };
    cfg.nats_tls = NatsTls {
        ca_file: Some(certs.ca.clone()),
        client_cert: Some(certs.client.clone()),
    };

    // connect_nats retries until connected (the client comes back at once): JetStream
    // answering shows the connection is up.
    let client = ch_runtime::connect_nats(&cfg, "tls-test")
        .await
        .expect("a client");
    let js = async_nats::jetstream::new(client.clone());
    eventstore::wait_ready(&js, Duration::from_secs(15))
        .await
        .expect("JetStream over mutual TLS");
    assert!(
        client.server_info().tls_required,
        "{:?}",
        client.server_info()
    );
    eventstore::ensure_stream(&js, &Subjects::new("tls"), 1)
        .await
        .expect("the event stream made over TLS");

    // A nats:// URL (the chart's default) with the files: TLS all the same.
    let attempt = |url: String, tls: NatsTls| async move {
        nats_options(&tls, "")
            .expect("options")
            .0
            .connection_timeout(Duration::from_secs(5))
            .connect(url)
            .await
    };
    let plain_url = format!("nats://127.0.0.1:{port}");
    attempt(plain_url, cfg.nats_tls.clone())
        .await
        .expect("TLS with a nats:// URL and the files");

    // Without the client certificate the server turns the connection away; with the
    // system's CAs only, the client does not trust the server.
    let no_cert = NatsTls {
        ca_file: Some(certs.ca.clone()),
        client_cert: None,
    };
    let Err(e) = attempt(cfg.nats_url.clone(), no_cert.clone()).await else {
        panic!("connected without a client certificate");
    };
    assert!(e.to_string().contains("CertificateRequired"), "{e}");
    let system_roots = NatsTls {
        ca_file: None,
        client_cert: Some(certs.client.clone()),
    };
    let Err(e) = attempt(cfg.nats_url.clone(), system_roots.clone()).await else {
        panic!("trusted a server whose CA only the test knows");
    };
    assert!(e.to_string().contains("UnknownIssuer"), "{e}");
    // A worker's client, retrying, is told only "TLS error" or "IO error": its log and its
    // start's error carry the cause from an attempt of their own.
    let cause = ch_runtime::connect_cause(&no_cert, &cfg.nats_url).await;
    assert!(
        cause
            .as_deref()
            .is_some_and(|c| c.contains("CertificateRequired")),
        "{cause:?}"
    );
    let cause = ch_runtime::connect_cause(&system_roots, &cfg.nats_url).await;
    assert!(
        cause
            .as_deref()
            .is_some_and(|c| c.contains("UnknownIssuer")),
        "{cause:?}"
    );
    assert_eq!(
        ch_runtime::connect_cause(&cfg.nats_tls, &cfg.nats_url).await,
        None
    );

    // A CA file that is not there is said with its variable and path, before any attempt
    // (async-nats alone says "TLS error" and retries for good).
    let mut missing = cfg.clone();
    missing.nats_tls.ca_file = Some(certs.ca.with_file_name("gone.pem"));
    let Err(e) = ch_runtime::connect_nats(&missing, "tls-test").await else {
        panic!("a worker connected with a CA file that is not there");
    };
    assert!(e.to_string().contains("CH_NATS_CA_FILE="), "{e}");
    assert!(e.to_string().contains("gone.pem"), "{e}");
}

/// TLS to Postgres as `CH_DATABASE_URL` asks for it (`sslmode=verify-full` and `sslrootcert`,
/// in libpq's words): pooled and single sessions are encrypted, a server whose certificate
/// the roots do not vouch for is refused, and `prefer` (the default) stays in plain text.
/// Needs a test server with TLS on whose certificate names `localhost` (Debian's default: the
/// snakeoil certificate); says so and checks nothing else otherwise.
#[tokio::test]
async fn postgres_over_tls_is_encrypted_and_the_server_verified() {
    use ch_runtime::pg::{self, Access, PoolSpec};
    let env = TestEnv::new().await;
    let ssl: String = env.pg.query_one("SHOW ssl", &[]).await.expect("ssl").get(0);
    let cert: Option<String> = env
        .pg
        .query_one("SHOW ssl_cert_file", &[])
        .await
        .ok()
        .map(|r| r.get(0));
    let Some(base) = env
        .cfg
        .database_url
        .strip_prefix("postgres://postgres@127.0.0.1:")
    else {
        eprintln!("skipped: the test database is not postgres@127.0.0.1");
        return;
    };
    let Some(cert) = cert.filter(|c| ssl == "on" && std::fs::metadata(c).is_ok()) else {
        eprintln!("skipped: the test Postgres has no TLS (ssl = {ssl}) or its certificate is not readable");
        return;
    };
    let local = format!("postgres://postgres@localhost:{base}");
    let sep = if local.contains('?') { '&' } else { '?' };
    let verified = format!("{local}{sep}sslmode=verify-full&sslrootcert={cert}");
    async fn encrypted(c: &tokio_postgres::Client) -> bool {
        c.query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl")
        .get(0)
    }

    let pool = PoolSpec {
        database_url: &verified,
        schema: &env.cfg.db_schema,
        size: 1,
        access: Access::ReadOnly,
        application_name: "tls-test",
    }
    .pool()
    .expect("pool");
    let session = pool.get().await.expect("a verified TLS session");
    assert!(
        encrypted(&session).await,
        "the pooled session is not encrypted"
    );
    let single = pg::connect(&verified, None)
        .await
        .expect("a verified TLS session");
    assert!(
        encrypted(&single).await,
        "the single session is not encrypted"
    );

    // Roots that do not vouch for the server's certificate (the public CAs' bundle, when
    // there is one): refused, not downgraded to plain text.
    let bundle = "/etc/ssl/certs/ca-certificates.crt";
    if std::fs::metadata(bundle).is_ok() {
        let url = format!("{local}{sep}sslmode=require&sslrootcert={bundle}");
        let Err(e) = pg::connect(&url, None).await else {
            panic!("connected with a certificate no root vouches for");
        };
        assert!(e.to_string().contains("certificate"), "{e}");
    }
    // A root for another name than the server's: refused too (verify-full checks the name).
    let other =
        format!("postgres://postgres@127.0.0.1:{base}{sep}sslmode=verify-full&sslrootcert={cert}");
    let Err(e) = pg::connect(&other, None).await else {
        panic!("the server's name was not checked");
    };
    assert!(e.to_string().contains("not valid for name"), "{e}");
    // No sslmode (prefer): plain text, as before TLS was supported.
    let plain = pg::connect(&env.cfg.database_url, None)
        .await
        .expect("plain");
    assert!(!encrypted(&plain).await, "prefer encrypted the session");
}

/// Credentials in `CH_NATS_URL` are sent (async-nats takes them from its options only): a
/// user and password, percent-encoded in the URL, and a token; without them the server
/// refuses the connection.
#[tokio::test]
async fn credentials_in_the_nats_url_are_sent() {
    for (authorization, with, without) in [
        (
            r#"authorization { user: "ch user", password: "p@ss:w/rd" }"#,
            "nats://ch%20user:p%40ss%3Aw%2Frd@127.0.0.1",
            "nats://127.0.0.1",
        ),
        (
            r#"authorization { token: "s3cr3t-t0ken" }"#,
            "nats://s3cr3t-t0ken@127.0.0.1",
            "nats://wrong-token@127.0.0.1",
        ),
    ] {
        let server = NatsServer::start_with(|port, dir| {
            format!(
                "listen: 127.0.0.1:{port}\njetstream {{ store_dir: {:?} }}\n{authorization}\n",
                dir.join("js")
            )
        })
        .await;
        let port = server.port();
        let cfg = |url: &str| ch_runtime::Config {
            nats_url: format!("{url}:{port}"),
            ..ch_runtime::Config::default()
        };
        let connect = |cfg: ch_runtime::Config| async move {
            let (options, servers) = nats_options(&cfg.nats_tls, &cfg.nats_url).expect("a URL");
            assert!(servers.iter().all(|s| !s.has_user_pass()), "{servers:?}");
            options
                .connection_timeout(Duration::from_secs(5))
                .connect(servers)
                .await
        };
        let client = connect(cfg(with))
            .await
            .expect("connected with the URL's credentials");
        client.flush().await.expect("a round trip");
        let refused = connect(cfg(without))
            .await
            .expect_err("connected without them");
        assert!(
            refused.to_string().to_lowercase().contains("authorization"),
            "{refused}"
        );
        // A worker's own connection takes them too.
        ch_runtime::connect_nats(&cfg(with), "auth-test")
            .await
            .expect("a worker's connection")
            .flush()
            .await
            .expect("a round trip");
    }
}
