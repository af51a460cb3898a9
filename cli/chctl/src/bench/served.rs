//! What the workers measured themselves: an endpoint's latency as its `$SRV.STATS` reports it,
//! from the start of its handler to the reply handed to the NATS client. Beside the clients'
//! figures it shows where a request's time goes: the rest is NATS, the client, and the wait
//! before the handler runs (for a core, or behind the worker's other requests).

use async_nats::Client;
use ch_runtime::subjects::Subjects;
use serde_json::{json, Value};

use crate::common::stats;

/// The endpoints reported: the report's key, the worker, the endpoint's name.
const ENDPOINTS: [(&str, &str, &str); 2] = [
    ("command", "cmd-signal", "signal_execute"),
    ("query", "query-portfolio", "portfolio_performance"),
];

const NOTE: &str = "each endpoint's latency as its workers report it in $SRV.STATS, from the \
start of the handler to the reply, over every request since they started; with several \
instances, each percentile is the largest of theirs (the pooled one lies between their smallest \
and largest)";

/// `service_latency_ms` of a report: the signal and performance endpoints of the deployment
/// on `subjects` (`null` for an endpoint no instance reported).
pub async fn latency(client: &Client, subjects: &Subjects) -> Value {
    let mut out = serde_json::Map::new();
    for (key, worker, endpoint) in ENDPOINTS {
        let service = subjects.service_name(worker);
        let replies = match stats(client, &service).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("warning: $SRV.STATS of {service}: {e}");
                Vec::new()
            }
        };
        out.insert(key.into(), merge(&replies, endpoint));
    }
    out.insert("note".into(), json!(NOTE));
    Value::Object(out)
}

/// One endpoint over the instances that reported it: requests summed, each percentile the
/// largest of theirs.
fn merge(replies: &[Value], endpoint: &str) -> Value {
    let found: Vec<&Value> = replies
        .iter()
        .filter_map(|r| {
            r["endpoints"]
                .as_array()?
                .iter()
                .find(|e| e["name"] == endpoint)
        })
        .collect();
    if found.is_empty() {
        return Value::Null;
    }
    let largest = |p: &str| {
        found
            .iter()
            .filter_map(|e| e["data"]["latency_ms"][p].as_f64())
            .reduce(f64::max)
    };
    json!({
        "instances": found.len(),
        "requests": found.iter().filter_map(|e| e["num_requests"].as_u64()).sum::<u64>(),
        "p50": largest("p50"),
        "p99": largest("p99"),
        "p999": largest("p999"),
    })
}

#[cfg(test)]
mod tests {
    use super::merge;
    use serde_json::json;

    fn reply(requests: u64, p50: f64, p99: f64) -> serde_json::Value {
        json!({"name": "bench-query-portfolio", "endpoints": [
            {"name": "portfolio_analysis", "num_requests": 7,
             "data": {"latency_ms": {"p50": 90.0, "p99": 90.0, "p999": 90.0}}},
            {"name": "portfolio_performance", "num_requests": requests,
             "data": {"latency_ms": {"p50": p50, "p99": p99, "p999": p99 * 2.0}}},
        ]})
    }

    #[test]
    fn instances_add_up_their_requests_and_the_largest_percentile_stands() {
        let merged = merge(
            &[reply(300, 0.5, 4.0), reply(100, 0.8, 2.0)],
            "portfolio_performance",
        );
        assert_eq!(
            merged,
            json!({"instances": 2, "requests": 400, "p50": 0.8, "p99": 4.0, "p999": 8.0})
        );
    }

    #[test]
    fn an_endpoint_no_instance_reports_is_null() {
        assert_eq!(merge(&[reply(5, 0.1, 0.2)], "signal_execute"), json!(null));
        assert_eq!(merge(&[], "portfolio_performance"), json!(null));
    }
}
