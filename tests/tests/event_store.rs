//! The event stream as API.md and DESIGN.md define it: append-only by its configuration, the
//! headers every event carries, and one stream per subject prefix.

use async_nats::jetstream;
use ch_domain::AggregateType;
use ch_e2e::fixtures::{attach, deposit, open, seq, strategy};
use ch_e2e::{TestEnv, Worker};
use ch_runtime::eventstore;
use ch_runtime::Subjects;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_is_append_only_and_its_events_carry_their_headers() {
    let mut env = TestEnv::new().await;
    env.start(Worker::CmdPortfolio).await;
    env.cmd("portfolio.update", open("p1", "u1")).await;
    let deposited = env.cmd("portfolio.update", deposit("p1", "100")).await;

    let cfg = env.stream_info().await.config;
    assert!(cfg.deny_delete && cfg.deny_purge, "{cfg:?}");
    assert!(cfg.allow_direct, "{cfg:?}");
    assert_eq!(cfg.duplicate_window, Duration::from_secs(600));
    assert_eq!(
        cfg.subjects,
        [format!("{}.events.>", env.subjects.prefix())]
    );
    let js = jetstream::new(env.client.clone());
    let stream = js
        .get_stream(env.subjects.stream_name())
        .await
        .expect("stream");
    assert!(stream.delete_message(seq(&deposited)).await.is_err());
    assert!(stream.purge().await.is_err());
    assert_eq!(env.last_seq().await, seq(&deposited));

    let raw = stream
        .get_raw_message(seq(&deposited))
        .await
        .expect("the deposit");
    let header = |name: &str| {
        raw.headers
            .get(name)
            .map(|v| v.as_str().to_owned())
            .unwrap_or_else(|| panic!("no {name} header: {:?}", raw.headers))
    };
    assert_eq!(header("Ch-Event-Type"), "FundsDeposited");
    assert_eq!(header("Ch-Schema-Version"), "1");
    assert_eq!(header("Content-Type"), "application/json");
    assert_eq!(
        header("Nats-Msg-Id"),
        format!(
            "event-{}",
            deposited["events"][0]["event_id"].as_str().unwrap()
        )
    );
}

/// `ch` and `CH`, or `a-b` and `a_b`, name the same stream: set-up for the second refuses to
/// take the first's over, which keeps its subjects and its workers' appends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_that_names_another_prefixs_stream_is_refused() {
    let mut env = TestEnv::new().await;
    env.start(Worker::CmdPortfolio).await;
    let js = jetstream::new(env.client.clone());
    let upper = Subjects::new(env.subjects.prefix().to_uppercase());
    assert_eq!(upper.stream_name(), env.subjects.stream_name());
    let refused = eventstore::ensure_stream(&js, &upper, 1)
        .await
        .expect_err("another prefix's stream taken over");
    assert!(
        refused.to_string().contains("share a stream name"),
        "{refused}"
    );
    // Nor does a worker of the second prefix start on it: its projectors would replace the
    // first's consumers with their own (they started, and took turns replacing each other's).
    let refused = eventstore::EventStore::open(env.client.clone(), upper)
        .await
        .err()
        .expect("a worker started on another prefix's stream");
    assert!(
        refused.to_string().contains("share a stream name"),
        "{refused}"
    );
    let cfg = env.stream_info().await.config;
    assert_eq!(
        cfg.subjects,
        [format!("{}.events.>", env.subjects.prefix())]
    );
    env.cmd("portfolio.update", open("p1", "u1")).await;
}

/// A stream of the prefix's name made by hand (`nats stream add` with its defaults) has no
/// direct gets, which every read of an aggregate is: a worker refuses to start on it, saying
/// so, rather than answer every command `unavailable` after 15 s; once `chctl setup` has set
/// it, the worker starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_does_not_start_on_a_stream_setup_did_not_make() {
    let env = TestEnv::new().await;
    let js = jetstream::new(env.client.clone());
    let subjects = Subjects::new(format!("{}h", env.subjects.prefix()));
    js.create_stream(jetstream::stream::Config {
        name: subjects.stream_name(),
        subjects: vec![subjects.events_filter()],
        ..Default::default()
    })
    .await
    .expect("a stream made by hand");
    let refused = eventstore::EventStore::open(env.client.clone(), subjects.clone())
        .await
        .err()
        .expect("a worker started on a stream without direct gets");
    assert!(refused.to_string().contains("allow_direct"), "{refused}");

    eventstore::ensure_stream(&js, &subjects, 1)
        .await
        .expect("set-up");
    eventstore::EventStore::open(env.client.clone(), subjects.clone())
        .await
        .expect("the stream as set-up makes it");
    js.delete_stream(subjects.stream_name())
        .await
        .expect("gone");
}

/// A single server refuses a replicated stream for good: set-up says so at once, naming the
/// setting, rather than asking again for its 30 s as it would a cluster still forming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_a_single_server_are_refused_at_once() {
    let env = TestEnv::new().await;
    let js = jetstream::new(env.client.clone());
    let other = Subjects::new(format!("{}r", env.subjects.prefix()));
    let refused = eventstore::ensure_stream(&js, &other, 3)
        .await
        .expect_err("a replicated stream on one server");
    assert!(
        refused
            .to_string()
            .contains("CH_STREAM_REPLICAS=3 needs a JetStream cluster"),
        "{refused}"
    );
}

/// Set-up on a stream an operator made otherwise: the settings the workers rely on are brought
/// back, the operator's others (memory storage, an age limit: NATS would refuse to change the
/// storage) are kept and reported as risks; a projector's durable is brought to its shipped
/// definition in what NATS lets change, and one whose ack policy differs is left to its
/// projector.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_up_brings_back_what_the_workers_rely_on_and_reports_the_rest() {
    use async_nats::jetstream::consumer::{pull, AckPolicy};
    use async_nats::jetstream::stream::{Config, StorageType};
    use eventstore::{ConsumerSetup, StreamSetup};

    let env = TestEnv::new().await;
    let js = jetstream::new(env.client.clone());
    let other = Subjects::new(format!("{}s", env.subjects.prefix()));
    js.create_stream(Config {
        name: other.stream_name(),
        subjects: vec![other.events_filter()],
        storage: StorageType::Memory,
        max_age: Duration::from_secs(3600),
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .expect("an operator's stream");
    let (stream, done, risks) = eventstore::ensure_stream_reporting(&js, &other, 1)
        .await
        .expect("set-up keeps what it cannot change");
    assert_eq!(
        done,
        StreamSetup::Updated(vec![
            "deny_delete",
            "deny_purge",
            "allow_direct",
            "duplicate_window"
        ])
    );
    assert_eq!(risks.len(), 2, "{risks:?}");
    assert!(
        risks[0].contains("memory") && risks[1].contains("max_age"),
        "{risks:?}"
    );
    let cfg = stream.clone().info().await.unwrap().config.clone();
    assert!(
        cfg.deny_delete && cfg.deny_purge && cfg.allow_direct,
        "{cfg:?}"
    );
    assert_eq!(cfg.duplicate_window, Duration::from_secs(600));
    assert_eq!(cfg.storage, StorageType::Memory);
    let (_, again, _) = eventstore::ensure_stream_reporting(&js, &other, 1)
        .await
        .unwrap();
    assert_eq!(again, StreamSetup::InPlace);

    let shipped =
        || eventstore::consumer_config(eventstore::CONSUMER_PORTFOLIO_JSON, &other).unwrap();
    assert_eq!(
        eventstore::ensure_consumer(&stream, shipped())
            .await
            .unwrap(),
        ConsumerSetup::Created
    );
    assert_eq!(
        eventstore::ensure_consumer(&stream, shipped())
            .await
            .unwrap(),
        ConsumerSetup::InPlace
    );
    let durable = shipped().durable_name.unwrap();
    // Set-up over a durable someone made as `made`.
    let over = |made: pull::Config| {
        let (stream, durable) = (&stream, &durable);
        async move {
            let _ = stream.delete_consumer(durable).await;
            stream.create_consumer(made).await.expect("the durable");
            eventstore::ensure_consumer(stream, shipped())
                .await
                .unwrap()
        }
    };
    let changed = pull::Config {
        max_deliver: 1,
        ack_wait: Duration::from_secs(1),
        ..shipped()
    };
    assert_eq!(
        over(changed).await,
        ConsumerSetup::Updated(vec!["ack_wait", "max_deliver"])
    );
    let info = stream.consumer_info(&durable).await.unwrap();
    assert_eq!(
        (info.config.max_deliver, info.config.ack_wait),
        (10, Duration::from_secs(30))
    );
    // Headers only, every event would be dead-lettered: brought back.
    let headers_only = pull::Config {
        headers_only: true,
        ..shipped()
    };
    assert_eq!(
        over(headers_only).await,
        ConsumerSetup::Updated(vec!["headers_only"])
    );
    // What NATS does not update is its projector's to replace.
    let max_waiting = pull::Config {
        max_waiting: 100,
        ..shipped()
    };
    assert_eq!(
        over(max_waiting).await,
        ConsumerSetup::LeftToProjector(vec!["max_waiting"])
    );
    let explicit = pull::Config {
        ack_policy: AckPolicy::Explicit,
        ..shipped()
    };
    assert_eq!(
        over(explicit).await,
        ConsumerSetup::LeftToProjector(vec!["ack_policy"])
    );
    js.delete_stream(other.stream_name()).await.unwrap();
}

/// A subject whose events add up to more than one batched direct get answers (1 MB, which the
/// load asks for; the server's `max_pending` for the connection, 64 MB by default, would end it
/// too) is loaded whole: the end-of-batch status says how many are left. A cold worker then
/// decides on the whole history: an attach of the strategy deleted after its large updates is
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_load_of_a_subject_larger_than_a_batch_is_complete() {
    let mut env = TestEnv::new().await;
    env.start(Worker::CmdStrategy).await;
    // About 100 KB an event: twelve of them are more than one batch.
    let symbols = |round: usize| -> Vec<String> {
        (0..7_000).map(|i| format!("S{round}X{i}-USDT")).collect()
    };
    let first = symbols(0);
    let first: Vec<&str> = first.iter().map(String::as_str).collect();
    env.cmd("strategy.create", strategy("u1", "s1", &first))
        .await;
    for round in 1..12 {
        let mut body = strategy("u1", "s1", &[]);
        body["risk_profile"]["allowed_symbols"] = serde_json::json!(symbols(round));
        body.as_object_mut().unwrap().remove("user_id");
        env.cmd("strategy.update", body).await;
    }
    env.cmd("strategy.delete", serde_json::json!({"strategy_id": "s1"}))
        .await;
    let stored = env.subject_count(AggregateType::Strategy, "s1").await;
    assert_eq!(stored, 13);
    let loaded = env
        .event_store()
        .await
        .load(AggregateType::Strategy, "s1", 0)
        .await
        .expect("loaded");
    assert_eq!(
        loaded.len() as u64,
        stored,
        "a cold load read part of the subject"
    );

    env.start(Worker::CmdPortfolio).await;
    env.cmd("portfolio.update", open("p1", "u1")).await;
    let refused = env
        .request("cmd.portfolio.update", attach("p1", "s1"))
        .await;
    assert_eq!(
        refused.code(),
        Some("strategy_deleted"),
        "{:?}",
        refused.body
    );
}

/// An append refused because the account's JetStream storage is used up (10002) is
/// `unavailable`, as other resource refusals are: a later try may get past it (API.md's 503),
/// where `internal` would tell the client of a bug.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_past_the_accounts_storage_limit_is_unavailable() {
    let server = ch_e2e::NatsServer::start_with(|port, dir| {
        format!(
            "listen: \"127.0.0.1:{port}\"\njetstream {{ store_dir: \"{}\" }}\n\
             accounts {{ CH: {{ jetstream: {{ max_file: 64KB, max_mem: 1MB }}, \
             users: [{{ user: ch, password: ch }}] }} }}\nno_auth_user: ch\n",
            dir.join("js").display()
        )
    })
    .await;
    let client = async_nats::connect(&server.url).await.expect("connect");
    let subjects = Subjects::new("limited");
    let js = jetstream::new(client.clone());
    eventstore::wait_ready(&js, Duration::from_secs(10))
        .await
        .expect("JetStream ready");
    eventstore::ensure_stream(&js, &subjects, 1)
        .await
        .expect("stream");
    let store = eventstore::EventStore::open(client, subjects)
        .await
        .expect("event store");
    let name = "n".repeat(4000);
    let mut last = 0;
    let refused = loop {
        let version = last + 1;
        match store
            .append(
                last,
                &[ch_e2e::fixtures::renamed("p1", version, &name)],
                &format!("c{version}"),
            )
            .await
        {
            Ok(appended) => last = appended.seqs[0],
            Err(e) => break e,
        }
        assert!(last < 100, "64 KB took 100 events of 4 KB");
    };
    assert!(
        matches!(refused, ch_runtime::error::StoreError::Unavailable(_)),
        "{refused:?}"
    );
    assert!(refused.to_string().contains("10002"), "{refused}");
}
