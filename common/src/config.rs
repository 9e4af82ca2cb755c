//! The optimizer's configuration (spec §1.1), stored with every φ file.

use std::fmt;
use std::str::FromStr;

use crate::Error;

/// How a coordinate's gradient is turned into the LSTM's input (spec §1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preprocess {
    /// One input feature: the gradient itself.
    Identity,
    /// Two input features: scaled log-magnitude and sign, or -1 and a scaled gradient.
    LogSign,
    /// Two input features, RNNprop's (Lv et al. 2017): the gradient and its running mean,
    /// each divided by the root of a running second moment ([`crate::preprocess`]); the
    /// two moments are state carried per coordinate like the LSTM's h and c.
    Rnnprop,
}

impl Preprocess {
    /// Number of LSTM input features this preprocessing produces.
    pub fn features(self) -> usize {
        match self {
            Preprocess::Identity => 1,
            Preprocess::LogSign | Preprocess::Rnnprop => 2,
        }
    }

    /// Number of per-coordinate state vectors the preprocessing carries (RNNprop's m, v).
    pub fn moments(self) -> usize {
        match self {
            Preprocess::Identity | Preprocess::LogSign => 0,
            Preprocess::Rnnprop => 2,
        }
    }

    /// The spec's default `out_scale` for this preprocessing.
    pub fn default_out_scale(self) -> f64 {
        match self {
            Preprocess::Identity => 1.0,
            Preprocess::LogSign | Preprocess::Rnnprop => 0.1,
        }
    }

    /// The name used in files and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Preprocess::Identity => "identity",
            Preprocess::LogSign => "log_sign",
            Preprocess::Rnnprop => "rnnprop",
        }
    }
}

impl fmt::Display for Preprocess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Preprocess {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "identity" => Ok(Preprocess::Identity),
            "log_sign" => Ok(Preprocess::LogSign),
            "rnnprop" => Ok(Preprocess::Rnnprop),
            other => Err(Error::Config(format!(
                "unknown preprocess {other:?}: expected \"identity\", \"log_sign\" or \"rnnprop\""
            ))),
        }
    }
}

/// Largest LSTM hidden size accepted (files, flags, the wire).
pub const MAX_HIDDEN: usize = 4096;
/// Largest number of stacked LSTM layers accepted.
pub const MAX_LAYERS: usize = 64;
/// Largest φ accepted, in values (256 MiB of float32).
pub const MAX_PARAMS: usize = 1 << 26;
/// Largest log_sign constant k accepted: e^k must stay finite in float32 (e^88.7 is not),
/// or the small branch's e^k·g turns g = 0 into NaN.
pub const MAX_K: f64 = 80.0;

/// Every field that shapes φ or its arithmetic (spec §1.1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OptimizerConfig {
    /// Gradient preprocessing.
    pub preprocess: Preprocess,
    /// log_sign's constant (the paper's p); ignored by `identity` but stored.
    pub k: f64,
    /// LSTM hidden size H.
    pub hidden: usize,
    /// Number of stacked LSTM layers.
    pub layers: usize,
    /// Factor on the network's output.
    pub out_scale: f64,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self::new(Preprocess::LogSign)
    }
}

impl OptimizerConfig {
    /// The spec's defaults for the given preprocessing (H = 20, 2 layers, k = 10).
    pub fn new(preprocess: Preprocess) -> Self {
        Self {
            preprocess,
            k: 10.0,
            hidden: 20,
            layers: 2,
            out_scale: preprocess.default_out_scale(),
        }
    }

    /// Refuses sizes and constants that cannot define an optimizer, and sizes beyond
    /// [`MAX_HIDDEN`], [`MAX_LAYERS`] and [`MAX_PARAMS`] (checked before anything is
    /// allocated, so a file's metadata cannot ask for absurd memory).
    pub fn validate(&self) -> Result<(), Error> {
        if !(1..=MAX_HIDDEN).contains(&self.hidden) {
            return Err(Error::Config(format!(
                "hidden must be in 1..={MAX_HIDDEN}, got {}",
                self.hidden
            )));
        }
        if !(1..=MAX_LAYERS).contains(&self.layers) {
            return Err(Error::Config(format!(
                "layers must be in 1..={MAX_LAYERS}, got {}",
                self.layers
            )));
        }
        // At most 4096 · 16384 · 2 · 64 + small: no overflow in u64 or usize on 64 bits.
        let (h, l, i) = (
            self.hidden as u64,
            self.layers as u64,
            self.preprocess.features() as u64,
        );
        let params = (i + h) * 4 * h + 4 * h + (l - 1) * (2 * h * 4 * h + 4 * h) + h + 1;
        if params > MAX_PARAMS as u64 {
            return Err(Error::Config(format!(
                "hidden = {} and layers = {} make φ {params} values; at most {MAX_PARAMS} are supported",
                self.hidden, self.layers
            )));
        }
        if !(self.k.is_finite() && self.k > 0.0 && self.k <= MAX_K) {
            return Err(Error::Config(format!(
                "k must be a number in (0, {MAX_K}] (e^k must be finite in float32), got {}",
                self.k
            )));
        }
        if !self.out_scale.is_finite() {
            return Err(Error::Config(format!(
                "out_scale must be finite, got {}",
                self.out_scale
            )));
        }
        Ok(())
    }

    /// Input size of LSTM layer `l` (I_l of spec §1.3).
    pub fn input_size(&self, layer: usize) -> usize {
        if layer == 0 {
            self.preprocess.features()
        } else {
            self.hidden
        }
    }

    /// Names and shapes of φ's tensors, in the spec §4.1 order.
    pub fn tensor_layout(&self) -> Vec<(String, Vec<usize>)> {
        let h4 = 4 * self.hidden;
        let mut out = Vec::with_capacity(3 * self.layers + 2);
        for l in 0..self.layers {
            out.push((format!("lstm.{l}.w_x"), vec![self.input_size(l), h4]));
            out.push((format!("lstm.{l}.w_h"), vec![self.hidden, h4]));
            out.push((format!("lstm.{l}.b"), vec![h4]));
        }
        out.push(("out.w".into(), vec![self.hidden, 1]));
        out.push(("out.b".into(), vec![1]));
        out
    }

    /// Total number of scalars in φ.
    pub fn num_params(&self) -> usize {
        self.tensor_layout()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_sizes_match_the_spec_counts() {
        // Spec §4.1: 5,141 numbers with log_sign, 5,061 with identity.
        assert_eq!(OptimizerConfig::new(Preprocess::LogSign).num_params(), 5141);
        assert_eq!(
            OptimizerConfig::new(Preprocess::Identity).num_params(),
            5061
        );
    }

    #[test]
    fn unknown_preprocess_is_refused_by_name() {
        let err = "logsign".parse::<Preprocess>().unwrap_err().to_string();
        assert!(err.contains("logsign") && err.contains("log_sign"), "{err}");
    }

    #[test]
    fn absurd_sizes_are_refused_before_any_allocation() {
        for (hidden, layers) in [
            (0, 2),
            (20, 0),
            (20, 10_000_000_000_000),
            (1 << 40, 1),
            (4096, 64),
        ] {
            let c = OptimizerConfig {
                hidden,
                layers,
                ..OptimizerConfig::default()
            };
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("hidden") || e.contains("layers"), "{e}");
        }
        let ok = OptimizerConfig::default();
        ok.validate().unwrap();
        let c = OptimizerConfig {
            hidden: 4096,
            layers: 1,
            ..ok
        };
        // (2 + 4096)·16384 + 16384 + 4097 = 67,162,113 values, just above 2^26.
        assert!(c.validate().unwrap_err().to_string().contains("67162113"));
        let c = OptimizerConfig {
            hidden: 1024,
            layers: 16,
            ..OptimizerConfig::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("at most"));
    }

    #[test]
    fn k_outside_its_range_is_refused() {
        for k in [0.0, -1.0, f64::NAN, f64::INFINITY, 80.5, 100.0] {
            let c = OptimizerConfig {
                k,
                ..OptimizerConfig::default()
            };
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("k must be"), "{k}: {e}");
        }
        for k in [1e-3, 5.0, 10.0, MAX_K] {
            let c = OptimizerConfig {
                k,
                ..OptimizerConfig::default()
            };
            c.validate().unwrap();
        }
        // At the limit e^k is finite in float32.
        assert!((MAX_K.exp() as f32).is_finite());
    }
}
