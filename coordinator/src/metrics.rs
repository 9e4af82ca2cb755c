//! The coordinator's Prometheus metrics, read from its state at each scrape.

use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

use l2l_proto::refusal::Reason;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::service::Shared;
use crate::state::STALENESS_BOUNDS;

/// A registry (prefix `l2l_`) with the coordinator's metrics.
pub fn registry(shared: Shared) -> Registry {
    let mut r = Registry::with_prefix("l2l");
    r.register_collector(Box::new(CoordinatorCollector { shared }));
    r
}

/// Reads a snapshot of the coordinator on each scrape.
struct CoordinatorCollector {
    shared: Shared,
}

impl std::fmt::Debug for CoordinatorCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CoordinatorCollector")
    }
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: f64) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

/// A worker's backend kind from the text it registered with ("wgpu (NVIDIA H100)" →
/// "wgpu"); anything but the known kinds is "other", so label values stay few.
fn backend_kind(reported: &str) -> &'static str {
    match reported.split_whitespace().next().unwrap_or("") {
        // Workers before the fused backend had its name reported `cpu`.
        "fused" | "cpu" => "fused",
        "flex" => "flex",
        "wgpu" => "wgpu",
        _ => "other",
    }
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

impl Collector for CoordinatorCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let now = Instant::now();
        let (status, buckets, staleness_sum, finished, by_backend) = {
            let c = self.shared.lock();
            // By the backend's kind (the first word a worker reports: fused, flex, wgpu),
            // over every live worker (status lists only the most recent).
            let mut by: std::collections::BTreeMap<&str, u64> =
                ["fused", "flex", "wgpu"].map(|b| (b, 0)).into();
            for b in c.live_worker_backends(now) {
                *by.entry(backend_kind(b)).or_default() += 1;
            }
            (
                c.status(now),
                c.counters().staleness_buckets.clone(),
                c.counters().staleness_sum,
                c.finished(),
                by,
            )
        };
        let stats = &self.shared.stats;
        let v = status.version.unwrap_or_default();
        gauge(
            &mut e,
            "version",
            "Updates of φ applied in this run",
            v.step as f64,
        )?;
        gauge(
            &mut e,
            "epoch",
            "Restart epoch of the coordinator",
            v.epoch as f64,
        )?;
        gauge(
            &mut e,
            "updates_per_second",
            "Updates of φ per second, recent average",
            status.updates_per_second,
        )?;
        counter(
            &mut e,
            "accepted",
            "Meta-gradients accepted",
            status.accepted,
        )?;
        {
            // Always present, so alerts on it have a series from the start.
            let mut refused = status.refused;
            refused.insert(
                Reason::Unauthenticated.name().to_string(),
                stats.unauthenticated.load(Ordering::Relaxed),
            );
            let mut refused: Vec<(String, u64)> = refused.into_iter().collect();
            refused.sort();
            let mut m = e.encode_descriptor(
                "refused",
                "Requests refused, by reason",
                None,
                MetricType::Counter,
            )?;
            for (reason, n) in refused {
                let labels = [("reason", reason)];
                ConstCounter::new(n).encode(m.encode_family(&labels)?)?;
            }
        }
        gauge(
            &mut e,
            "live_workers",
            "Workers seen within a lease timeout",
            status.live_workers as f64,
        )?;
        gauge(
            &mut e,
            "registered_workers",
            "Workers registered and not yet forgotten",
            status.workers_total as f64,
        )?;
        counter(
            &mut e,
            "updates_refused",
            "Updates refused because φ or Adam's state would not have been finite",
            status.updates_refused,
        )?;
        gauge(
            &mut e,
            "median_grad_norm",
            "Median L2 norm of recently accepted meta-gradients",
            status.median_grad_norm,
        )?;
        {
            let by = by_backend;
            let mut m = e.encode_descriptor(
                "live_workers_by_backend",
                "Workers seen within a lease timeout, by backend",
                None,
                MetricType::Gauge,
            )?;
            for (backend, n) in by {
                let labels = [("backend", backend)];
                ConstGauge::new(n as f64).encode(m.encode_family(&labels)?)?;
            }
        }
        if let Some(v) = &status.validation {
            counter(
                &mut e,
                "validations",
                "Validations recorded since this coordinator started",
                v.done,
            )?;
            counter(
                &mut e,
                "validations_dropped",
                "Validation jobs dropped (no evaluator took them, or an evaluator went silent)",
                v.dropped,
            )?;
            if let Some(last) = v.last_version {
                gauge(
                    &mut e,
                    "validation_version",
                    "φ version of the newest validation",
                    last.step as f64,
                )?;
                let mut m = e.encode_descriptor(
                    "validation_ratio",
                    "Newest validation: learned / tuned baseline loss, over the mean of steps 1..S or at step S",
                    None,
                    MetricType::Gauge,
                )?;
                for (at, r) in [("mean", v.last_ratio_mean), ("final", v.last_ratio_final)] {
                    let labels = [("at", at)];
                    ConstGauge::new(r).encode(m.encode_family(&labels)?)?;
                }
            }
            if v.best_version.is_some() {
                gauge(
                    &mut e,
                    "validation_best_score",
                    "Best validation score of the run (the selected ratio; best.safetensors)",
                    v.best_score,
                )?;
            }
        }
        gauge(
            &mut e,
            "live_leases",
            "Leases not yet expired or finished",
            status.live_leases as f64,
        )?;
        counter(
            &mut e,
            "leases_expired",
            "Leases that expired",
            status.leases_expired,
        )?;
        counter(
            &mut e,
            "trajectories",
            "Trajectories whose every truncation was accepted",
            status.trajectories_done,
        )?;
        {
            // Counts per bucket, +Inf last (the encoder accumulates them).
            let mut b: Vec<(f64, u64)> = STALENESS_BOUNDS
                .iter()
                .enumerate()
                .map(|(i, ub)| (*ub as f64, buckets.get(i).copied().unwrap_or(0)))
                .collect();
            b.push((
                f64::MAX,
                buckets.get(STALENESS_BOUNDS.len()).copied().unwrap_or(0),
            ));
            let count: u64 = b.iter().map(|(_, n)| n).sum();
            let sum = staleness_sum as f64;
            let mut m = e.encode_descriptor(
                "staleness",
                "Staleness of accepted meta-gradients, in φ versions",
                None,
                MetricType::Histogram,
            )?;
            m.encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, count, &b, None)?;
        }
        if status.last_meta_loss.is_finite() {
            gauge(
                &mut e,
                "meta_loss",
                "Mean meta-loss of the gradients of the last update",
                status.last_meta_loss,
            )?;
        }
        let last = *stats
            .last_checkpoint
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(t) = last {
            let age = SystemTime::now().duration_since(t).unwrap_or_default();
            gauge(
                &mut e,
                "checkpoint_age_seconds",
                "Seconds since the last checkpoint was written",
                age.as_secs_f64(),
            )?;
        }
        gauge(
            &mut e,
            "ready",
            "1 when ready (φ loaded, checkpoints writable), else 0",
            f64::from(u8::from(stats.ready.load(Ordering::Relaxed))),
        )?;
        gauge(
            &mut e,
            "finished",
            "1 when the run reached max_updates",
            f64::from(u8::from(finished)),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::state::Coordinator;

    #[test]
    fn a_fresh_coordinator_renders_its_metrics() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            dir: dir.path().into(),
            ..Config::default()
        };
        let shared = Shared::new(Coordinator::new(config, crate::state::Start::fresh()).unwrap());
        shared.stats.unauthenticated.fetch_add(3, Ordering::Relaxed);
        {
            let mut c = shared.lock();
            let now = Instant::now();
            let s = [1; crate::state::SESSION_BYTES];
            c.register("g1", "wgpu (NVIDIA H100 PCIe)", s, now).unwrap();
            c.register("g2", "wgpu (llvmpipe (LLVM 15.0.6, 256 bits))", s, now)
                .unwrap();
            c.register("c1", "cpu (fused kernels, 16 threads)", s, now)
                .unwrap();
            c.register("odd", "\"}\n{evil=", s, now).unwrap();
        }
        let text = l2l_proto::metrics_http::render(&registry(shared));
        for line in [
            "l2l_version 0.0\n",
            "l2l_accepted_total 0\n",
            "l2l_refused_total{reason=\"unauthenticated\"} 3\n",
            "l2l_staleness_bucket{le=\"+Inf\"} 0\n",
            "l2l_staleness_count 0\n",
            "l2l_ready 0.0\n",
            "# TYPE l2l_staleness histogram\n",
            "l2l_live_workers_by_backend{backend=\"wgpu\"} 2.0\n",
            "l2l_live_workers_by_backend{backend=\"fused\"} 1.0\n",
            "l2l_live_workers_by_backend{backend=\"flex\"} 0.0\n",
            "l2l_live_workers_by_backend{backend=\"other\"} 1.0\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }
}
