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
