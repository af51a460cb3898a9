//! Query workers cannot write: their sessions are read-only whatever role they connect as, and
//! they serve with a role that may only read the read models (DESIGN.md: "SELECT on read models
//! (read-only role)"), on a schema that `chctl setup` or a projector has migrated.

use ch_e2e::fixtures::{deposit, open, seq};
use ch_e2e::{TestEnv, Worker};
use ch_runtime::app::App;
use ch_runtime::error::DbError;
use serde_json::json;
use tokio_postgres::error::SqlState;

/// A login role of the cluster that may only read `schema` (roles are not per database: the
/// name is the test's own), and the database URL that connects as it.
struct Reader {
    role: String,
    url: String,
}

impl Reader {
    /// May read `schema`.
    async fn create(env: &TestEnv, schema: &str) -> Reader {
        let reader = Reader::create_bare(env, "reader").await;
        reader.grant(env, schema).await;
        reader
    }

    /// Without a schema: it may connect, and nothing more.
    async fn create_bare(env: &TestEnv, suffix: &str) -> Reader {
        let role = format!("{}_{suffix}", env.cfg.db_schema);
        env.pg
            .batch_execute(&format!("CREATE ROLE \"{role}\" LOGIN"))
            .await
            .expect("create the role");
        let url = env.database_url_as(&role);
        Reader { role, url }
    }

    /// Lets it read `schema`'s tables.
    async fn grant(&self, env: &TestEnv, schema: &str) {
        env.pg
            .batch_execute(&format!(
                "GRANT USAGE ON SCHEMA \"{schema}\" TO \"{0}\";
                 GRANT SELECT ON ALL TABLES IN SCHEMA \"{schema}\" TO \"{0}\";",
                self.role
            ))
            .await
            .expect("grant");
    }

    async fn drop(self, env: &TestEnv) {
        env.pg
            .batch_execute(&format!(
                "DROP OWNED BY \"{0}\"; DROP ROLE \"{0}\"",
                self.role
            ))
            .await
            .expect("drop the role");
    }
}

#[tokio::test]
async fn a_query_worker_serves_with_a_role_that_may_only_read() {
    let mut env = TestEnv::new().await;
    env.start_all(&[Worker::CmdPortfolio, Worker::ProjPortfolio])
        .await;
    let schema = env.cfg.db_schema.clone();
    let reader = Reader::create(&env, &schema).await;
    // As a role granted the tables before an upgrade made ch_stream: it starts all the same.
    env.pg
        .batch_execute(&format!(
            "REVOKE SELECT ON \"{schema}\".ch_stream FROM \"{}\"",
            reader.role
        ))
        .await
        .expect("revoke");
    let mut cfg = env.app_config();
    cfg.database_url = reader.url.clone();
    // Starting checks the migrations (read only) and answers from the read model.
    let worker = env.spawn_with(Worker::QueryPortfolio, cfg).await;
    env.wait_ping(Worker::QueryPortfolio).await;

    env.cmd("portfolio.update", open("ro-1", "u-ro")).await;
    let funded = env.cmd("portfolio.update", deposit("ro-1", "250")).await;
    let perf = env.performance_at("ro-1", seq(&funded)).await;
    assert_eq!(perf["cash"], json!("250"), "{perf}");
    assert!(perf["as_of_seq"].as_u64() >= Some(seq(&funded)), "{perf}");
    // A snapshot's reads (their tables locked first, as a read-only role may).
    let analysis = env
        .request("query.portfolio.analysis", json!({"portfolio_id": "ro-1"}))
        .await
        .ok();
    assert_eq!(analysis["portfolio_id"], "ro-1", "{analysis}");

    worker.stop().await;
    reader.drop(&env).await;
}

#[tokio::test]
async fn a_query_workers_sessions_cannot_write_even_as_a_role_that_may() {
    let env = TestEnv::new().await;
    let app = App::start(env.app_config(), "query-portfolio")
        .await
        .expect("app");
    let conn = app.read_pool().expect("pool").get().await.expect("session");
    let err = conn
        .execute("UPDATE ch_checkpoints SET last_seq = last_seq + 1", &[])
        .await
        .expect_err("a read-only session refuses a write");
    assert_eq!(
        err.code(),
        Some(&SqlState::READ_ONLY_SQL_TRANSACTION),
        "{err}"
    );
    // The projectors' pool, on the same role, may.
    let rw = app.pool().expect("pool").get().await.expect("session");
    rw.execute("UPDATE ch_checkpoints SET last_seq = last_seq", &[])
        .await
        .expect("a projector's session writes");
}

#[tokio::test]
async fn a_role_that_may_not_migrate_is_told_what_is_missing_and_what_to_do() {
    let env = TestEnv::new().await;
    let fresh = format!("{}_fresh", env.cfg.db_schema);
    let bare = Reader::create_bare(&env, "bare").await;
    let err = ch_runtime::pg::migrate(&bare.url, &fresh, ch_readmodel::MIGRATIONS)
        .await
        .expect_err("this role may not create the schema");
    let text = err.to_string();
    assert!(matches!(err, DbError::Unavailable(_)), "{text}");
    for needle in [
        fresh.as_str(),
        "lacks read-model migrations [1, 2",
        "permission denied",
        "chctl setup",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from: {text}");
    }
    // Nothing was created.
    assert!(!schema_exists(&env, &fresh).await, "the schema was created");

    // Once migrated by a role that may, the same call only reads and succeeds.
    ch_runtime::pg::migrate(&env.cfg.database_url, &fresh, ch_readmodel::MIGRATIONS)
        .await
        .expect("migrate as the owner");
    bare.grant(&env, &fresh).await;
    ch_runtime::pg::migrate(&bare.url, &fresh, ch_readmodel::MIGRATIONS)
        .await
        .expect("a migrated schema needs no privilege beyond reading");
    env.pg
        .batch_execute(&format!("DROP SCHEMA \"{fresh}\" CASCADE"))
        .await
        .expect("drop the schema");
    bare.drop(&env).await;
}

/// A query worker only reads: on a schema or database that lacks the read models (a misspelt
/// `CH_DB_SCHEMA` or database name) it stops and says what is missing, creating nothing
/// (it made them, empty, and answered `not_found` for everything).
#[tokio::test]
async fn a_query_worker_creates_no_schema_or_database_and_says_what_is_missing() {
    let env = TestEnv::new().await;
    let mut cfg = env.app_config();
    cfg.db_schema = format!("{}_typo", env.cfg.db_schema);
    let queries = [ch_readmodel::workers::Query::PortfolioPerformance];
    let app = App::start(cfg.clone(), "query-portfolio")
        .await
        .expect("app");
    let run = |app| ch_readmodel::workers::run_queries(app, &queries, Default::default());
    let text = refused_at_once(run(app)).await;
    for needle in [
        cfg.db_schema.as_str(),
        "lacks read-model migrations [1, 2",
        "chctl setup",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from: {text}");
    }
    assert!(
        !schema_exists(&env, &cfg.db_schema).await,
        "the schema was created"
    );

    let (base, _) = cfg.database_url.rsplit_once('/').expect("a URL");
    let db = format!("{}_typo", env.cfg.db_schema);
    cfg.database_url = format!("{base}/{db}");
    cfg.db_schema = env.cfg.db_schema.clone();
    let app = App::start(cfg, "query-portfolio").await.expect("app");
    let text = refused_at_once(run(app)).await;
    assert!(
        text.contains("does not exist") && text.contains("chctl setup"),
        "{text}"
    );
    let created = env
        .pg
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&db])
        .await
        .expect("catalog");
    assert!(created.is_none(), "the database was created");
}

/// A projector holds one session of its pool for its lock: with a pool of one it would wait
/// for a session on every batch and fail for good, so it refuses to start, saying why.
#[tokio::test]
async fn a_projector_with_a_pool_of_one_refuses_to_start() {
    let env = TestEnv::new().await;
    let mut cfg = env.app_config();
    cfg.db_pool_size = 1;
    let app = App::start(cfg, "proj-portfolio").await.expect("app");
    let text = refused_at_once(ch_readmodel::workers::run_projector(
        app,
        ch_readmodel::PortfolioProjection::default(),
        Default::default(),
    ))
    .await;
    assert!(
        text.contains("CH_DB_POOL=1: a projector needs at least 2"),
        "{text}"
    );
}

/// A schema holds the read models of one stream: a worker or `chctl` of another subject prefix
/// pointed at it (`CH_DB_SCHEMA` forgotten) stops and says so, and resets nothing.
#[tokio::test]
async fn a_schema_holds_the_read_models_of_one_stream() {
    let mut env = TestEnv::new().await;
    env.start_all(&[
        Worker::CmdPortfolio,
        Worker::ProjPortfolio,
        Worker::QueryPortfolio,
    ])
    .await;
    let opened = env.cmd("portfolio.update", open("p1", "u1")).await;
    env.performance_at("p1", seq(&opened)).await;

    let mut cfg = env.app_config();
    cfg.prefix = format!("{}x", env.cfg.prefix);
    let other = ch_runtime::Subjects::new(cfg.prefix.clone());
    let js = async_nats::jetstream::new(env.client.clone());
    ch_runtime::eventstore::ensure_stream(&js, &other, 1)
        .await
        .expect("the other prefix's stream");
    let said = format!(
        "holds the read models of stream {}, not {}",
        env.subjects.stream_name(),
        other.stream_name()
    );
    // As a projector or `chctl rebuild` starts.
    let app = App::start(cfg.clone(), "chctl").await.expect("app");
    let err = ch_readmodel::workers::migrate(&app)
        .await
        .expect_err("another stream's schema claimed");
    assert!(err.to_string().contains(&said), "{err}");
    // As a query worker starts.
    let query_worker_refused = |cfg: ch_runtime::Config| async move {
        let queries = [ch_readmodel::workers::Query::PortfolioPerformance];
        let app = App::start(cfg, "query-portfolio").await.expect("app");
        let run = ch_readmodel::workers::run_queries(app, &queries, Default::default());
        refused_at_once(run).await
    };
    let text = query_worker_refused(cfg.clone()).await;
    assert!(text.contains(&said), "{text}");
    // A schema from before the streams were recorded (migration 8 made empty): the other
    // prefix, whose stream is behind its read models, does not claim it; its own stream does.
    env.pg
        .batch_execute("DELETE FROM ch_stream")
        .await
        .expect("as before migration 8");
    let app = App::start(cfg.clone(), "chctl").await.expect("app");
    let err = ch_readmodel::workers::migrate(&app)
        .await
        .expect_err("a schema ahead of this stream claimed");
    assert!(err.to_string().contains("names no stream yet"), "{err}");
    let text = query_worker_refused(cfg.clone()).await;
    assert!(text.contains("names no stream yet"), "{text}");
    let own = App::start(env.app_config(), "chctl").await.expect("app");
    ch_readmodel::workers::migrate(&own)
        .await
        .expect("claimed by its own stream");
    let claimed: String = env
        .pg
        .query_one("SELECT stream FROM ch_stream", &[])
        .await
        .expect("claimed")
        .get(0);
    assert_eq!(claimed, env.subjects.stream_name());
    // The read model is as it was.
    let perf = env.performance_at("p1", seq(&opened)).await;
    assert_eq!(perf["version"], 1, "{perf}");
    js.delete_stream(other.stream_name())
        .await
        .expect("the other prefix's stream removed");
}

/// The error a worker's run stopped with at once. Bounded: one that took what it should have
/// refused would run on.
async fn refused_at_once<E: std::fmt::Display>(
    run: impl std::future::Future<Output = Result<(), E>>,
) -> String {
    match tokio::time::timeout(std::time::Duration::from_secs(30), run).await {
        Ok(Err(e)) => e.to_string(),
        Ok(Ok(())) => panic!("the worker ran and stopped without an error"),
        Err(_) => panic!("the worker did not stop at once"),
    }
}

async fn schema_exists(env: &TestEnv, schema: &str) -> bool {
    env.pg
        .query_opt("SELECT 1 FROM pg_namespace WHERE nspname = $1", &[&schema])
        .await
        .expect("catalog")
        .is_some()
}
