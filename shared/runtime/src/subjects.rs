//! Every subject and stream name, derived from the configured prefix (API.md).

use ch_domain::AggregateType;

#[derive(Debug, Clone)]
pub struct Subjects {
    prefix: String,
}

impl Subjects {
    pub fn new(prefix: impl Into<String>) -> Self {
        Subjects {
            prefix: prefix.into(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `CH_EVENTS` for prefix `ch`, `CHK7_EVENTS` for `chk7`.
    pub fn stream_name(&self) -> String {
        format!("{}_EVENTS", self.prefix.to_uppercase().replace('-', "_"))
    }

    /// `ch.events.>`
    pub fn events_filter(&self) -> String {
        format!("{}.events.>", self.prefix)
    }

    /// `ch.events.<type>.<id>`; `id` must already be validated as a subject token.
    pub fn aggregate(&self, ty: AggregateType, id: &str) -> String {
        format!("{}.events.{}.{}", self.prefix, ty.as_str(), id)
    }

    /// `ch.cmd.<name>`, e.g. `ch.cmd.portfolio.update`.
    pub fn command(&self, name: &str) -> String {
        format!("{}.cmd.{}", self.prefix, name)
    }

    /// `ch.query.<name>`, e.g. `ch.query.portfolio.performance`.
    pub fn query(&self, name: &str) -> String {
        format!("{}.query.{}", self.prefix, name)
    }

    /// Where a projector announces the sequence it has committed.
    pub fn progress(&self, projection: &str) -> String {
        format!("{}.progress.{}", self.prefix, projection)
    }

    /// Dead letters of a projector: events it could not apply.
    pub fn dead_letter(&self, projection: &str) -> String {
        format!("{}.dlq.{}", self.prefix, projection)
    }

    /// A projector's status endpoint.
    pub fn projector_status(&self, projection: &str) -> String {
        format!("{}.admin.projector.{}.status", self.prefix, projection)
    }

    /// A projector's rebuild endpoint: resets its read model, which it then replays.
    pub fn projector_rebuild(&self, projection: &str) -> String {
        format!("{}.admin.projector.{}.rebuild", self.prefix, projection)
    }

    /// Where `chctl rebuild` tells a running projector that its read model was reset.
    pub fn projector_reset(&self, projection: &str) -> String {
        format!("{}.admin.projector.{}.reset", self.prefix, projection)
    }

    /// Service names for `nats micro ls`: `ch-cmd-portfolio` for prefix `ch`.
    pub fn service_name(&self, worker: &str) -> String {
        format!("{}-{}", self.prefix, worker)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_prefix() {
        let s = Subjects::new("chk7");
        assert_eq!(s.stream_name(), "CHK7_EVENTS");
        assert_eq!(s.events_filter(), "chk7.events.>");
        assert_eq!(
            s.aggregate(AggregateType::Portfolio, "p-1"),
            "chk7.events.portfolio.p-1"
        );
        assert_eq!(s.command("portfolio.update"), "chk7.cmd.portfolio.update");
        assert_eq!(Subjects::new("ch").stream_name(), "CH_EVENTS");
    }
}
