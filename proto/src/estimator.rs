//! A run's gradient estimator on the wire ([`Estimator`], on every lease), both ways: the
//! coordinator writes it from its configuration, a worker reads it back.

use l2l_common::Error;
use l2l_common::estimator::{self, PesConfig};

use crate::v1::{Estimator, LeaseReply};

impl Estimator {
    /// The wire form of `e`.
    pub fn of(e: &estimator::Estimator) -> Self {
        match e {
            estimator::Estimator::Tbptt => Self {
                kind: "tbptt".into(),
                sigma: 0.0,
                pairs: 0,
            },
            estimator::Estimator::Pes(c) => Self {
                kind: "pes".into(),
                sigma: c.sigma,
                pairs: c.pairs as u32,
            },
        }
    }

    /// The estimator this names; refuses an unknown kind (a worker older than its
    /// coordinator says so) and PES settings that cannot run.
    pub fn estimator(&self) -> Result<estimator::Estimator, Error> {
        match self.kind.as_str() {
            "tbptt" => Ok(estimator::Estimator::Tbptt),
            "pes" => {
                let c = PesConfig {
                    sigma: self.sigma,
                    pairs: self.pairs as usize,
                };
                c.validate()?;
                Ok(estimator::Estimator::Pes(c))
            }
            other => Err(Error::Config(format!(
                "unknown gradient estimator {other:?} (this worker knows tbptt and pes; \
                 is it older than the coordinator?)"
            ))),
        }
    }
}

impl LeaseReply {
    /// The estimator the lease asks for: truncated BPTT when it names none (a
    /// coordinator from before estimators were carried).
    pub fn estimator(&self) -> Result<estimator::Estimator, Error> {
        self.estimator
            .as_ref()
            .map_or(Ok(estimator::Estimator::Tbptt), Estimator::estimator)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimators_round_trip_and_bad_ones_are_refused() {
        for e in [
            estimator::Estimator::Tbptt,
            estimator::Estimator::Pes(PesConfig {
                sigma: 0.02,
                pairs: 3,
            }),
        ] {
            assert_eq!(Estimator::of(&e).estimator().unwrap(), e);
        }
        let none = LeaseReply::default();
        assert_eq!(none.estimator().unwrap(), estimator::Estimator::Tbptt);
        let mut w = Estimator::of(&estimator::Estimator::Pes(PesConfig::default()));
        w.pairs = 10_000;
        assert!(w.estimator().unwrap_err().to_string().contains("pairs"));
        w.kind = "reinforce".into();
        let e = w.estimator().unwrap_err().to_string();
        assert!(e.contains("\"reinforce\"") && e.contains("older"), "{e}");
    }
}
