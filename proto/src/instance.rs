//! An optimizee instance on the wire ([`Instance`]: family, seed, hyper-parameters) and
//! the problem spec it names, both ways: the coordinator's sampler writes instances from
//! specs, a worker reads specs back from instances.

use l2l_common::Error;
use l2l_common::problems::ProblemSpec;

use crate::v1::Instance;

impl Instance {
    /// The instance of `spec` drawn from `seed`, with every hyper-parameter written out.
    pub fn of(spec: &ProblemSpec, seed: u64) -> Self {
        Self {
            family: spec.family().to_string(),
            seed,
            params: spec.params().into_iter().collect(),
        }
    }

    /// The family and hyper-parameters this instance names; refuses unknown families
    /// and parameters (a worker older than its coordinator says so).
    pub fn spec(&self) -> Result<ProblemSpec, Error> {
        let mut params: Vec<(&str, &str)> = self
            .params
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        params.sort();
        ProblemSpec::from_parts(&self.family, params)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_round_trip_through_instances() {
        for text in [
            "quadratic",
            "quadratic:batch=3,dims=7",
            "mlp:hidden=40x20,act=relu",
        ] {
            let spec: ProblemSpec = text.parse().unwrap();
            let i = Instance::of(&spec, 42);
            assert_eq!(i.seed, 42);
            assert_eq!(i.spec().unwrap(), spec, "{text}");
        }
    }

    #[test]
    fn unknown_families_and_parameters_are_refused_by_name() {
        let mut i = Instance::of(&"quadratic".parse().unwrap(), 1);
        i.params.insert("dims".into(), "ten".into());
        assert!(i.spec().unwrap_err().to_string().contains("\"ten\""));
        i.family = "conv".into();
        assert!(i.spec().unwrap_err().to_string().contains("\"conv\""));
    }
}
