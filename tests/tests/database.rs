//! The database set-up that every worker runs when it starts: several workers start at once on
//! a fresh server (`chctl up`, a Kubernetes roll-out), and none may fail because another
//! created the database or applied the migrations first.

use ch_e2e::{eventually, TestEnv, Worker};
use serde_json::json;

#[tokio::test]
async fn workers_starting_at_once_on_a_fresh_server_all_find_their_database() {
    let env = TestEnv::new().await;
    let name = format!("{}_fresh_db", env.cfg.db_schema);
    let base = env
        .cfg
        .database_url
        .rsplit_once('/')
        .expect("URL with a database")
        .0;
    let url = format!("{base}/{name}");
    let starts = (0..6).map(|_| async {
        ch_runtime::pg::ensure_database(&url).await?;
        ch_runtime::pg::migrate(&url, "ch", ch_readmodel::MIGRATIONS).await
    });
    let results = futures::future::join_all(starts).await;
    let dropped = env
        .pg
        .batch_execute(&format!("DROP DATABASE \"{name}\" WITH (FORCE)"))
        .await;
    for r in results {
        r.expect("every start succeeds");
    }
    dropped.expect("the database was created, once");
}

/// An operator looking at `pg_stat_activity` sees which worker holds each session: its service
/// name (`<prefix>-<worker>`) is the session's `application_name`.
#[tokio::test]
async fn each_workers_sessions_carry_its_service_name() {
    let mut env = TestEnv::new().await;
    env.start_all(&[Worker::ProjPortfolio, Worker::QueryPortfolio])
        .await;
    // A query takes a session of the query worker's pool; the projector holds its lock session.
    env.request("query.portfolio.performance", json!({"portfolio_id": "p1"}))
        .await
        .err(404, "not_found");
    let expected: Vec<String> = [Worker::ProjPortfolio, Worker::QueryPortfolio]
        .iter()
        .map(|w| env.subjects.service_name(w.name()))
        .collect();
    // The projector answers pings before it has taken its lock session: wait for that.
    eventually(|| async {
        let names: Vec<String> = env
            .pg
            .query(
                "SELECT DISTINCT application_name FROM pg_stat_activity
                 WHERE application_name LIKE $1 ORDER BY 1",
                &[&format!("{}-%", env.subjects.prefix())],
            )
            .await
            .expect("pg_stat_activity")
            .iter()
            .map(|r| r.get(0))
            .collect();
        (names == expected)
            .then_some(())
            .ok_or(format!("sessions named {names:?}, expected {expected:?}"))
    })
    .await;
}

/// A worker's host that vanishes without closing its sessions (power loss, a partition) must
/// not keep a projector's lock, and with it the read model, for the operating system's two
/// hours of TCP keepalive: every worker session asks the server to probe it after 10 s idle
/// and end it after 3 unanswered probes 5 s apart (a real partition is not something a test
/// on a shared machine can make; the settings are checked).
#[tokio::test]
async fn every_worker_session_asks_the_server_to_notice_a_vanished_worker() {
    let env = TestEnv::new().await;
    let app = ch_runtime::app::App::start(env.app_config(), "proj-portfolio")
        .await
        .expect("app");
    let default = env
        .pg
        .query_one("SHOW tcp_keepalives_idle", &[])
        .await
        .expect("show")
        .get::<_, String>(0);
    assert_ne!(default, "10", "the test's own session must not have them");
    for pool in [app.pool().expect("pool"), app.read_pool().expect("pool")] {
        let conn = pool.get().await.expect("a session");
        for (setting, value) in [
            ("tcp_keepalives_idle", "10"),
            ("tcp_keepalives_interval", "5"),
            ("tcp_keepalives_count", "3"),
        ] {
            let shown: String = conn
                .query_one(&format!("SHOW {setting}"), &[])
                .await
                .expect("show")
                .get(0);
            assert_eq!(shown, value, "{setting}");
        }
    }
}

/// A checkpoint announced but not in what the query workers read (a replica behind its
/// primary, or commits a database crash lost: projectors commit without waiting for the WAL
/// flush) is read again after pauses, not in a loop as fast as the database answers. The
/// reads are counted by a view over the checkpoints that bumps a sequence per row read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_for_an_announced_checkpoint_not_read_yet_reads_it_again_after_pauses() {
    let env = TestEnv::new().await;
    let app = ch_runtime::app::App::start(env.app_config(), "test-wait")
        .await
        .unwrap();
    ch_readmodel::workers::migrate(&app).await.unwrap();
    let schema = &env.cfg.db_schema;
    env.pg
        .batch_execute(&format!(
            "SET search_path TO {schema};
             ALTER TABLE ch_checkpoints RENAME TO ch_checkpoints_kept;
             INSERT INTO ch_checkpoints_kept (projection, last_seq) VALUES ('portfolio', 5);
             CREATE SEQUENCE checkpoint_reads;
             CREATE FUNCTION count_read() RETURNS boolean LANGUAGE sql VOLATILE
                 AS 'SELECT nextval(''{schema}.checkpoint_reads'') > 0';
             CREATE VIEW ch_checkpoints AS
                 SELECT * FROM ch_checkpoints_kept WHERE {schema}.count_read();"
        ))
        .await
        .unwrap();
    let progress =
        ch_runtime::query::Progress::subscribe(&app.client, &env.subjects, &["portfolio"])
            .await
            .unwrap();
    let announced = 1_000_000u64;
    // Announced (again, until heard: the subscription is another connection's) before the
    // wait begins: the wait below is the announced one.
    eventually(|| async {
        env.client
            .publish(
                env.subjects.progress("portfolio"),
                announced.to_string().into(),
            )
            .await
            .unwrap();
        let heard = progress
            .wait_announced(
                &["portfolio"],
                announced,
                std::time::Duration::from_millis(100),
            )
            .await;
        heard
            .then_some(())
            .ok_or("the announcement never reached the waiter")
    })
    .await;
    // A read-write pool: the counting view writes (query workers read read-only).
    let pool = app.pool().unwrap();
    let waited = progress
        .wait_for(
            &pool,
            &["portfolio"],
            announced,
            std::time::Duration::from_millis(500),
        )
        .await;
    let e = waited.expect_err("the checkpoint stays at 5");
    assert_eq!(e.code.as_ref(), "stale", "{e:?}");
    let reads: i64 = env
        .pg
        .query_one(
            &format!("SELECT last_value FROM {schema}.checkpoint_reads"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    // Pauses of 1, 2, 4, 8, 16 ms, then 25 ms: about 25 reads in 500 ms.
    assert!((1..=60).contains(&reads), "{reads} reads of the checkpoint");
}
