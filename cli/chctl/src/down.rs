//! `chctl down`: stops the workers of `up --detach`.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;

use crate::procs;

/// Stops the workers listed in `path` (`<run dir>/workers.pids`).
pub async fn run(path: &Path) -> Result<ExitCode> {
    let Some(entries) = procs::read_pid_file(path)? else {
        println!("nothing to stop: no {}", path.display());
        return Ok(ExitCode::SUCCESS);
    };
    let live: Vec<procs::Entry> = entries
        .iter()
        .filter(|e| procs::alive(e))
        .cloned()
        .collect();
    let dead = entries.len() - live.len();
    if !live.is_empty() {
        println!("stopping {} worker(s): {}", live.len(), names(&live));
    }
    let killed = procs::terminate(&live, Duration::from_secs(10)).await;
    procs::remove_pid_file(path);
    if dead > 0 {
        println!("{dead} worker(s) had already exited");
    }
    if killed.is_empty() {
        println!("stopped");
        Ok(ExitCode::SUCCESS)
    } else {
        // Stopped, but not cleanly: what they had in hand was cut short.
        eprintln!(
            "killed (did not stop within 10 s of SIGTERM): {}",
            killed.join(", ")
        );
        Ok(ExitCode::FAILURE)
    }
}

fn names(entries: &[procs::Entry]) -> String {
    entries
        .iter()
        .map(|e| e.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}
