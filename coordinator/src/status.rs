//! `status`: asks a running coordinator for its progress and prints it.

use anyhow::Result;
use clap::Args;
use l2l_proto::client::{ClientArgs, connect};
use l2l_proto::v1::StatusRequest;
use serde_json::json;

/// Arguments of `status`.
#[derive(Debug, Args)]
pub struct Status {
    /// The coordinator's URL, e.g. http://127.0.0.1:50051 (https:// for TLS).
    #[arg(long, env = "L2L_COORDINATOR")]
    pub coordinator: String,
    /// Token and TLS.
    #[command(flatten)]
    pub client: ClientArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Fetches and prints the status.
pub async fn run(a: Status) -> Result<()> {
    let security = a.client.resolve(&a.coordinator)?;
    let mut client = connect(
        &a.coordinator,
        &security,
        std::time::Duration::from_secs(30),
    )
    .await?;
    let s = match client.status(StatusRequest {}).await {
        Ok(s) => s.into_inner(),
        Err(e) => {
            return Err(l2l_proto::client::explain(&security, e).context("status request failed"));
        }
    };
    let v = s.version.unwrap_or_default();
    if a.json {
        let workers: Vec<_> = s
            .workers
            .iter()
            .map(|w| {
                json!({"id": w.worker_id, "name": w.name, "backend": w.backend, "role": w.role,
                            "accepted": w.accepted, "seconds_since_seen": w.seconds_since_seen})
            })
            .collect();
        println!(
            "{}",
            json!({
                "epoch": v.epoch, "version": v.step, "aggregation": s.aggregation,
                "estimator": s.estimator,
                "live_workers": s.live_workers, "live_leases": s.live_leases,
                "accepted": s.accepted, "refused": s.refused,
                "mean_staleness": s.mean_staleness, "max_staleness": s.max_staleness,
                "updates_per_second": s.updates_per_second,
                "last_meta_loss": if s.last_meta_loss.is_finite() { json!(s.last_meta_loss) } else { json!(null) },
                "trajectories_done": s.trajectories_done, "leases_expired": s.leases_expired,
                "updates_refused": s.updates_refused, "median_grad_norm": s.median_grad_norm,
                "workers_total": s.workers_total, "workers": workers,
                "validation": s.validation.as_ref().map(|v| json!({
                    "every": v.every, "baseline": v.baseline, "select": v.select,
                    "done": v.done, "dropped": v.dropped, "waiting": v.waiting,
                    "running": v.running,
                    "last_version": v.last_version.map(|x| x.step),
                    "last_ratio_mean": v.last_version.map(|_| v.last_ratio_mean),
                    "last_ratio_final": v.last_version.map(|_| v.last_ratio_final),
                    "best_version": v.best_version.map(|x| x.step),
                    "best_score": v.best_version.map(|_| v.best_score),
                })),
            })
        );
        return Ok(());
    }
    println!("version        {} (epoch {})", v.step, v.epoch);
    println!("aggregation    {}", s.aggregation);
    println!("estimator      {}", s.estimator);
    println!(
        "live workers   {} ({} live leases)",
        s.live_workers, s.live_leases
    );
    println!("accepted       {}", s.accepted);
    let mut refused: Vec<_> = s.refused.iter().collect();
    refused.sort();
    let total: u64 = refused.iter().map(|(_, n)| **n).sum();
    println!("refused        {total}");
    for (reason, n) in refused {
        println!("  {reason:<14}{n}");
    }
    println!(
        "staleness      mean {:.2}, max {}",
        s.mean_staleness, s.max_staleness
    );
    println!("updates/s      {:.2}", s.updates_per_second);
    println!("last meta-loss {:.6}", s.last_meta_loss);
    println!(
        "trajectories   {} done, {} leases expired",
        s.trajectories_done, s.leases_expired
    );
    println!(
        "gradients      median norm {:.4e}, {} updates refused as non-finite",
        s.median_grad_norm, s.updates_refused
    );
    match &s.validation {
        None => println!("validation     off"),
        Some(v) => {
            let last = match v.last_version {
                Some(l) => format!(
                    "at update {}: learned / {} {:.4} (mean over steps), {:.4} (last step)",
                    l.step, v.baseline, v.last_ratio_mean, v.last_ratio_final
                ),
                None => "none yet".into(),
            };
            println!("validation     every {} updates, {last}", v.every);
            if let Some(b) = v.best_version {
                println!(
                    "  best         {:.4} ({} loss) at update {} (epoch {})",
                    v.best_score, v.select, b.step, b.epoch
                );
            }
            println!(
                "  jobs         {} done, {} waiting, {} running, {} dropped",
                v.done, v.waiting, v.running, v.dropped
            );
        }
    }
    // Names come from the wire: shown sanitised whatever the coordinator sent.
    use crate::state::sanitize_name;
    for w in &s.workers {
        println!(
            "  worker {:<4} {:<20} {:<6} {:<9} accepted {:<8} seen {:.1}s ago",
            w.worker_id,
            sanitize_name(&w.name),
            sanitize_name(&w.backend),
            sanitize_name(&w.role),
            w.accepted,
            w.seconds_since_seen
        );
    }
    let hidden = s.workers_total.saturating_sub(s.workers.len() as u64);
    if hidden > 0 {
        println!("  … and {hidden} more workers (the most recently seen are listed)");
    }
    Ok(())
}
