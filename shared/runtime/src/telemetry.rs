//! Logging: `tracing` with `RUST_LOG` (default `info`, async-nats at `warn`: its connection
//! events are logged by `crate::log_event`), text or JSON (`CH_LOG_FORMAT=json`).

use tracing_subscriber::EnvFilter;

/// The filter when `RUST_LOG` is unset or empty.
const DEFAULT_FILTER: &str = "info,async_nats=warn";

/// `RUST_LOG`'s filter, the default when it is unset or empty, and what was wrong with it.
fn filter(rust_log: Option<&str>) -> (EnvFilter, Option<String>) {
    match rust_log.map(str::trim).filter(|v| !v.is_empty()) {
        None => (EnvFilter::new(DEFAULT_FILTER), None),
        Some(v) => match EnvFilter::builder().parse(v) {
            Ok(f) => (f, None),
            Err(e) => (
                EnvFilter::new(DEFAULT_FILTER),
                Some(format!(
                    "RUST_LOG={v:?} ignored ({e}); logging at {DEFAULT_FILTER}"
                )),
            ),
        },
    }
}

/// Whether `rust_log` is a filter [`init`] takes (not empty, and valid).
pub fn takes(rust_log: &str) -> bool {
    filter(Some(rust_log)).1.is_none() && !rust_log.trim().is_empty()
}

/// Installs the global subscriber once; later calls are no-ops (tests start many workers).
pub fn init(json: bool) {
    let (filter, bad) = filter(std::env::var("RUST_LOG").ok().as_deref());
    // Colours for a terminal only: in a file, a pipe or a container's log, escape codes
    // break every grep for a field (NO_COLOR, set, turns them off there too).
    let colours = std::io::IsTerminal::is_terminal(&std::io::stdout())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(colours);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    if let Some(why) = bad {
        tracing::warn!("{why}");
    }
}

/// Like [`init`], but writing through the test harness's capture (tests print only on failure).
pub fn init_for_tests() {
    let (filter, _) = filter(std::env::var("RUST_LOG").ok().as_deref());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_test_writer()
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_or_invalid_rust_log_keeps_the_default() {
        let default = EnvFilter::new(DEFAULT_FILTER).to_string();
        assert_eq!(filter(None).0.to_string(), default);
        // Empty: every log line was off, errors included.
        assert_eq!(filter(Some(" ")).0.to_string(), default);
        let (f, why) = filter(Some("ch_runtime=verbose"));
        assert_eq!(f.to_string(), default);
        assert!(why
            .unwrap()
            .starts_with("RUST_LOG=\"ch_runtime=verbose\" ignored"));
        let (f, why) = filter(Some("debug"));
        assert_eq!((f.to_string(), why), ("debug".to_owned(), None));
        assert!(takes("debug") && !takes(" ") && !takes("ch_runtime=verbose"));
    }
}
