//! The database set-up that every worker runs when it starts: several workers start at once on
//! a fresh server (`chctl up`, a Kubernetes roll-out), and none may fail because another
//! created the database or applied the migrations first.

use ch_e2e::TestEnv;

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
