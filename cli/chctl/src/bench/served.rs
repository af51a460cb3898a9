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
and largest). When more than 1 % of those requests came before this run (workers that had \
served before), or fewer than had come before it (a worker restarted during the run, and its \
counts began again: `restarted`), the percentiles are not this run's: they move to \
`since_start` and p50, p99 and p999 are null";

/// The requests each reported endpoint has answered so far (taken before a run).
pub async fn requests(client: &Client, subjects: &Subjects) -> Value {
    let now = latency(client, subjects, &Value::Null).await;
    ENDPOINTS
        .iter()
        .map(|(key, ..)| (key.to_string(), now[key]["requests"].clone()))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// `service_latency_ms` of a report: the signal and performance endpoints of the deployment
/// on `subjects` (`null` for an endpoint no instance reported), each with the requests it had
/// answered `before` the run ([`requests`]).
pub async fn latency(client: &Client, subjects: &Subjects, before: &Value) -> Value {
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
        out.insert(
            key.into(),
            this_run(merge(&replies, endpoint), &before[key]),
        );
    }
    out.insert("note".into(), json!(NOTE));
    Value::Object(out)
}

/// An endpoint's figures, with the requests it had answered before the run; its percentiles
/// only if they are (almost all) the run's.
fn this_run(mut merged: Value, before: &Value) -> Value {
    let (Some(total), Some(before)) = (merged["requests"].as_u64(), before.as_u64()) else {
        return merged;
    };
    merged["requests_before"] = json!(before);
    // Fewer than before: the counts began again, with a worker restarted during the run.
    let restarted = total < before;
    if restarted {
        merged["restarted"] = json!(true);
    }
    if restarted || before * 100 > total {
        let mut since_start = serde_json::Map::new();
        for p in ["p50", "p99", "p999"] {
            since_start.insert(p.into(), merged[p].take());
        }
        merged["since_start"] = since_start.into();
    }
    merged
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
    use super::{merge, this_run};
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
    fn percentiles_over_many_requests_before_the_run_are_not_given_as_its() {
        let merged = || merge(&[reply(1000, 0.5, 4.0)], "portfolio_performance");
        // A few before: the run's figures.
        let few = this_run(merged(), &json!(10));
        assert_eq!(few["p99"], 4.0);
        assert_eq!(few["requests_before"], 10);
        // Most of them before: not this run's.
        let many = this_run(merged(), &json!(900));
        assert_eq!(many["p99"], json!(null));
        assert_eq!(many["since_start"]["p99"], 4.0);
        // Nothing known of before: as reported.
        assert_eq!(this_run(merged(), &json!(null))["p99"], 4.0);
        // More before than now: restarted during the run, so the figures cover only its end.
        let restarted = this_run(merged(), &json!(16298));
        assert_eq!(restarted["restarted"], true);
        assert_eq!(restarted["p99"], json!(null));
        assert_eq!(restarted["since_start"]["p99"], 4.0);
    }

    #[test]
    fn an_endpoint_no_instance_reports_is_null() {
        assert_eq!(merge(&[reply(5, 0.1, 0.2)], "signal_execute"), json!(null));
        assert_eq!(merge(&[], "portfolio_performance"), json!(null));
    }
}
