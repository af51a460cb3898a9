//! `chctl status`: pings every service (but those `--skip` names), prints the projectors'
//! progress and any instance failing its batches, the stream and each worker's Postgres
//! sessions; exits 1 when any of that is missing or wrong (the Helm chart's `helm test`).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Result;

use ch_runtime::pg;

use crate::common::{
    is_not_found, ping, projector_status, redact, stats, text, Ctx, PROJECTIONS, WORKERS,
};

/// Failures in a row (a projector's `consecutive_failures` gauge) from which `status` counts
/// a projector instance as failing: a batch is retried with backoff from 50 ms (five in a row
/// are about 1.5 s of trouble), the lock once a second (five seconds), not a blip.
const FAILING_AFTER: i64 = 5;

#[derive(clap::Args)]
pub struct Args {
    /// Workers not expected to run (comma-separated, e.g. `cmd-market,exit-triggers`): not
    /// pinged, and a skipped projector's status is not asked. The Helm chart's `helm test`
    /// passes the workers it runs none of.
    #[arg(long, value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(WORKERS))]
    pub skip: Vec<String>,
}

pub async fn run(ctx: &Ctx, args: &Args) -> Result<ExitCode> {
    let client = ctx.connect().await?;
    println!(
        "services (prefix {}, NATS {}):",
        ctx.subjects.prefix(),
        redact(&ctx.cfg.nats_url)
    );
    let skipped = |worker: &str| args.skip.iter().any(|s| s == worker);
    for w in WORKERS.iter().filter(|w| skipped(w)) {
        println!("  skip  {}", ctx.service(w));
    }
    let expected: Vec<&str> = WORKERS.iter().copied().filter(|w| !skipped(w)).collect();
    let pings = futures::future::join_all(expected.iter().map(|w| {
        let service = ctx.service(w);
        let client = &client;
        async move {
            let t = Instant::now();
            let reply = ping(client, &service, Duration::from_millis(1000)).await;
            (service, reply, t.elapsed())
        }
    }))
    .await;
    let mut down = 0;
    for (service, reply, took) in pings {
        match reply {
            Some(v) => println!(
                "  up    {service:<24} version {:<8} id {}  ({} ms)",
                text(&v, "version"),
                text(&v, "id"),
                took.as_millis()
            ),
            None => {
                down += 1;
                println!("  down  {service}");
            }
        }
    }
    // What else is wrong (a projector without status, the stream, the database): also a
    // failure, so that a health check that runs `chctl status` sees it.
    let mut problems = Vec::new();
    println!("projectors:");
    for p in PROJECTIONS {
        if skipped(&format!("proj-{p}")) {
            println!("  {p:<10} skipped");
            continue;
        }
        match projector_status(ctx, &client, p).await {
            Ok(v) => {
                println!(
                    "  {p:<10} last_seq {:<8} stream_last_seq {:<8} lag_events {}",
                    text(&v, "last_seq"),
                    text(&v, "stream_last_seq"),
                    text(&v, "lag_events")
                );
                // Answering is not projecting: an instance that keeps failing its batches
                // (a missing grant, a renamed table) still answers status.
                let service = ctx.service(&format!("proj-{p}"));
                match stats(&client, &service).await {
                    Ok(replies) => {
                        let failing = failing(&replies);
                        for (id, failures) in &failing {
                            println!(
                                "  {p:<10} instance {id}: failing, {failures} failures in a row (its log says why)"
                            );
                        }
                        if !failing.is_empty() {
                            problems.push(format!("projector {p} failing"));
                        }
                    }
                    Err(e) => {
                        println!("  {p:<10} no $SRV.STATS: {e}");
                        problems.push(format!("projector {p} gave no stats"));
                    }
                }
            }
            Err(e) => {
                println!("  {p:<10} no status: {e:#}");
                problems.push(format!("projector {p} gave no status"));
            }
        }
    }
    let js = async_nats::jetstream::new(client.clone());
    let name = ctx.subjects.stream_name();
    match js.get_stream(&name).await {
        Ok(s) => match s.get_info().await {
            Ok(info) => {
                println!(
                    "stream {name}: {} events, last seq {}, {} consumers{}",
                    info.state.messages,
                    info.state.last_sequence,
                    info.state.consumer_count,
                    replication(&info)
                );
                if leaderless(&info) {
                    problems.push(format!(
                        "stream {name} has no leader (too few of its replicas up for a \
                         quorum?): no command can be stored"
                    ));
                }
            }
            Err(e) => {
                println!("stream {name}: {e}");
                problems.push(format!("stream {name} gave no info"));
            }
        },
        Err(e) => {
            if is_not_found(&e) {
                println!("stream {name}: missing (run `chctl setup`)");
                problems.push(format!("stream {name} missing"));
            } else {
                // Not an answer that it is missing: the setup it would advise would not help.
                let off = if client.server_info().jetstream {
                    String::new()
                } else {
                    format!(" (the server {})", ch_runtime::app::JETSTREAM_OFF)
                };
                println!("stream {name}: no answer: {e}{off}");
                problems.push(format!("stream {name} gave no info"));
            }
        }
    }
    if let Err(e) = sessions(ctx).await {
        problems.push(e);
    }
    if down > 0 {
        problems.insert(0, format!("{down} of {} services down", expected.len()));
    }
    if problems.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        println!("{}", problems.join("; "));
        Ok(ExitCode::FAILURE)
    }
}

/// The instances among `$SRV.STATS` replies whose `consecutive_failures` gauge has reached
/// [`FAILING_AFTER`], with the count.
fn failing(replies: &[serde_json::Value]) -> Vec<(String, i64)> {
    replies
        .iter()
        .filter_map(|r| {
            let failures = r["endpoints"]
                .as_array()?
                .iter()
                .filter_map(|e| e["data"]["gauges"]["consecutive_failures"].as_i64())
                .max()?;
            (failures >= FAILING_AFTER).then(|| (text(r, "id"), failures))
        })
        .collect()
}

/// How long the database sessions' query may take.
const SESSIONS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Each worker's Postgres sessions (they carry its service name as `application_name`): how
/// many, how many run a statement, wait for a lock, or sit idle inside a transaction, and the
/// oldest open transaction: what to look at when a read model stops moving. `Err` saying
/// what failed when the database cannot be asked.
async fn sessions(ctx: &Ctx) -> Result<(), String> {
    let url = &ctx.cfg.database_url;
    println!("database sessions ({}):", redact(url));
    let db = match pg::connect(url, None).await {
        Ok(db) => db,
        Err(e) => {
            println!("  database unreachable: {e}");
            return Err("database unreachable".into());
        }
    };
    // Bounded: a database that took the session and stopped answering would hold the status
    // (and a `helm test`) for ever.
    let rows = tokio::time::timeout(
        SESSIONS_TIMEOUT,
        db.query(
            "SELECT application_name, count(*),
                    count(*) FILTER (WHERE state = 'active'),
                    count(*) FILTER (WHERE wait_event_type = 'Lock'),
                    count(*) FILTER (WHERE state LIKE 'idle in transaction%'),
                    extract(epoch FROM max(now() - xact_start))::float8
               FROM pg_stat_activity
              WHERE datname = current_database() AND starts_with(application_name, $1)
              GROUP BY 1 ORDER BY 1",
            &[&format!("{}-", ctx.subjects.prefix())],
        ),
    )
    .await;
    let rows = match rows {
        Ok(rows) => rows,
        Err(_) => {
            println!(
                "  the database did not answer within {} s",
                SESSIONS_TIMEOUT.as_secs()
            );
            return Err("database not answering".into());
        }
    };
    match rows {
        Ok(rows) if rows.is_empty() => println!("  none"),
        Ok(rows) => {
            for r in rows {
                let oldest = r
                    .get::<_, Option<f64>>(5)
                    .map_or("none".to_owned(), |s| format!("{s:.1} s"));
                println!(
                    "  {:<24} {} open, {} active, {} waiting for a lock, {} idle in a transaction; oldest transaction {oldest}",
                    r.get::<_, String>(0),
                    r.get::<_, i64>(1),
                    r.get::<_, i64>(2),
                    r.get::<_, i64>(3),
                    r.get::<_, i64>(4),
                );
            }
        }
        Err(e) => {
            println!("  cannot read pg_stat_activity: {e}");
            return Err("database sessions unreadable".into());
        }
    }
    Ok(())
}

/// A follower the leader has not heard from for longer than this is not "catching up".
const SILENT_REPLICA: std::time::Duration = std::time::Duration::from_secs(5);

/// A replicated stream without a leader: nothing can be appended.
fn leaderless(info: &async_nats::jetstream::stream::Info) -> bool {
    info.config.num_replicas > 1 && info.cluster.as_ref().is_none_or(|c| c.leader.is_none())
}

/// A replicated stream's replicas as an operator needs them: the leader, and each follower
/// with whether it is current and how far behind it was last seen; one the leader has not
/// heard from lately (a crashed node, until the group calls it offline, minutes later) is not
/// responding, not catching up.
fn replication(info: &async_nats::jetstream::stream::Info) -> String {
    let Some(cluster) = info
        .cluster
        .as_ref()
        .filter(|_| info.config.num_replicas > 1)
    else {
        return String::new();
    };
    let replicas: Vec<String> = cluster
        .replicas
        .iter()
        .map(|r| {
            if r.offline {
                return format!("{} offline", r.name);
            }
            if r.current {
                return format!("{} current", r.name);
            }
            if r.active.is_zero() {
                return format!("{} not heard from since the leader changed", r.name);
            }
            if r.active > SILENT_REPLICA {
                return format!(
                    "{} not responding (last heard from {} s ago)",
                    r.name,
                    r.active.as_secs()
                );
            }
            // The lag JetStream reports counts raft log entries, not events.
            match r.lag.filter(|&lag| lag > 0) {
                Some(lag) => format!("{} catching up ({lag} raft entries behind)", r.name),
                None => format!("{} catching up", r.name),
            }
        })
        .collect();
    let listed = if replicas.is_empty() {
        "none".to_owned()
    } else {
        replicas.join(", ")
    };
    match cluster.leader.as_deref() {
        Some(leader) => format!(
            "; {} replicas, leader {leader}, followers: {listed}",
            info.config.num_replicas
        ),
        // No leader: the replicas are no one's followers.
        None => format!(
            "; {} replicas, no leader, replicas: {listed}",
            info.config.num_replicas
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::{failing, is_not_found, leaderless, replication};
    use async_nats::jetstream::context::{GetStreamError, GetStreamErrorKind};

    /// Only JetStream's "stream not found" is a missing stream: a server with JetStream off
    /// (no answer) was told to run `chctl setup`, which then said JetStream is off.
    #[test]
    fn only_stream_not_found_is_missing() {
        let answer: async_nats::jetstream::Error = serde_json::from_str(
            r#"{"code": 404, "err_code": 10059, "description": "stream not found"}"#,
        )
        .unwrap();
        assert!(is_not_found(&GetStreamError::new(
            GetStreamErrorKind::JetStream(answer)
        )));
        assert!(!is_not_found(&GetStreamError::new(
            GetStreamErrorKind::Request
        )));
    }

    #[test]
    fn instances_failing_five_times_in_a_row_are_named() {
        let reply = |id: &str, failures: i64| {
            serde_json::json!({"id": id, "endpoints": [
                {"name": "status", "data": {"gauges": {"consecutive_failures": failures}}},
                {"name": "rebuild", "data": {"gauges": {"consecutive_failures": failures}}},
            ]})
        };
        let replies = [
            reply("a", 0),
            reply("b", 4),
            reply("c", 5),
            serde_json::json!({}),
        ];
        assert_eq!(failing(&replies), vec![("c".to_owned(), 5)]);
    }
    use async_nats::jetstream::stream::Info;

    fn info(replicas: usize, cluster: serde_json::Value) -> Info {
        let subjects = ch_runtime::Subjects::new("ch");
        let config = ch_runtime::eventstore::stream_config(&subjects, replicas).expect("config");
        serde_json::from_value(serde_json::json!({
            "config": config,
            "created": "2026-11-30T17:05:38Z",
            "state": {"messages": 25, "bytes": 1, "first_seq": 1, "first_ts": "2026-11-30T17:05:38Z",
                      "last_seq": 25, "last_ts": "2026-11-30T17:05:38Z", "consumer_count": 3},
            "cluster": cluster,
        }))
        .expect("stream info")
    }

    #[test]
    fn a_replicated_streams_leader_and_followers_are_listed() {
        let i = info(
            3,
            serde_json::json!({"name": "ch-cluster", "leader": "ch-n1", "replicas": [
                {"name": "ch-n2", "current": false, "offline": true, "active": 0, "lag": 28},
                {"name": "ch-n3", "current": true, "active": 0}
            ]}),
        );
        // An offline replica's lag is as last seen: left out.
        assert_eq!(
            replication(&i),
            "; 3 replicas, leader ch-n1, followers: ch-n2 offline, ch-n3 current"
        );
        // Heard from 2 ms ago (`active`, in nanoseconds).
        let i = info(
            3,
            serde_json::json!({"name": "ch-cluster", "leader": "ch-n1", "replicas": [
                {"name": "ch-n2", "current": false, "active": 2_000_000, "lag": 3},
                {"name": "ch-n3", "current": true, "active": 0, "lag": 0}
            ]}),
        );
        assert_eq!(
            replication(&i),
            "; 3 replicas, leader ch-n1, followers: ch-n2 catching up (3 raft entries behind), \
             ch-n3 current"
        );
        assert!(!leaderless(&i));
    }

    /// A crashed follower is not "catching up" with a growing lag for the minutes until the
    /// group calls it offline: the leader has not heard from it for 35 s, or ever (a new
    /// leader).
    #[test]
    fn a_follower_not_heard_from_is_not_responding() {
        let i = info(
            3,
            serde_json::json!({"name": "ch-cluster", "leader": "ch-n1", "replicas": [
                {"name": "ch-n2", "current": false, "active": 35_308_550_775u64, "lag": 3267},
                {"name": "ch-n3", "current": false, "active": 0, "lag": 12}
            ]}),
        );
        assert_eq!(
            replication(&i),
            "; 3 replicas, leader ch-n1, followers: ch-n2 not responding (last heard from 35 s \
             ago), ch-n3 not heard from since the leader changed"
        );
    }

    /// Two of three nodes down: no leader, nothing can be stored, and status fails.
    #[test]
    fn a_stream_without_a_leader_is_a_problem() {
        let i = info(
            3,
            serde_json::json!({"name": "ch-cluster", "replicas": [
                {"name": "ch-n1", "current": false, "offline": true, "active": 0},
                {"name": "ch-n3", "current": true, "active": 0}
            ]}),
        );
        assert!(leaderless(&i));
        assert_eq!(
            replication(&i),
            "; 3 replicas, no leader, replicas: ch-n1 offline, ch-n3 current"
        );
        assert!(!leaderless(&info(1, serde_json::json!({"name": "ch"}))));
    }

    #[test]
    fn a_single_replica_says_nothing_more() {
        let i = info(1, serde_json::json!({"name": "ch", "leader": "ch-dev"}));
        assert_eq!(replication(&i), "");
    }
}
