//! Operator metrics of a worker, exposed through the NATS micro `$SRV.STATS` reply (`data`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{json, Value};

#[derive(Default)]
struct Inner {
    conflicts: AtomicU64,
    append_retries: AtomicU64,
    read_retries: AtomicU64,
    endpoints: Mutex<HashMap<String, EndpointMetrics>>,
    gauges: Mutex<HashMap<&'static str, i64>>,
}

struct EndpointMetrics {
    ok: u64,
    errors: HashMap<String, u64>,
    /// Of those, the requests sent without a reply subject (handled, not answered).
    no_reply: u64,
    latency_us: Histogram<u64>,
}

impl EndpointMetrics {
    fn new() -> Self {
        EndpointMetrics {
            ok: 0,
            errors: HashMap::new(),
            no_reply: 0,
            latency_us: Histogram::new_with_bounds(1, 60_000_000, 2).expect("valid bounds"),
        }
    }
}

/// Cheap to clone; shared by a worker's tasks.
#[derive(Clone, Default)]
pub struct Metrics(Arc<Inner>);

impl Metrics {
    /// Records one handled request: `error` is the API code of an error reply.
    pub fn request(&self, endpoint: &str, latency: Duration, error: Option<&str>) {
        let mut map = self.0.endpoints.lock().expect("metrics lock");
        let m = map
            .entry(endpoint.to_owned())
            .or_insert_with(EndpointMetrics::new);
        match error {
            None => m.ok += 1,
            Some(code) => *m.errors.entry(code.to_owned()).or_default() += 1,
        }
        let _ = m.latency_us.record((latency.as_micros() as u64).max(1));
    }

    /// Counts one request of those [`Metrics::request`] records that came without a reply
    /// subject (published, not requested): the standard `num_requests` counts replies sent, and
    /// leaves it out.
    pub fn no_reply(&self, endpoint: &str) {
        let mut map = self.0.endpoints.lock().expect("metrics lock");
        map.entry(endpoint.to_owned())
            .or_insert_with(EndpointMetrics::new)
            .no_reply += 1;
    }

    /// Counts one lost append race (the command is decided again).
    pub fn conflict(&self) {
        self.0.conflicts.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one append sent again after NATS trouble (no answer, or no connection).
    pub fn append_retry(&self) {
        self.0.append_retries.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one read of the event store asked again after going unanswered.
    pub fn read_retry(&self) {
        self.0.read_retries.fetch_add(1, Ordering::Relaxed);
    }

    /// Sets a named gauge (e.g. a projector's `last_seq` or `lag`).
    pub fn gauge(&self, name: &'static str, value: i64) {
        self.0
            .gauges
            .lock()
            .expect("metrics lock")
            .insert(name, value);
    }

    /// Adds `n` to a named gauge that counts (e.g. a projector's `dead_letters`).
    pub fn add(&self, name: &'static str, n: i64) {
        *self
            .0
            .gauges
            .lock()
            .expect("metrics lock")
            .entry(name)
            .or_default() += n;
    }

    /// The `data` of one endpoint's stats, plus worker-wide figures. Every key is there before
    /// the first request too (`latency_ms` `null` until there is a latency to report).
    pub fn snapshot(&self, endpoint: &str) -> Value {
        let map = self.0.endpoints.lock().expect("metrics lock");
        let gauges = self.0.gauges.lock().expect("metrics lock").clone();
        let mut v = json!({
            "append_conflicts": self.0.conflicts.load(Ordering::Relaxed),
            "append_retries": self.0.append_retries.load(Ordering::Relaxed),
            "read_retries": self.0.read_retries.load(Ordering::Relaxed),
            "gauges": gauges,
            "ok": 0,
            "errors_by_code": {},
            "no_reply": 0,
            "latency_ms": null,
        });
        if let Some(m) = map.get(endpoint) {
            let q = |p: f64| m.latency_us.value_at_quantile(p) as f64 / 1000.0;
            v["ok"] = json!(m.ok);
            v["errors_by_code"] = json!(m.errors);
            v["no_reply"] = json!(m.no_reply);
            v["latency_ms"] = json!({"p50": q(0.5), "p99": q(0.99), "p999": q(0.999), "max": m.latency_us.max() as f64 / 1000.0});
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_reports_every_key_before_and_after_its_first_request() {
        let metrics = Metrics::default();
        let idle = metrics.snapshot("get");
        assert_eq!(idle["ok"], 0);
        assert_eq!(idle["errors_by_code"], json!({}));
        assert_eq!(idle["no_reply"], 0);
        assert_eq!(idle["latency_ms"], Value::Null);
        metrics.request("get", Duration::from_millis(2), None);
        metrics.request("get", Duration::from_millis(4), Some("not_found"));
        let busy = metrics.snapshot("get");
        assert_eq!(busy["ok"], 1);
        assert_eq!(busy["errors_by_code"], json!({"not_found": 1}));
        let p99 = busy["latency_ms"]["p99"].as_f64().unwrap();
        assert!((3.9..=4.1).contains(&p99), "{busy}");
        // Another endpoint of the same worker has not been asked yet.
        assert_eq!(metrics.snapshot("list")["ok"], 0);
    }

    #[test]
    fn counting_gauges_add_up() {
        let metrics = Metrics::default();
        metrics.add("dead_letters", 1);
        metrics.add("dead_letters", 2);
        metrics.gauge("last_seq", 7);
        let gauges = &metrics.snapshot("status")["gauges"];
        assert_eq!(gauges["dead_letters"], 3);
        assert_eq!(gauges["last_seq"], 7);
    }
}
