//! Why a request was refused: one variant, one counter and one gRPC status each.

use std::fmt;

use l2l_proto::refusal::Reason;

/// A refusal of the coordinator, decided without touching φ.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// The worker id is not registered (e.g. the coordinator restarted).
    UnknownWorker {
        /// The id given.
        worker: u64,
    },
    /// No such lease (never granted, or forgotten long ago).
    UnknownLease {
        /// The id given.
        lease: u64,
    },
    /// The lease belongs to another worker.
    ForeignLease {
        /// The id given.
        lease: u64,
    },
    /// The lease's deadline passed; its trajectory was dropped.
    ExpiredLease {
        /// The id given.
        lease: u64,
    },
    /// The truncation index is outside the trajectory.
    BadTruncation {
        /// The index given.
        truncation: u32,
        /// The trajectory's number of truncations.
        truncations: usize,
    },
    /// The gradient was computed with a φ from before the coordinator's last restart.
    PreRestart {
        /// The submission's epoch.
        epoch: u64,
        /// The current epoch.
        current: u64,
    },
    /// The gradient claims a φ version that does not exist yet.
    FutureVersion {
        /// The version given.
        version: u64,
        /// The current version.
        current: u64,
    },
    /// The gradient's φ is too many versions old.
    Stale {
        /// current − version.
        staleness: u64,
        /// The bound in force.
        bound: u64,
    },
    /// The gradient does not have φ's size.
    Shape {
        /// Values sent (bytes / 4).
        got: usize,
        /// Values in φ.
        want: usize,
    },
    /// The gradient or meta-loss holds NaN or ±inf.
    NonFinite {
        /// First offending index (usize::MAX for the meta-loss).
        index: usize,
    },
    /// The run has reached its last update.
    Finished,
    /// The request's session is not the one its worker id was registered with.
    BadSession {
        /// The worker id given.
        worker: u64,
    },
    /// The gradient's norm or the meta-loss is beyond what the run accepts.
    TooLarge(crate::guard::TooLarge),
    /// The worker table is full of live workers.
    TooManyWorkers {
        /// The limit in force.
        max: usize,
    },
    /// The validation job is held by no evaluator (answered, expired or never handed out).
    UnknownJob {
        /// The id given.
        job: u64,
    },
    /// The validation job is held by another evaluator.
    ForeignJob {
        /// The id given.
        job: u64,
    },
    /// A validation result that cannot be a job's curves.
    BadCurve {
        /// What is wrong with it.
        why: String,
    },
    /// The gradient was computed on another training data set than the run's, or names
    /// none for a family that needs data.
    WrongData {
        /// The fingerprint sent (empty: none).
        got: String,
        /// The run's (empty: none kept yet, `got` itself is not a fingerprint).
        want: String,
    },
}

impl Refusal {
    /// The wire's reason: its stable name is the counter label and the `l2l-refusal`
    /// metadata.
    pub fn kind(&self) -> Reason {
        match self {
            Refusal::UnknownWorker { .. } => Reason::UnknownWorker,
            Refusal::UnknownLease { .. } => Reason::UnknownLease,
            Refusal::ForeignLease { .. } => Reason::ForeignLease,
            Refusal::ExpiredLease { .. } => Reason::ExpiredLease,
            Refusal::BadTruncation { .. } => Reason::BadTruncation,
            Refusal::PreRestart { .. } => Reason::PreRestart,
            Refusal::FutureVersion { .. } => Reason::FutureVersion,
            Refusal::Stale { .. } => Reason::Stale,
            Refusal::Shape { .. } => Reason::Shape,
            Refusal::NonFinite { .. } => Reason::NonFinite,
            Refusal::Finished => Reason::Finished,
            Refusal::BadSession { .. } => Reason::BadSession,
            Refusal::TooLarge(_) => Reason::TooLarge,
            Refusal::TooManyWorkers { .. } => Reason::TooManyWorkers,
            Refusal::WrongData { .. } => Reason::WrongData,
            Refusal::UnknownJob { .. } => Reason::UnknownLease,
            Refusal::ForeignJob { .. } => Reason::ForeignLease,
            Refusal::BadCurve { .. } => Reason::Shape,
        }
    }

    /// Short stable name, used as counter label and in the `l2l-refusal` metadata.
    pub fn reason(&self) -> &'static str {
        self.kind().name()
    }

    /// The gRPC status code the refusal travels with.
    pub fn code(&self) -> tonic::Code {
        self.kind().code()
    }

    /// The gRPC status: code, message, and the reason in `l2l-refusal` metadata.
    pub fn to_status(&self) -> tonic::Status {
        self.kind().status(self.to_string())
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::UnknownWorker { worker } => {
                write!(f, "worker {worker} is not registered here; register again")
            }
            Refusal::UnknownLease { lease } => {
                write!(f, "lease {lease} is unknown; lease a new instance")
            }
            Refusal::ForeignLease { lease } => write!(f, "lease {lease} belongs to another worker"),
            Refusal::ExpiredLease { lease } => {
                write!(
                    f,
                    "lease {lease} expired (no heartbeat in time); lease a new instance"
                )
            }
            Refusal::BadTruncation {
                truncation,
                truncations,
            } => write!(
                f,
                "truncation {truncation} is outside the trajectory's {truncations} truncations"
            ),
            Refusal::PreRestart { epoch, current } => write!(
                f,
                "gradient from epoch {epoch}, before the coordinator's restart (now epoch {current}); fetch φ again"
            ),
            Refusal::FutureVersion { version, current } => {
                write!(
                    f,
                    "φ version {version} does not exist yet (current {current})"
                )
            }
            Refusal::Stale { staleness, bound } => {
                write!(
                    f,
                    "gradient is {staleness} versions old, the bound is {bound}; fetch φ again"
                )
            }
            Refusal::Shape { got, want } => write!(f, "gradient has {got} values, φ has {want}"),
            Refusal::NonFinite { index } if *index == usize::MAX => {
                write!(f, "meta-loss is not finite")
            }
            Refusal::NonFinite { index } => write!(f, "gradient value {index} is not finite"),
            Refusal::Finished => write!(f, "the run is finished"),
            Refusal::BadSession { worker } => write!(
                f,
                "the session does not belong to worker {worker}; use the session Register returned, or register again"
            ),
            Refusal::TooLarge(crate::guard::TooLarge::Norm { norm, limit }) => write!(
                f,
                "gradient norm {norm:e} is above the run's limit {limit:e} (guard.max_norm, or guard.max_norm_ratio × the median of recent norms); drop this trajectory"
            ),
            Refusal::TooLarge(crate::guard::TooLarge::MetaLoss { loss, limit }) => write!(
                f,
                "meta-loss {loss:e} is beyond guard.max_meta_loss {limit:e}; drop this trajectory"
            ),
            Refusal::TooManyWorkers { max } => write!(
                f,
                "{max} workers are registered and live (max_workers); retry later or raise max_workers"
            ),
            Refusal::UnknownJob { job } => write!(
                f,
                "validation job {job} is held by no evaluator (answered, expired, or never handed out); ask for a new job"
            ),
            Refusal::ForeignJob { job } => {
                write!(f, "validation job {job} is held by another evaluator")
            }
            Refusal::BadCurve { why } => write!(f, "validation result refused: {why}"),
            Refusal::WrongData { got, .. } if got.is_empty() => write!(
                f,
                "this instance's family needs data, and the submission names no data-set fingerprint; \
                 upgrade the worker to the coordinator's version"
            ),
            Refusal::WrongData { got, want } if want.is_empty() => write!(
                f,
                "the data-set fingerprint {got:?} is not 64 hex digits (SHA-256)"
            ),
            Refusal::WrongData { got, want } => write!(
                f,
                "this worker's training data (SHA-256 {got}) is not the run's (SHA-256 {want}); \
                 give every worker of the run the same --data files"
            ),
        }
    }
}
