//! Driving a deployment over NATS: the set-up, the signal and query clients (closed loop, or
//! paced to a rate), the progress bar, and the projection lag from the projector's progress
//! announcements.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use async_nats::{Client, Request, RequestErrorKind};
use bytes::Bytes;
use futures::stream::{self, StreamExt};
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::workload::Workload;

/// Where requests go: `<prefix>.cmd.*` and `<prefix>.query.*`.
#[derive(Clone)]
pub struct Target {
    pub client: Client,
    pub prefix: String,
}

impl Target {
    pub fn cmd(&self, name: &str) -> String {
        format!("{}.cmd.{name}", self.prefix)
    }
    pub fn query(&self, name: &str) -> String {
        format!("{}.query.{name}", self.prefix)
    }
}

/// How a request ended.
pub enum Outcome {
    Ok(Bytes),
    /// An error reply: its code (`insufficient_funds`, ...).
    Api(String),
    /// No reply in time, no responders, or another transport error.
    Failed(&'static str),
}

pub async fn send(client: &Client, subject: &str, body: Bytes, timeout: Duration) -> Outcome {
    let req = Request::new().payload(body).timeout(Some(timeout));
    match client.send_request(subject.to_owned(), req).await {
        Ok(msg) => {
            let code = msg
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Service-Error-Code"))
                .is_some();
            if code {
                #[derive(Deserialize)]
                struct E {
                    error: Inner,
                }
                #[derive(Deserialize)]
                struct Inner {
                    code: String,
                }
                let code = serde_json::from_slice::<E>(&msg.payload)
                    .map(|e| e.error.code)
                    .unwrap_or_else(|_| "error".into());
                Outcome::Api(code)
            } else {
                Outcome::Ok(msg.payload)
            }
        }
        Err(e) => Outcome::Failed(match e.kind() {
            RequestErrorKind::TimedOut => "timeout",
            RequestErrorKind::NoResponders => "no_responders",
            _ => "transport",
        }),
    }
}

/// Error counts by code (API codes, `timeout`, `no_responders`, `transport`).
pub type Errors = BTreeMap<String, u64>;

fn count(errors: &mut Errors, code: &str) {
    *errors.entry(code.to_owned()).or_default() += 1;
}

#[derive(Deserialize)]
struct CommandReply {
    stream_seq: Option<u64>,
    status: Option<String>,
    reason: Option<String>,
}

/// What the set-up did.
pub struct Setup {
    pub seconds: f64,
    pub commands: u64,
    pub errors: Errors,
    /// The highest `stream_seq` of the replies.
    pub last_seq: u64,
}

const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Creates the strategies, then opens, funds and attaches the portfolios (not measured).
pub async fn setup(t: &Target, w: &Workload, concurrency: usize) -> Result<Setup> {
    let started = Instant::now();
    let strategy_subject = t.cmd("strategy.create");
    let portfolio_subject = t.cmd("portfolio.update");
    let results: Vec<(u64, Errors, u64)> = stream::iter(w.strategies.iter())
        .map(|s| {
            let subject = &strategy_subject;
            async move {
                let mut errors = Errors::new();
                let seq = record_setup(
                    send(&t.client, subject, s.body.clone(), SETUP_TIMEOUT).await,
                    &mut errors,
                );
                (1, errors, seq)
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let mut more: Vec<(u64, Errors, u64)> = stream::iter(w.portfolios.iter())
        .map(|p| {
            let subject = &portfolio_subject;
            async move {
                let mut errors = Errors::new();
                let mut last = 0;
                for body in &p.setup {
                    last = last.max(record_setup(
                        send(&t.client, subject, body.clone(), SETUP_TIMEOUT).await,
                        &mut errors,
                    ));
                }
                (p.setup.len() as u64, errors, last)
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    more.extend(results);
    let mut out = Setup {
        seconds: 0.0,
        commands: 0,
        errors: Errors::new(),
        last_seq: 0,
    };
    for (n, errors, seq) in more {
        out.commands += n;
        out.last_seq = out.last_seq.max(seq);
        for (k, v) in errors {
            *out.errors.entry(k).or_default() += v;
        }
    }
    out.seconds = started.elapsed().as_secs_f64();
    let failed: u64 = out.errors.values().sum();
    if failed > 0 {
        // No one answered: no workers on this prefix; else the ids were taken already.
        let hint = if out.errors.get("no_responders") == Some(&failed) {
            "no worker answers on this prefix: are they running (`chctl status`), on this \
             CH_SUBJECT_PREFIX?"
        } else {
            "a fresh deployment, or another --run-id?"
        };
        bail!(
            "the set-up failed for {failed} of {} commands: {:?} ({hint})",
            out.commands,
            out.errors
        );
    }
    Ok(out)
}

fn record_setup(o: Outcome, errors: &mut Errors) -> u64 {
    match o {
        Outcome::Ok(b) => serde_json::from_slice::<CommandReply>(&b)
            .ok()
            .and_then(|r| r.stream_seq)
            .unwrap_or(0),
        Outcome::Api(code) => {
            count(errors, &code);
            0
        }
        Outcome::Failed(why) => {
            count(errors, why);
            0
        }
    }
}

/// Waits until a query with `min_stream_seq = seq` answers (the read model caught up).
pub async fn wait_visible(
    t: &Target,
    portfolio_id: &str,
    seq: u64,
    limit: Duration,
) -> Result<f64> {
    let started = Instant::now();
    let subject = t.query("portfolio.performance");
    loop {
        let body =
            json!({"portfolio_id": portfolio_id, "min_stream_seq": seq, "timeout_ms": 10000});
        let o = send(
            &t.client,
            &subject,
            Bytes::from(body.to_string()),
            Duration::from_secs(12),
        )
        .await;
        match o {
            Outcome::Ok(_) => return Ok(started.elapsed().as_secs_f64()),
            Outcome::Api(code) if started.elapsed() > limit => {
                bail!("the read model did not reach seq {seq} within {limit:?} ({code})")
            }
            Outcome::Failed(why) if started.elapsed() > limit => {
                bail!("the read model did not reach seq {seq} within {limit:?} ({why})")
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Projection lag: from a command's reply to the announcement of a checkpoint at or past its
/// `stream_seq` on `<prefix>.progress.<projection>`.
pub struct LagTracker {
    inner: Mutex<LagInner>,
}

struct LagInner {
    announced: u64,
    pending: BTreeMap<u64, Instant>,
    hist: Histogram<u64>,
    samples: u64,
}

impl LagTracker {
    /// Subscribes to the announcements; the tracker follows them until the client closes.
    pub async fn start(client: &Client, subject: String) -> Result<Arc<Self>> {
        let tracker = Arc::new(LagTracker {
            inner: Mutex::new(LagInner {
                announced: 0,
                pending: BTreeMap::new(),
                hist: new_hist(),
                samples: 0,
            }),
        });
        let mut sub = client.subscribe(subject).await?;
        let t = Arc::downgrade(&tracker);
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let Some(t) = t.upgrade() else { break };
                if let Some(seq) = std::str::from_utf8(&msg.payload)
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                {
                    t.announced(seq, Instant::now());
                }
            }
        });
        Ok(tracker)
    }

    fn announced(&self, seq: u64, now: Instant) {
        let mut g = self.inner.lock().expect("lag lock");
        if seq <= g.announced {
            return;
        }
        g.announced = seq;
        let rest = g.pending.split_off(&(seq + 1));
        let done = std::mem::replace(&mut g.pending, rest);
        for (_, at) in done {
            let us = now.saturating_duration_since(at).as_micros() as u64;
            g.hist.saturating_record(us);
        }
    }

    /// A reply with `seq` arrived at `at`.
    pub fn sample(&self, seq: u64, at: Instant) {
        let mut g = self.inner.lock().expect("lag lock");
        g.samples += 1;
        if seq <= g.announced {
            // Already visible when the reply arrived.
            g.hist.saturating_record(0);
        } else {
            g.pending.insert(seq, at);
        }
    }

    pub fn announced_seq(&self) -> u64 {
        self.inner.lock().expect("lag lock").announced
    }

    /// Waits until every sample is resolved or `limit` passes; the histogram, the number of
    /// samples and how many stayed unresolved. An unresolved sample is recorded at its age
    /// when the wait ended, a lower bound of its lag: left out, it would flatter the tail.
    pub async fn finish(&self, limit: Duration) -> (Histogram<u64>, u64, u64) {
        let deadline = Instant::now() + limit;
        loop {
            let left = self.inner.lock().expect("lag lock").pending.len();
            if left == 0 || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut g = self.inner.lock().expect("lag lock");
        let now = Instant::now();
        let unresolved = std::mem::take(&mut g.pending);
        for at in unresolved.values() {
            let us = now.saturating_duration_since(*at).as_micros() as u64;
            g.hist.saturating_record(us);
        }
        (g.hist.clone(), g.samples, unresolved.len() as u64)
    }
}

/// A histogram of microseconds, 1 µs to 1 hour, 3 significant figures (values past the
/// bound are recorded as the bound).
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds")
}

/// How fast the clients send, in requests per second in all (`None`: closed loop, each client
/// sending its next request as soon as the last is answered).
#[derive(Debug, Clone, Copy, Default)]
pub struct Rates {
    pub signals: Option<u32>,
    pub queries: Option<u32>,
}

/// The schedule of a paced client: its sends are due every `1 / per_sec` seconds from its
/// first slot. A send waits for its slot; a client behind its schedule (replies slower than
/// the rate allows) sends at once until it has caught up, so the rate is the offered load as
/// long as the deployment keeps up. Latencies are measured from the slot, not from the actual
/// send: a send that went out late because the replies before it were slow counts the wait
/// (no coordinated omission), as a client on that schedule would see it.
pub struct Pace {
    next: tokio::time::Instant,
    period: Duration,
}

impl Pace {
    /// Client `i` of `clients` sharing `rate` requests per second in all, with `share` of
    /// the requests (so that clients with more to send finish with the others); the clients'
    /// first slots spread over one period. `None` without a rate (closed loop) or a share.
    pub fn new(
        rate: Option<u32>,
        share: f64,
        i: usize,
        clients: usize,
        start: Instant,
    ) -> Option<Pace> {
        let per_sec = f64::from(rate?) * share;
        if per_sec <= 0.0 {
            return None;
        }
        let period = Duration::from_secs_f64(1.0 / per_sec);
        let first = start + period.mul_f64(i as f64 / clients.max(1) as f64);
        Some(Pace {
            next: tokio::time::Instant::from_std(first),
            period,
        })
    }

    /// Waits for the next slot; returns when it was due.
    pub async fn wait(&mut self) -> Instant {
        let due = self.next;
        tokio::time::sleep_until(due).await;
        self.next += self.period;
        due.into_std()
    }

    /// Waits for the next slot of `pace`, if the client has one; returns where its latency
    /// counts from: the slot, or now for a closed-loop client.
    pub async fn wait_for(pace: &mut Option<Pace>) -> Instant {
        match pace {
            Some(p) => p.wait().await,
            None => Instant::now(),
        }
    }
}

/// The measured phase's results.
pub struct Phase {
    pub seconds: f64,
    pub commands: u64,
    pub command_latency: Histogram<u64>,
    pub executed: u64,
    pub rejected: u64,
    pub rejections: BTreeMap<String, u64>,
    pub command_errors: Errors,
    /// The portfolios of the signals that failed (their outcome is unknown to the client).
    pub failed_portfolios: BTreeSet<String>,
    pub queries: u64,
    pub query_latency: Histogram<u64>,
    pub query_errors: Errors,
    /// The highest `stream_seq` of the replies.
    pub last_seq: u64,
}

#[derive(Default)]
struct ClientResult {
    hist: Option<Histogram<u64>>,
    executed: u64,
    rejected: u64,
    rejections: BTreeMap<String, u64>,
    errors: Errors,
    failed_portfolios: BTreeSet<String>,
    last_seq: u64,
}

/// The `portfolio_id` of a signal's request body.
fn portfolio_of(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v["portfolio_id"].as_str().map(str::to_owned)
}

/// Sends every signal from `w.signals.len()` clients while `query_clients` ask for random
/// portfolios, each closed loop or paced to its share of `rates`; returns when the last signal
/// is answered.
pub async fn run(
    t: &Target,
    w: &Workload,
    query_clients: usize,
    rates: Rates,
    seed: u64,
    lag: Option<Arc<LagTracker>>,
    label: &str,
) -> Phase {
    let total: u64 = w.signals.iter().map(|s| s.len() as u64).sum();
    let done = Arc::new(AtomicU64::new(0));
    // Set once the last signal is answered: ends the progress bar and the query clients (a
    // paced one may be waiting for its next slot).
    let signals_done = CancellationToken::new();
    let timeout = Duration::from_secs(30);
    let started = Instant::now();
    let newest = Arc::new(AtomicU64::new(0));
    let bar = tokio::spawn(progress(
        label.to_owned(),
        total,
        done.clone(),
        signals_done.clone(),
        lag.clone().map(|l| (l, newest.clone())),
    ));

    let ids: Arc<Vec<String>> = Arc::new(w.portfolios.iter().map(|p| p.id.clone()).collect());
    let queries: Vec<_> = (0..query_clients)
        .map(|i| {
            let client = t.client.clone();
            let subject = t.query("portfolio.performance");
            let ids = ids.clone();
            let signals_done = signals_done.clone();
            let mut rng = StdRng::seed_from_u64(seed ^ (0x9e37_79b9_7f4a_7c15 + i as u64));
            let share = 1.0 / query_clients as f64;
            let mut pace = Pace::new(rates.queries, share, i, query_clients, started);
            tokio::spawn(async move {
                let mut hist = new_hist();
                let mut errors = Errors::new();
                let mut n = 0u64;
                while !signals_done.is_cancelled() && !ids.is_empty() {
                    let t0 = tokio::select! {
                        t0 = Pace::wait_for(&mut pace) => t0,
                        () = signals_done.cancelled() => break,
                    };
                    let id = &ids[rng.gen_range(0..ids.len())];
                    let body = Bytes::from(format!("{{\"portfolio_id\":\"{id}\"}}"));
                    let o = send(&client, &subject, body, timeout).await;
                    n += 1;
                    // The percentiles are the answered queries': a failure (no responders, an
                    // error reply) may come at once, and would flatter them.
                    match o {
                        Outcome::Ok(_) => hist.saturating_record(t0.elapsed().as_micros() as u64),
                        Outcome::Api(code) => count(&mut errors, &code),
                        Outcome::Failed(why) => count(&mut errors, why),
                    }
                }
                (hist, errors, n)
            })
        })
        .collect();

    let signals: Vec<_> = w
        .signals
        .iter()
        .enumerate()
        .map(|(i, list)| {
            let share = list.len() as f64 / total.max(1) as f64;
            let mut pace = Pace::new(rates.signals, share, i, w.signals.len(), started);
            let client = t.client.clone();
            let subject = t.cmd("signal.execute");
            let list = list.clone();
            let done = done.clone();
            let lag = lag.clone();
            let newest = newest.clone();
            tokio::spawn(async move {
                let mut r = ClientResult::default();
                let mut hist = new_hist();
                for body in list {
                    let t0 = Pace::wait_for(&mut pace).await;
                    let o = send(&client, &subject, body.clone(), timeout).await;
                    let at = Instant::now();
                    // An error: the signal's effect is unknown, and so its portfolio's state.
                    let failed = |r: &mut ClientResult, code: &str| {
                        count(&mut r.errors, code);
                        r.failed_portfolios.extend(portfolio_of(&body));
                    };
                    // The percentiles are the answered signals' (executed or rejected by a risk
                    // check): a failure may come at once (no responders), and would flatter them.
                    match o {
                        Outcome::Ok(b) => match serde_json::from_slice::<CommandReply>(&b) {
                            Ok(reply) => {
                                hist.saturating_record(at.duration_since(t0).as_micros() as u64);
                                if let Some(seq) = reply.stream_seq {
                                    r.last_seq = r.last_seq.max(seq);
                                    newest.fetch_max(seq, Ordering::Relaxed);
                                    if let Some(l) = &lag {
                                        l.sample(seq, at);
                                    }
                                }
                                if reply.status.as_deref() == Some("rejected") {
                                    r.rejected += 1;
                                    let reason = reply.reason.unwrap_or_else(|| "?".into());
                                    *r.rejections.entry(reason).or_default() += 1;
                                } else {
                                    r.executed += 1;
                                }
                            }
                            Err(_) => failed(&mut r, "unparsable_reply"),
                        },
                        Outcome::Api(code) => failed(&mut r, &code),
                        Outcome::Failed(why) => failed(&mut r, why),
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
                r.hist = Some(hist);
                r
            })
        })
        .collect();

    let mut phase = Phase {
        seconds: 0.0,
        commands: total,
        command_latency: new_hist(),
        executed: 0,
        rejected: 0,
        rejections: BTreeMap::new(),
        command_errors: Errors::new(),
        failed_portfolios: BTreeSet::new(),
        queries: 0,
        query_latency: new_hist(),
        query_errors: Errors::new(),
        last_seq: 0,
    };
    for h in signals {
        let Ok(r) = h.await else {
            count(&mut phase.command_errors, "client_panicked");
            continue;
        };
        if let Some(hist) = &r.hist {
            let _ = phase.command_latency.add(hist);
        }
        phase.executed += r.executed;
        phase.rejected += r.rejected;
        phase.last_seq = phase.last_seq.max(r.last_seq);
        merge(&mut phase.rejections, r.rejections);
        merge(&mut phase.command_errors, r.errors);
        phase.failed_portfolios.extend(r.failed_portfolios);
    }
    phase.seconds = started.elapsed().as_secs_f64();
    signals_done.cancel();
    for h in queries {
        if let Ok((hist, errors, n)) = h.await {
            let _ = phase.query_latency.add(&hist);
            merge(&mut phase.query_errors, errors);
            phase.queries += n;
        }
    }
    let _ = bar.await;
    phase
}

fn merge(into: &mut BTreeMap<String, u64>, from: BTreeMap<String, u64>) {
    for (k, v) in from {
        *into.entry(k).or_default() += v;
    }
}

/// A progress bar on stderr (a line every 5 s when stderr is not a terminal); with the lag
/// tracker, also how many events the read model is behind the newest reply.
async fn progress(
    label: String,
    total: u64,
    done: Arc<AtomicU64>,
    signals_done: CancellationToken,
    lag: Option<(Arc<LagTracker>, Arc<AtomicU64>)>,
) {
    let tty = std::io::stderr().is_terminal();
    let started = Instant::now();
    let every = if tty {
        Duration::from_millis(200)
    } else {
        Duration::from_secs(5)
    };
    let mut last_print = Instant::now();
    loop {
        let finished = signals_done.is_cancelled();
        let n = done.load(Ordering::Relaxed);
        if finished || last_print.elapsed() >= every {
            last_print = Instant::now();
            let secs = started.elapsed().as_secs_f64();
            let rate = n as f64 / secs.max(1e-3);
            let eta = if rate > 0.0 {
                format!("{:.0}s", (total.saturating_sub(n)) as f64 / rate)
            } else {
                "?".into()
            };
            let width = 30usize;
            let filled = if total == 0 {
                width
            } else {
                (n as usize * width / total as usize).min(width)
            };
            // Until the projector's first announcement its checkpoint is unknown: not 0.
            let behind = lag
                .as_ref()
                .map(|(l, newest)| match l.announced_seq() {
                    0 => "  read model: no checkpoint announced yet".to_owned(),
                    at => {
                        let b = newest.load(Ordering::Relaxed).saturating_sub(at);
                        format!("  read model {b} events behind")
                    }
                })
                .unwrap_or_default();
            let line = format!(
                "{label:<14} [{}{}] {n}/{total} signals  {rate:>7.0}/s  {secs:>5.1}s  eta {eta}{behind}",
                "#".repeat(filled),
                "-".repeat(width - filled),
            );
            let mut err = std::io::stderr().lock();
            if tty {
                let _ = write!(err, "\r{line}\x1b[K");
                if finished {
                    let _ = writeln!(err);
                }
            } else {
                let _ = writeln!(err, "{line}");
            }
            let _ = err.flush();
        }
        if finished {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `part / whole`, if there is a whole.
pub fn share(part: u64, whole: u64) -> Option<f64> {
    (whole > 0).then(|| part as f64 / whole as f64)
}

/// Percentiles of a histogram of microseconds, in milliseconds.
pub fn percentiles(h: &Histogram<u64>, qs: &[(&str, f64)]) -> serde_json::Value {
    if h.is_empty() {
        return serde_json::Value::Null;
    }
    let mut m = serde_json::Map::new();
    for (name, q) in qs {
        m.insert(
            (*name).to_owned(),
            json!(round3(h.value_at_quantile(*q) as f64 / 1000.0)),
        );
    }
    m.insert("max".into(), json!(round3(h.max() as f64 / 1000.0)));
    m.insert("mean".into(), json!(round3(h.mean() / 1000.0)));
    m.insert("count".into(), json!(h.len()));
    serde_json::Value::Object(m)
}

pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sample the read model never reached counts at its age, not left out of the tail.
    #[tokio::test]
    async fn an_unresolved_lag_sample_counts_at_its_age() {
        let tracker = LagTracker {
            inner: Mutex::new(LagInner {
                announced: 0,
                pending: BTreeMap::new(),
                hist: new_hist(),
                samples: 0,
            }),
        };
        let t0 = Instant::now();
        tracker.sample(1, t0);
        tracker.sample(2, t0 - Duration::from_secs(3));
        tracker.announced(1, t0 + Duration::from_millis(4));
        let (hist, samples, unresolved) = tracker.finish(Duration::ZERO).await;
        assert_eq!((samples, unresolved, hist.len()), (2, 1, 2));
        assert!(hist.max() >= 3_000_000, "{}", hist.max());
        assert!(hist.min() <= 4_010, "{}", hist.min());
    }

    #[test]
    fn a_failed_signal_is_put_down_to_its_portfolio() {
        let body = br#"{"portfolio_id":"b1-p00007","strategy_id":"b1-s00001","symbol":"BTC-USDT"}"#;
        assert_eq!(portfolio_of(body).as_deref(), Some("b1-p00007"));
        assert_eq!(portfolio_of(b"not json"), None);
        assert_eq!(portfolio_of(br#"{"strategy_id":"s"}"#), None);
    }

    #[test]
    fn a_paced_client_gets_its_share_of_the_rate_and_its_own_slot() {
        let start = Instant::now();
        let at = |p: &Pace| p.next.into_std().duration_since(start);
        // A quarter of 400/s: every 10 ms; the second of four clients starts a quarter in.
        let p = Pace::new(Some(400), 0.25, 1, 4, start).expect("paced");
        assert_eq!(p.period, Duration::from_millis(10));
        assert_eq!(at(&p), Duration::from_micros(2500));
        // A client with more to send sends more often, so that all end together.
        let p = Pace::new(Some(400), 0.5, 0, 4, start).expect("paced");
        assert_eq!(p.period, Duration::from_millis(5));
        assert_eq!(at(&p), Duration::ZERO);
        // No rate, or nothing to send: closed loop.
        assert!(Pace::new(None, 0.25, 0, 4, start).is_none());
        assert!(Pace::new(Some(400), 0.0, 0, 4, start).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn slots_do_not_drift_and_a_late_client_catches_up() {
        // On the paused clock.
        let start = tokio::time::Instant::now().into_std();
        let mut p = Pace::new(Some(100), 1.0, 0, 1, start).expect("paced");
        let t0 = tokio::time::Instant::now();
        for _ in 0..3 {
            p.wait().await;
        }
        // Slots at 0, 10 and 20 ms: the third wait returned at 20 ms.
        assert_eq!(t0.elapsed(), Duration::from_millis(20));
        // Held up for 25 ms (a slow reply), to 45 ms: the slots at 30 and 40 ms are due, no
        // wait; then the schedule again, the slot at 50 ms.
        tokio::time::advance(Duration::from_millis(25)).await;
        let late = tokio::time::Instant::now();
        // Each late send counts from its slot: 15 and 5 ms already lost (no coordinated
        // omission).
        for lost in [15, 5] {
            let due = p.wait().await;
            assert_eq!(late.into_std() - due, Duration::from_millis(lost));
        }
        assert_eq!(late.elapsed(), Duration::ZERO);
        p.wait().await;
        assert_eq!(t0.elapsed(), Duration::from_millis(50));
    }
}
