//! Kernel launches issued on the GPU backend, counted: the figure a fused LSTM step would
//! cut, and one that lavapipe (a CPU Vulkan driver) measures as well as a GPU, since the
//! same kernels are issued whatever runs them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use cubecl::logging::{LaunchObservation, LaunchObserver};

/// Counts every launch while installed.
#[derive(Default)]
struct Counter(AtomicU64);

impl LaunchObserver for Counter {
    fn launched(&self, _kernel: &'static str) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// Runs `f` and returns its result with the number of GPU kernels issued meanwhile, by any
/// thread of this process (so nothing else should launch kernels while it runs).
pub fn counted<R>(f: impl FnOnce() -> R) -> (R, u64) {
    let counter = Arc::new(Counter::default());
    let watching = LaunchObservation::new(counter.clone());
    let r = f();
    drop(watching);
    (r, counter.0.load(Ordering::Relaxed))
}
