//! What the benchmark reads from this machine: CPU time of processes from `/proc/<pid>/stat`,
//! and the environment of a run (versions, CPUs, memory, git commit).

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};

use crate::procs;

/// CPU time (user + system) in clock ticks per process, grouped.
#[derive(Debug, Clone, Default)]
pub struct CpuSnapshot {
    /// group name -> pid -> ticks
    groups: BTreeMap<String, BTreeMap<i32, u64>>,
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
}

impl Watched {
    pub fn from_pid_file(path: &Path) -> Watched {
        match procs::read_pid_file(path) {
            Ok(Some(entries)) => {
                let live: Vec<procs::Entry> =
                    entries.into_iter().filter(procs::alive).collect();
                if live.is_empty() {
                    Watched {
                        workers: live,
                        missing: Some(format!(
                            "no live worker listed in {} (workers on another machine or started otherwise)",
                            path.display()
                        )),
                    }
                } else {
                    Watched {
                        workers: live,
                        missing: None,
                    }
                }
            }
            Ok(None) => Watched {
                workers: Vec::new(),
                missing: Some(format!(
                    "{} does not exist: the workers were not started by `chctl up` with this run dir (set CH_RUN_DIR)",
                    path.display()
                )),
            },
            Err(e) => Watched {
                workers: Vec::new(),
                missing: Some(format!("{e:#}")),
            },
        }
    }

    /// Reads the CPU time of every worker, of this process (`chctl-bench`: the load generator
    /// and, for the baseline, the monolith), and of the local `postgres` and `nats-server`
    /// processes (by name).
    pub fn snapshot(&self) -> CpuSnapshot {
        let mut s = CpuSnapshot::default();
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
                    "postgres" => "postgres",
                    "nats-server" => "nats-server",
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

/// CPU seconds per group between two snapshots. A process that started in between counts
/// from 0; one that exited in between is lost (short-lived Postgres backends only).
pub fn cpu_seconds(before: &CpuSnapshot, after: &CpuSnapshot) -> BTreeMap<String, f64> {
    let hz = rustix::param::clock_ticks_per_second().max(1) as f64;
    after
        .groups
        .iter()
        .map(|(g, pids)| {
            let empty = BTreeMap::new();
            let old = before.groups.get(g).unwrap_or(&empty);
            let ticks: u64 = pids
                .iter()
                .map(|(pid, t)| t.saturating_sub(old.get(pid).copied().unwrap_or(0)))
                .sum();
            (g.clone(), ticks as f64 / hz)
        })
        .collect()
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
    let git = |args: &[&str]| {
        std::process::Command::new("git")
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
        .and_then(|_| git(&["status", "--porcelain", "--untracked-files=no"]))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_cpu_time() {
        let me = std::process::id() as i32;
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        assert!(ticks(me).is_some());
        assert!(comm(me).is_some());
    }
}
