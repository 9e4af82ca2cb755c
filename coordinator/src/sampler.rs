//! Sampling optimizee instances from weighted problem families: a family and a seed.

use anyhow::{Result, bail};
use l2l_common::problems::ProblemSpec;
use l2l_common::rng::Rng;
use l2l_proto::v1::Instance;
use serde::{Deserialize, Serialize};

/// One problem family of the problem set with its weight and hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FamilyConfig {
    /// Family name: `quadratic` or `mlp`.
    pub family: String,
    /// Relative sampling weight.
    pub weight: f64,
    /// quadratic: number of functions B; mlp: examples per minibatch.
    pub batch: u32,
    /// quadratic: dimension d.
    pub dims: u32,
    /// mlp: widths of the hidden layers.
    pub hidden: Vec<u32>,
    /// mlp: `sigmoid` or `relu`.
    pub activation: String,
}

impl Default for FamilyConfig {
    fn default() -> Self {
        Self {
            family: "quadratic".into(),
            weight: 1.0,
            batch: 128,
            dims: 10,
            hidden: vec![20],
            activation: "sigmoid".into(),
        }
    }
}

impl FamilyConfig {
    /// Refuses unknown families and impossible sizes.
    pub fn validate(&self) -> Result<()> {
        if !(self.weight > 0.0 && self.weight.is_finite()) {
            bail!("problem family {}: weight must be positive", self.family);
        }
        self.spec()?;
        Ok(())
    }

    /// The family as workers parse it (`family:key=value,...`, see [`ProblemSpec`]).
    pub fn spec(&self) -> Result<ProblemSpec> {
        let text = format!(
            "{}:{}",
            self.family,
            self.params()
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        );
        text.parse()
            .map_err(|e| anyhow::anyhow!("[[problems]] family {:?}: {e}", self.family))
    }

    fn params(&self) -> std::collections::BTreeMap<String, String> {
        let mut p = std::collections::BTreeMap::new();
        p.insert("batch".into(), self.batch.to_string());
        match self.family.as_str() {
            "mlp" => {
                let h: Vec<String> = self.hidden.iter().map(|h| h.to_string()).collect();
                p.insert("hidden".into(), h.join("x"));
                p.insert("act".into(), self.activation.clone());
            }
            _ => {
                p.insert("dims".into(), self.dims.to_string());
            }
        }
        p
    }
}

/// Draws instances: a family by weight, then a 64-bit seed, from one portable RNG.
#[derive(Debug, Clone)]
pub struct Sampler {
    families: Vec<FamilyConfig>,
    rng: Rng,
}

impl Sampler {
    /// A sampler over `families` starting from RNG state `state`.
    pub fn new(families: Vec<FamilyConfig>, state: u64) -> Self {
        Self {
            families,
            rng: Rng::from_state(state),
        }
    }

    /// The RNG state, saved in checkpoints so a resumed run continues the sequence.
    pub fn state(&self) -> u64 {
        self.rng.state()
    }

    /// The next instance.
    pub fn next(&mut self) -> Instance {
        let total: f64 = self.families.iter().map(|f| f.weight).sum();
        let mut pick = self.rng.uniform() * total;
        let mut chosen = &self.families[self.families.len() - 1];
        for f in &self.families {
            if pick < f.weight {
                chosen = f;
                break;
            }
            pick -= f.weight;
        }
        Instance {
            family: chosen.family.clone(),
            seed: self.rng.next_u64(),
            params: chosen.params().into_iter().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_are_respected_and_sequence_resumes() {
        let fams = vec![
            FamilyConfig {
                weight: 3.0,
                dims: 10,
                ..FamilyConfig::default()
            },
            FamilyConfig {
                weight: 1.0,
                dims: 5,
                ..FamilyConfig::default()
            },
        ];
        let mut s = Sampler::new(fams.clone(), 1);
        let n = 4000;
        let small = (0..n).filter(|_| s.next().params["dims"] == "5").count();
        // Expected n/4 = 1000, standard deviation sqrt(n·0.25·0.75) ≈ 27.
        assert!((small as i64 - 1000).abs() < 120, "{small}");
        let mut resumed = Sampler::new(fams, s.state());
        assert_eq!(s.next(), resumed.next());
    }

    #[test]
    fn mlp_families_carry_their_shape_and_bad_ones_are_refused() {
        let mut f = FamilyConfig {
            family: "mlp".into(),
            hidden: vec![20, 20],
            activation: "relu".into(),
            ..FamilyConfig::default()
        };
        f.validate().unwrap();
        let i = Sampler::new(vec![f.clone()], 0).next();
        assert_eq!(i.params["hidden"], "20x20");
        assert_eq!(i.params["act"], "relu");
        f.activation = "tanh".into();
        assert!(f.validate().unwrap_err().to_string().contains("tanh"));
        f.family = "conv".into();
        assert!(f.validate().unwrap_err().to_string().contains("conv"));
    }
}
