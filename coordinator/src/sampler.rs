//! Sampling optimizee instances from weighted problem families: a family and a seed.

use std::collections::BTreeMap;

use anyhow::{Result, bail};
use l2l_common::problems::ProblemSpec;
use l2l_common::rng::Rng;
use l2l_proto::v1::Instance;
use serde::{Deserialize, Serialize};

/// One problem family of the problem set with its weight and hyper-parameters.
///
/// In TOML, a `[[problems]]` table: `family`, `weight`, and the family's own parameters
/// (e.g. `batch`, `dims` for `quadratic`; `hidden = [20]`, `activation`, `batch` for
/// `mlp`); what is left out takes the family's default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FamilyConfig {
    /// Family name: one of the registered families (`quadratic`, `mlp`, `conv`).
    pub family: String,
    /// Relative sampling weight.
    pub weight: f64,
    /// The family's parameters; unknown ones are refused by the family.
    #[serde(flatten)]
    pub params: BTreeMap<String, toml::Value>,
}

impl Default for FamilyConfig {
    fn default() -> Self {
        Self {
            family: "quadratic".into(),
            weight: 1.0,
            params: BTreeMap::new(),
        }
    }
}

impl FamilyConfig {
    /// Refuses bad weights, unknown families and parameters, and impossible sizes.
    pub fn validate(&self) -> Result<()> {
        if !(self.weight > 0.0 && self.weight.is_finite()) {
            bail!("problem family {}: weight must be positive", self.family);
        }
        self.spec()?;
        Ok(())
    }

    /// The family and its parameters as a [`ProblemSpec`].
    pub fn spec(&self) -> Result<ProblemSpec> {
        let params = self
            .params
            .iter()
            .map(|(k, v)| Ok((k.as_str(), param_text(k, v)?)))
            .collect::<Result<Vec<_>>>()?;
        ProblemSpec::from_parts(&self.family, params.iter().map(|(k, v)| (*k, v.as_str())))
            .map_err(|e| anyhow::anyhow!("[[problems]] family {:?}: {e}", self.family))
    }
}

/// A TOML value as a problem parameter: numbers and strings as written, a list of
/// numbers joined by `x` (`hidden = [20, 20]` is `hidden=20x20`).
fn param_text(key: &str, v: &toml::Value) -> Result<String> {
    Ok(match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        toml::Value::Array(items) => items
            .iter()
            .map(|i| param_text(key, i))
            .collect::<Result<Vec<_>>>()?
            .join("x"),
        _ => bail!("[[problems]] parameter {key:?}: expected a number, a string or a list"),
    })
}

/// Draws instances: a family by weight, then a 64-bit seed, from one portable RNG.
#[derive(Debug, Clone)]
pub struct Sampler {
    families: Vec<(f64, ProblemSpec)>,
    rng: Rng,
}

impl Sampler {
    /// A sampler over `families` starting from RNG state `state`; refuses families that
    /// do not validate.
    pub fn new(families: &[FamilyConfig], state: u64) -> Result<Self> {
        if families.is_empty() {
            bail!("problems: at least one problem family is needed");
        }
        Ok(Self {
            families: families
                .iter()
                .map(|f| {
                    f.validate()?;
                    Ok((f.weight, f.spec()?))
                })
                .collect::<Result<_>>()?,
            rng: Rng::from_state(state),
        })
    }

    /// The RNG state, saved in checkpoints so a resumed run continues the sequence.
    pub fn state(&self) -> u64 {
        self.rng.state()
    }

    /// The next instance.
    pub fn next(&mut self) -> Instance {
        let total: f64 = self.families.iter().map(|f| f.0).sum();
        let mut pick = self.rng.uniform() * total;
        let mut chosen = &self.families[self.families.len() - 1].1;
        for (weight, spec) in &self.families {
            if pick < *weight {
                chosen = spec;
                break;
            }
            pick -= weight;
        }
        Instance::of(chosen, self.rng.next_u64())
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
                params: [("dims".to_string(), toml::Value::Integer(10))].into(),
                ..FamilyConfig::default()
            },
            FamilyConfig {
                weight: 1.0,
                params: [("dims".to_string(), toml::Value::Integer(5))].into(),
                ..FamilyConfig::default()
            },
        ];
        let mut s = Sampler::new(&fams, 1).unwrap();
        let n = 4000;
        let small = (0..n).filter(|_| s.next().params["dims"] == "5").count();
        // Expected n/4 = 1000, standard deviation sqrt(n·0.25·0.75) ≈ 27.
        assert!((small as i64 - 1000).abs() < 120, "{small}");
        let mut resumed = Sampler::new(&fams, s.state()).unwrap();
        assert_eq!(s.next(), resumed.next());
    }

    #[test]
    fn mlp_families_carry_their_shape_and_bad_ones_are_refused() {
        let mut f: FamilyConfig =
            toml::from_str("family = \"mlp\"\nhidden = [20, 20]\nactivation = \"relu\"").unwrap();
        f.validate().unwrap();
        let i = Sampler::new(std::slice::from_ref(&f), 0).unwrap().next();
        assert_eq!(i.params["hidden"], "20x20");
        assert_eq!(i.params["act"], "relu");
        assert_eq!(i.params["batch"], "128", "defaults are written out");
        f.params
            .insert("activation".into(), toml::Value::String("tanh".into()));
        assert!(f.validate().unwrap_err().to_string().contains("tanh"));
        f.params
            .insert("activation".into(), toml::Value::String("relu".into()));
        f.params.insert("dims".into(), toml::Value::Integer(3));
        assert!(f.validate().unwrap_err().to_string().contains("dims"));
        f.family = "conv".into();
        assert!(f.validate().unwrap_err().to_string().contains("conv"));
    }
}
