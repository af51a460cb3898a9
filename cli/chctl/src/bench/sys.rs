//! What the benchmark reads from this machine: CPU time of processes from `/proc/<pid>/stat`,
//! and the environment of a run (versions, CPUs, memory, git commit).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::{json, Value};

use ch_runtime::pg;
use hdrhistogram::Histogram;

use super::load;
use crate::procs;

/// CPU time (user + system) in clock ticks per process, grouped.
#[derive(Debug, Clone, Default)]
pub struct CpuSnapshot {
    /// group name -> pid -> ticks
    groups: BTreeMap<String, BTreeMap<i32, u64>>,
    /// Postgres backend pid -> its session's `application_name` (a worker's service name).
    backends: BTreeMap<i32, String>,
}

/// What `pg_stat_activity` says about the Postgres processes.
#[derive(Debug, Clone, Default)]
struct Backends {
    /// This database's backends with a name: pid -> `application_name`.
    named: BTreeMap<i32, String>,
    /// Backends of other databases: another tenant's work, not this run's.
    foreign: BTreeSet<i32>,
}

/// CPU seconds spent between two snapshots.
#[derive(Debug, Clone, Default)]
pub struct CpuUse {
    /// By group: a worker's name, `chctl-bench`, `postgres`, `nats-server`.
    pub processes: BTreeMap<String, f64>,
    /// Postgres' part of it by the `application_name` of the session each backend serves
    /// (each worker's sessions carry its service name); `(other)` for the server's own
    /// processes and sessions without a name.
    pub postgres_by_application: BTreeMap<String, f64>,
}

/// utime + stime of `pid`, in clock ticks.
fn ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid ...`: fields after the last `)`, state being field 3; utime and
    // stime are fields 14 and 15.
    let (_, rest) = stat.rsplit_once(')')?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn comm(pid: i32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_owned())
}

/// The processes whose CPU time the benchmark follows.
pub struct Watched {
    /// Workers from `workers.pids` (`name pid`), alive.
    pub workers: Vec<procs::Entry>,
    /// Why there are none, if so.
    pub missing: Option<String>,
    /// Where to ask which session each Postgres backend serves.
    database_url: Option<String>,
    /// The client ports of the NATS servers on this machine that the run uses: only the
    /// nats-servers listening there count (`None`: every local nats-server).
    nats_ports: Option<Vec<u16>>,
}

impl Watched {
    pub fn from_pid_file(path: &Path) -> Watched {
        let (workers, missing) = match procs::read_pid_file(path) {
            Ok(Some(entries)) => {
                let live: Vec<procs::Entry> =
                    entries.into_iter().filter(procs::alive).collect();
                let missing = live.is_empty().then(|| {
                    format!(
                        "no live worker listed in {} (workers on another machine or started otherwise)",
                        path.display()
                    )
                });
                (live, missing)
            }
            Ok(None) => (
                Vec::new(),
                Some(format!(
                    "{} does not exist: the workers were not started by `chctl up` with this run dir (set CH_RUN_DIR)",
                    path.display()
                )),
            ),
            Err(e) => (Vec::new(), Some(format!("{e:#}"))),
        };
        Watched {
            workers,
            missing,
            database_url: None,
            nats_ports: None,
        }
    }

    /// Counts only the local nats-servers listening on the ports of `nats_url`'s servers (a
    /// cluster's nodes, comma-separated; 4222 without a port), found by their sockets: others
    /// on the machine (a system one, another checkout's) are not this run's. By port alone,
    /// whatever the host is called: servers elsewhere are not on this machine to count (but
    /// for one here on the same port), and a local one of another user (its sockets are not
    /// readable) or in a container is not counted.
    pub fn with_nats(mut self, nats_url: &str) -> Watched {
        // As the workers read the list (an invalid one counts none).
        let servers = ch_runtime::server_list(nats_url).unwrap_or_default();
        self.nats_ports = Some(servers.iter().map(async_nats::ServerAddr::port).collect());
        self
    }

    /// Also splits the local Postgres' CPU time by the session each backend serves, as
    /// `pg_stat_activity` at `database_url` names it.
    pub fn with_database(mut self, database_url: &str) -> Watched {
        self.database_url = Some(database_url.to_owned());
        self
    }

    /// Reads the CPU time of every worker, of this process (`chctl-bench`: the load generator
    /// and, for the baseline, the monolith), of the local `postgres` processes but other
    /// databases' backends, and of the run's local `nats-server`s (see [`Watched::with_nats`]);
    /// and which session each Postgres backend serves.
    pub async fn snapshot(&self) -> CpuSnapshot {
        let backends = match &self.database_url {
            Some(url) => backends(url).await,
            None => Backends::default(),
        };
        let nats = self.nats_ports.as_deref().map(listener_inodes);
        let mut s = CpuSnapshot {
            backends: backends.named,
            ..CpuSnapshot::default()
        };
        for e in &self.workers {
            if let Some(t) = ticks(e.pid) {
                s.groups.entry(e.name.clone()).or_default().insert(e.pid, t);
            }
        }
        let me = std::process::id() as i32;
        if let Some(t) = ticks(me) {
            s.groups
                .entry("chctl-bench".into())
                .or_default()
                .insert(me, t);
        }
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for d in dir.flatten() {
                let Some(pid) = d.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                    continue;
                };
                let Some(name) = comm(pid) else { continue };
                let group = match name.as_str() {
                    "postgres" if !backends.foreign.contains(&pid) => "postgres",
                    "nats-server" if nats.as_ref().is_none_or(|l| holds_socket(pid, l)) => {
                        "nats-server"
                    }
                    _ => continue,
                };
                if let Some(t) = ticks(pid) {
                    s.groups.entry(group.into()).or_default().insert(pid, t);
                }
            }
        }
        s
    }
}

impl CpuUse {
    /// `postgres CPU s by session: a 1.234, b 0.5` (most first), or nothing without the split.
    pub fn postgres_line(&self) -> Option<String> {
        let mut parts: Vec<(&String, &f64)> = self.postgres_by_application.iter().collect();
        parts.sort_by(|a, b| b.1.total_cmp(a.1));
        (!parts.is_empty()).then(|| {
            let parts: Vec<String> = parts.iter().map(|(k, v)| format!("{k} {v:.3}")).collect();
            format!("postgres CPU s by session: {}", parts.join(", "))
        })
    }
}

/// The `application_name` of each of this database's backends with one, and the backends of
/// other databases; nothing when the database cannot be asked (the split is then left out,
/// the totals stay).
async fn backends(database_url: &str) -> Backends {
    let Ok(db) = pg::connect(database_url, None).await else {
        return Backends::default();
    };
    let rows = db
        .query(
            "SELECT pid, application_name, datname IS NOT NULL AND datname <> current_database()
             FROM pg_stat_activity",
            &[],
        )
        .await
        .unwrap_or_default();
    let mut b = Backends::default();
    for r in &rows {
        let (pid, name, foreign): (i32, Option<String>, bool) = (r.get(0), r.get(1), r.get(2));
        if foreign {
            b.foreign.insert(pid);
        } else if let Some(name) = name.filter(|n| !n.is_empty()) {
            b.named.insert(pid, name);
        }
    }
    b
}

/// The inodes of the TCP sockets listening on `ports` (`/proc/net/tcp` and `tcp6`).
fn listener_inodes(ports: &[u16]) -> BTreeSet<u64> {
    let ports: Vec<String> = ports.iter().map(|p| format!(":{p:04X}")).collect();
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|table| {
            table
                .lines()
                .skip(1)
                .filter_map(|line| {
                    // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
                    let f: Vec<&str> = line.split_whitespace().collect();
                    let listening = f.get(3) == Some(&"0A");
                    let local = f.get(1)?;
                    let ours = ports.iter().any(|p| local.ends_with(p.as_str()));
                    (listening && ours).then(|| f.get(9)?.parse().ok())?
                })
                .collect::<Vec<u64>>()
        })
        .collect()
}

/// Whether `pid` has one of the sockets `inodes` open.
fn holds_socket(pid: i32, inodes: &BTreeSet<u64>) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .ok()
            .and_then(|l| {
                let l = l.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?;
                l.parse().ok()
            })
            .is_some_and(|inode: u64| inodes.contains(&inode))
    })
}

/// CPU seconds between two snapshots. A process that started in between counts from 0; one
/// that exited in between is lost (short-lived Postgres backends only).
pub fn cpu_seconds(before: &CpuSnapshot, after: &CpuSnapshot) -> CpuUse {
    let hz = rustix::param::clock_ticks_per_second().max(1) as f64;
    let empty = BTreeMap::new();
    let spent = |g: &str, pid: i32, t: u64| {
        let old = before.groups.get(g).unwrap_or(&empty);
        t.saturating_sub(old.get(&pid).copied().unwrap_or(0)) as f64 / hz
    };
    let mut used = CpuUse::default();
    for (g, pids) in &after.groups {
        used.processes.insert(
            g.clone(),
            pids.iter().map(|(&pid, &t)| spent(g, pid, t)).sum(),
        );
    }
    if after.backends.is_empty() && before.backends.is_empty() {
        return used;
    }
    for (&pid, &t) in after.groups.get("postgres").unwrap_or(&empty) {
        let name = after
            .backends
            .get(&pid)
            .or_else(|| before.backends.get(&pid));
        *used
            .postgres_by_application
            .entry(name.map_or_else(|| "(other)".to_owned(), Clone::clone))
            .or_default() += spent("postgres", pid, t);
    }
    used
}

/// Facts about the machine and the code.
pub fn machine() -> Value {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_mb = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb / 1024);
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|v| v.split_once(':'))
        .map(|(_, m)| m.trim().to_owned());
    // The source tree this chctl was built from (where cargo found its manifest), as it is
    // now, not the directory it runs in: null where that tree is not (a binary copied
    // elsewhere). `make bench` builds just before it runs.
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(env!("CARGO_MANIFEST_DIR"))
            .args(args)
            .stderr(std::process::Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let commit = git(&["rev-parse", "HEAD"]);
    let dirty = commit
        .as_ref()
        .and_then(|_| git(&["status", "--porcelain"]))
        .map(|s| !s.is_empty());
    json!({
        "cpus": cpus,
        "cpu_model": cpu_model,
        "memory_mb": mem_mb,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").ok().map(|s| s.trim().to_owned()),
        "git_commit": commit,
        "git_dirty": dirty,
    })
}

/// How long a synced 4 KiB write takes in `dir`, as `dd oflag=dsync` measures it: `count`
/// appends to a new file, each followed by `fdatasync`; p50, p90, mean and max in ms, `dir`,
/// or the error. With `always`, JetStream waits for such a sync on every append, so this
/// figure bounds that run's commands/s; it is the disk of the benchmark's host, which is the
/// NATS store's only when they share it (as under `make bench`).
pub fn sync_write_ms(dir: &Path, count: usize) -> Value {
    use std::io::Write;
    let probe = || -> std::io::Result<Histogram<u64>> {
        let path = dir.join(format!("chctl-sync-probe-{}", std::process::id()));
        let mut file = std::fs::File::create(&path)?;
        let block = [0x5a_u8; 4096];
        let mut took = load::new_hist();
        let result = (0..count).try_for_each(|_| {
            let t = std::time::Instant::now();
            file.write_all(&block)?;
            file.sync_data()?;
            took.saturating_record(t.elapsed().as_micros() as u64);
            Ok(())
        });
        let _ = std::fs::remove_file(&path);
        result.map(|()| took)
    };
    let mut v = match probe() {
        Ok(took) if !took.is_empty() => load::percentiles(&took, &[("p50", 0.5), ("p90", 0.9)]),
        Ok(_) => json!({"error": "no writes"}),
        Err(e) => json!({"error": e.to_string()}),
    };
    v["dir"] = json!(dir);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(postgres: &[(i32, u64)], backends: &[(i32, &str)]) -> CpuSnapshot {
        CpuSnapshot {
            groups: BTreeMap::from([("postgres".to_owned(), postgres.iter().copied().collect())]),
            backends: backends
                .iter()
                .map(|&(pid, name)| (pid, name.to_owned()))
                .collect(),
        }
    }

    /// Each backend's time goes to the session it served, named before or after (a backend
    /// opened during the phase counts from 0); the rest is `(other)`; the total is unchanged.
    #[test]
    fn postgres_time_is_split_by_the_session_of_each_backend() {
        let hz = rustix::param::clock_ticks_per_second() as f64;
        let before = snapshot(
            &[(10, 100), (11, 50), (12, 7)],
            &[(10, "proj"), (11, "query")],
        );
        let after = snapshot(
            &[(10, 300), (11, 150), (12, 9), (13, 40)],
            &[(11, "query"), (13, "query")],
        );
        let used = cpu_seconds(&before, &after);
        assert_eq!(used.processes["postgres"], 342.0 / hz);
        let split = &used.postgres_by_application;
        assert_eq!(split.len(), 3, "{split:?}");
        assert_eq!(split["proj"], 200.0 / hz);
        assert_eq!(split["query"], 140.0 / hz);
        assert_eq!(split["(other)"], 2.0 / hz);
        let line = used.postgres_line().expect("a split");
        assert!(
            line.starts_with("postgres CPU s by session: proj "),
            "{line}"
        );
        // Without names (a database that cannot be asked) there is no split.
        let unnamed = cpu_seconds(&snapshot(&[(10, 1)], &[]), &snapshot(&[(10, 5)], &[]));
        assert!(unnamed.postgres_by_application.is_empty());
        assert_eq!(unnamed.postgres_line(), None);
    }

    /// The probe measures real synced writes and leaves nothing behind; a directory that
    /// cannot be written to is reported, not fatal.
    #[test]
    fn a_synced_write_is_timed_and_cleaned_up() {
        let dir = std::env::temp_dir().join(format!("chctl-sync-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let v = sync_write_ms(&dir, 5);
        assert_eq!(v["count"], 5, "{v}");
        let (p50, p90) = (v["p50"].as_f64().unwrap(), v["p90"].as_f64().unwrap());
        assert!(p50 > 0.0 && p90 >= p50, "{v}");
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            0,
            "probe file left behind"
        );
        std::fs::remove_dir(&dir).unwrap();
        let missing = sync_write_ms(&dir, 5);
        assert!(
            missing["error"].is_string() && missing.get("p50").is_none(),
            "{missing}"
        );
    }

    #[test]
    fn the_ticks_read_follow_this_process_cpu_time() {
        let me = std::process::id() as i32;
        let before = ticks(me).expect("ticks of this process");
        // Work until the kernel has counted a tick more (10 ms of CPU), bounded.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let mut x = 0u64;
        while ticks(me).expect("ticks") == before {
            for i in 0..100_000u64 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
            }
            assert!(std::time::Instant::now() < deadline, "no tick counted");
        }
        assert!(ticks(me).unwrap() > before);
        assert!(comm(me).is_some_and(|c| !c.is_empty()));
    }

    /// Only the nats-server on the run's port counts: the listener found by its socket.
    #[test]
    fn the_process_listening_on_a_port_is_found_by_its_socket() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let me = std::process::id() as i32;
        let inodes = listener_inodes(&[1, port]);
        assert!(!inodes.is_empty(), "no listener on {port}");
        assert!(holds_socket(me, &inodes));
        drop(listener);
        assert!(!holds_socket(me, &listener_inodes(&[port])));
        let ports = |url: &str| {
            Watched::from_pid_file(Path::new("/nonexistent"))
                .with_nats(url)
                .nats_ports
                .unwrap()
        };
        assert_eq!(ports("nats://u:p@127.0.0.1:14422"), [14422]);
        // A cluster's nodes, however they are named.
        assert_eq!(
            ports("nats://127.0.0.1:14231,nats://LOCALHOST:14232, tls://[::ffff:127.0.0.1]:14233"),
            [14231, 14232, 14233]
        );
        assert_eq!(ports("nats://[::1]"), [4222]);
    }
}
