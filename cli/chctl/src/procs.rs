//! Worker processes by pid: the pid file, liveness, signals.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rustix::process::{kill_process, test_kill_process, Pid, Signal};

/// One line of `workers.pids`: `name pid`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub pid: i32,
}

pub fn read_pid_file(path: &Path) -> Result<Option<Vec<Entry>>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    Ok(Some(parse(&text)))
}

fn parse(text: &str) -> Vec<Entry> {
    text.lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let name = parts.next()?.to_owned();
            // A process's pid only: kill(2) takes 0 and below for process groups, and -1 for
            // every process the user may signal.
            let pid = parts.next()?.parse().ok().filter(|&pid: &i32| pid > 0)?;
            Some(Entry { name, pid })
        })
        .collect()
}

pub fn write_pid_file(path: &Path, entries: &[Entry]) -> Result<()> {
    let text: String = entries
        .iter()
        .map(|e| format!("{} {}\n", e.name, e.pid))
        .collect();
    let tmp = path.with_extension("pids.tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

pub fn remove_pid_file(path: &Path) {
    let _ = std::fs::remove_file(path);
}

/// Is `pid` a live process running the worker `name`? A zombie is dead; a pid reused by
/// another program (its argv[0] is not the worker) is not ours.
pub fn alive(e: &Entry) -> bool {
    let Some(pid) = process(e.pid) else {
        return false;
    };
    if test_kill_process(pid).is_err() {
        return false;
    }
    let proc_dir = Path::new("/proc").join(e.pid.to_string());
    if let Ok(stat) = std::fs::read_to_string(proc_dir.join("stat")) {
        // `pid (comm) S ...`: the state follows the last `)`.
        if stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        {
            return false;
        }
    }
    if let Ok(cmdline) = std::fs::read(proc_dir.join("cmdline")) {
        let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
        let argv0 = String::from_utf8_lossy(argv0);
        let base = Path::new(argv0.as_ref())
            .file_name()
            .map(|s| s.to_string_lossy().into_owned());
        return base.as_deref() == Some(e.name.as_str());
    }
    true
}

/// One process's pid: never 0 or below (a process group, or every process).
fn process(pid: i32) -> Option<Pid> {
    (pid > 0).then(|| Pid::from_raw(pid)).flatten()
}

/// Sends `sig`; a process that is already gone is fine.
pub fn signal(pid: i32, sig: Signal) {
    if let Some(pid) = process(pid) {
        let _ = kill_process(pid, sig);
    }
}

/// SIGTERMs every live entry, waits up to `grace` for them to exit, then SIGKILLs the rest.
/// Returns the names that had to be killed.
pub async fn terminate(entries: &[Entry], grace: Duration) -> Vec<String> {
    let live: Vec<&Entry> = entries.iter().filter(|e| alive(e)).collect();
    for e in &live {
        signal(e.pid, Signal::TERM);
    }
    let deadline = Instant::now() + grace;
    let mut delay = Duration::from_millis(10);
    loop {
        let left: Vec<&&Entry> = live.iter().filter(|e| alive(e)).collect();
        if left.is_empty() {
            return Vec::new();
        }
        if Instant::now() >= deadline {
            for e in &left {
                signal(e.pid, Signal::KILL);
            }
            return left.iter().map(|e| e.name.clone()).collect();
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_file_round_trip_and_junk() {
        let e = parse(
            "cmd-market 12\n\nbroken\nproj-strategy x\nquery-portfolio 7\n\
             cmd-signal -1\ncmd-strategy 0\nproj-portfolio -2147483647\n",
        );
        assert_eq!(
            e,
            vec![
                Entry {
                    name: "cmd-market".into(),
                    pid: 12
                },
                Entry {
                    name: "query-portfolio".into(),
                    pid: 7
                }
            ]
        );
    }
    /// kill(2) with -1 signals every process the user may: no such pid is a worker's.
    #[test]
    fn no_pid_below_1_is_alive_or_signalled() {
        for pid in [-1, 0, -2147483647] {
            let e = Entry {
                name: "cmd-market".into(),
                pid,
            };
            assert!(!alive(&e), "{pid}");
            signal(pid, Signal::CONT);
        }
    }

    #[test]
    fn this_process_is_alive_under_its_own_name_only() {
        let pid = i32::try_from(std::process::id()).unwrap();
        let me = std::env::current_exe().unwrap();
        let name = me.file_name().unwrap().to_string_lossy().into_owned();
        assert!(alive(&Entry { name, pid }));
        assert!(!alive(&Entry {
            name: "cmd-market".into(),
            pid
        }));
        assert!(!alive(&Entry {
            name: "x".into(),
            pid: i32::MAX
        }));
    }
}
