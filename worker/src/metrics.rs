//! The worker's Prometheus metrics (served by [`l2l_proto::metrics_http`]).

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

/// Labels as name/value pairs.
type Labels = Vec<(String, String)>;

/// What a worker counts while it runs.
#[derive(Debug)]
pub struct WorkerMetrics {
    /// Truncations unrolled (meta-gradients computed).
    pub truncations: Counter,
    /// Seconds per truncation's meta-gradient.
    pub unroll_seconds: Histogram,
    /// Submissions by outcome: `accepted` or the coordinator's refusal reason.
    pub submissions: Family<Labels, Counter>,
    /// Trajectories run to their end.
    pub trajectories: Counter,
}

impl WorkerMetrics {
    /// Fresh metrics, registered in `registry` with the worker's `backend`, the `adapter`
    /// it runs on and its `name` as an info metric.
    pub fn register(
        registry: &mut Registry,
        backend: &str,
        adapter: &str,
        name: &str,
    ) -> Arc<Self> {
        let m = Arc::new(Self {
            truncations: Counter::default(),
            // 0.5 ms .. 16 s.
            unroll_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            submissions: Family::default(),
            trajectories: Counter::default(),
        });
        let sub = registry.sub_registry_with_prefix("l2l_worker");
        sub.register(
            "truncations",
            "Truncations unrolled (meta-gradients computed)",
            m.truncations.clone(),
        );
        sub.register(
            "unroll_seconds",
            "Seconds per truncation's meta-gradient",
            m.unroll_seconds.clone(),
        );
        sub.register(
            "submissions",
            "Submissions by outcome (accepted, or the coordinator's refusal reason)",
            m.submissions.clone(),
        );
        sub.register(
            "trajectories",
            "Trajectories run to their end",
            m.trajectories.clone(),
        );
        sub.register(
            "build",
            "The worker's backend, adapter and name",
            Info::new(vec![
                ("backend".to_string(), backend.to_string()),
                ("adapter".to_string(), adapter.to_string()),
                ("name".to_string(), name.to_string()),
                ("version".to_string(), env!("CARGO_PKG_VERSION").to_string()),
            ]),
        );
        m
    }

    /// Counts one submission's outcome.
    pub fn submission(&self, outcome: &str) {
        self.submissions
            .get_or_create(&vec![("outcome".to_string(), outcome.to_string())])
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_metrics_render_with_their_labels() {
        let mut r = Registry::default();
        let m = WorkerMetrics::register(&mut r, "cpu", "fused kernels, 2 threads", "w1");
        m.truncations.inc();
        m.unroll_seconds.observe(0.003);
        m.submission("accepted");
        m.submission("stale");
        m.submission("accepted");
        let text = l2l_proto::metrics_http::render(&r);
        assert!(text.contains("l2l_worker_truncations_total 1\n"), "{text}");
        assert!(
            text.contains("l2l_worker_submissions_total{outcome=\"accepted\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("l2l_worker_submissions_total{outcome=\"stale\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("l2l_worker_unroll_seconds_count 1\n"),
            "{text}"
        );
        assert!(
            text.contains("l2l_worker_build_info{backend=\"cpu\",adapter=\"fused kernels, 2 threads\",name=\"w1\""),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }
}
