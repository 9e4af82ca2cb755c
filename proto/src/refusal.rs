//! Why the coordinator refused a request, as the wire carries it: a gRPC code and a
//! stable reason in the `l2l-refusal` metadata. Both sides use this enum: the coordinator
//! to send a refusal, a worker to read it back.

use tonic::{Code, Status};

/// The metadata key that carries a refusal's reason.
pub const REFUSAL_KEY: &str = "l2l-refusal";

/// The reason of a refusal; refusals that share a gRPC code are told apart by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// The worker id is not registered (the coordinator restarted, or forgot a silent
    /// worker): register again.
    UnknownWorker,
    /// The request's session is not the one its worker id registered with.
    BadSession,
    /// No such lease.
    UnknownLease,
    /// The lease belongs to another worker.
    ForeignLease,
    /// The lease's deadline passed.
    ExpiredLease,
    /// Computed with φ from before the coordinator's restart.
    PreRestart,
    /// φ version older than the staleness bound.
    Stale,
    /// A φ version that does not exist yet.
    FutureVersion,
    /// The gradient does not have φ's size.
    Shape,
    /// NaN or ±inf in the gradient or the meta-loss.
    NonFinite,
    /// A truncation index outside the trajectory.
    BadTruncation,
    /// Gradient norm or meta-loss beyond the run's guard.
    TooLarge,
    /// `max_workers` live workers are registered.
    TooManyWorkers,
    /// The run reached its last update.
    Finished,
    /// Missing or wrong token: the caller itself is refused.
    Unauthenticated,
    /// Computed on another training data set than the run's (or naming none).
    WrongData,
}

impl Reason {
    /// Every reason, in the order of the README's table.
    pub const ALL: [Reason; 16] = [
        Reason::UnknownWorker,
        Reason::BadSession,
        Reason::UnknownLease,
        Reason::ForeignLease,
        Reason::ExpiredLease,
        Reason::PreRestart,
        Reason::Stale,
        Reason::FutureVersion,
        Reason::Shape,
        Reason::NonFinite,
        Reason::BadTruncation,
        Reason::TooLarge,
        Reason::TooManyWorkers,
        Reason::WrongData,
        Reason::Finished,
        Reason::Unauthenticated,
    ];

    /// The stable name in the metadata, in counters and in metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Reason::UnknownWorker => "unknown_worker",
            Reason::BadSession => "bad_session",
            Reason::UnknownLease => "unknown_lease",
            Reason::ForeignLease => "foreign_lease",
            Reason::ExpiredLease => "expired_lease",
            Reason::PreRestart => "pre_restart",
            Reason::Stale => "stale",
            Reason::FutureVersion => "future_version",
            Reason::Shape => "shape",
            Reason::NonFinite => "non_finite",
            Reason::BadTruncation => "bad_truncation",
            Reason::TooLarge => "too_large",
            Reason::TooManyWorkers => "too_many_workers",
            Reason::Finished => "finished",
            Reason::Unauthenticated => "unauthenticated",
            Reason::WrongData => "wrong_data",
        }
    }

    /// The gRPC code it travels with.
    pub fn code(self) -> Code {
        match self {
            Reason::UnknownWorker | Reason::UnknownLease => Code::NotFound,
            Reason::BadSession | Reason::ForeignLease => Code::PermissionDenied,
            Reason::ExpiredLease | Reason::WrongData => Code::FailedPrecondition,
            Reason::PreRestart => Code::Aborted,
            Reason::Stale | Reason::FutureVersion => Code::OutOfRange,
            Reason::Shape | Reason::NonFinite | Reason::BadTruncation | Reason::TooLarge => {
                Code::InvalidArgument
            }
            Reason::TooManyWorkers => Code::ResourceExhausted,
            Reason::Finished => Code::Cancelled,
            Reason::Unauthenticated => Code::Unauthenticated,
        }
    }

    /// The reason named `name`, if it is one.
    pub fn from_name(name: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.name() == name)
    }

    /// A status with this reason's code, `message`, and the reason in the metadata.
    pub fn status(self, message: impl Into<String>) -> Status {
        let mut status = Status::new(self.code(), message);
        status.metadata_mut().insert(
            REFUSAL_KEY,
            self.name().parse().expect("reason names are ASCII"),
        );
        status
    }

    /// The reason a status carries, if the coordinator sent one (and its code matches).
    pub fn of(status: &Status) -> Option<Reason> {
        let r = status.metadata().get(REFUSAL_KEY)?.to_str().ok()?;
        Reason::from_name(r).filter(|r| r.code() == status.code())
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_round_trips_through_a_status() {
        for r in Reason::ALL {
            let s = r.status("why");
            assert_eq!(s.code(), r.code());
            assert_eq!(Reason::of(&s), Some(r));
            assert_eq!(Reason::from_name(r.name()), Some(r));
        }
        let names: std::collections::HashSet<_> = Reason::ALL.iter().map(|r| r.name()).collect();
        assert_eq!(names.len(), Reason::ALL.len(), "names are distinct");
    }

    #[test]
    fn statuses_without_a_matching_reason_have_none() {
        assert_eq!(Reason::of(&Status::unavailable("down")), None);
        let mut s = Status::not_found("x");
        s.metadata_mut()
            .insert(REFUSAL_KEY, "no_such_reason".parse().unwrap());
        assert_eq!(Reason::of(&s), None);
        // A reason with the wrong code was not sent by a coordinator.
        let mut s = Status::not_found("x");
        s.metadata_mut()
            .insert(REFUSAL_KEY, "finished".parse().unwrap());
        assert_eq!(Reason::of(&s), None);
    }
}
