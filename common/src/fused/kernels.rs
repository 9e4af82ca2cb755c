//! Which compiled variant of the LSTM kernels runs: chosen at run time from what the CPU
//! has, or named by `L2L_KERNELS`.
//!
//! Every variant computes the same operations in the same order on the same block layout;
//! they differ in the instructions the compiler may use. `avx2` and `avx512` both fuse
//! multiply-adds (one rounding) and give the same bits; `portable` rounds twice and agrees
//! with them to float32 rounding.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use crate::Error;

/// The environment variable that overrides the detected kernels (`portable`, `avx2`,
/// `avx512`), e.g. to compare them or to work around a CPU or compiler fault.
pub const ENV: &str = "L2L_KERNELS";

/// A compiled variant of the fused kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernels {
    /// Plain multiply-adds, compiled for the baseline target: any CPU.
    Portable,
    /// AVX2 and FMA (x86-64): a block is two 256-bit registers.
    Avx2,
    /// AVX-512 F/VL and FMA (x86-64): a block is one 512-bit register, 32 of them.
    Avx512,
}

impl Kernels {
    /// Every variant, slowest first.
    pub const ALL: [Kernels; 3] = [Kernels::Portable, Kernels::Avx2, Kernels::Avx512];

    /// Whether this CPU can run the variant.
    pub fn supported(self) -> bool {
        match self {
            Kernels::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Kernels::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "x86_64")]
            Kernels::Avx512 => {
                Kernels::Avx2.supported()
                    && std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512vl")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The variants this CPU can run, slowest first.
    pub fn available() -> Vec<Kernels> {
        Self::ALL.into_iter().filter(|k| k.supported()).collect()
    }

    /// The fastest variant this CPU can run.
    pub fn best() -> Kernels {
        *Self::available().last().unwrap_or(&Kernels::Portable)
    }

    /// The variant meta-gradients use: `L2L_KERNELS` if set, else [`Kernels::best`].
    /// Fails when the variable names an unknown variant or one this CPU cannot run.
    pub fn chosen() -> Result<Kernels, Error> {
        static CHOSEN: OnceLock<Result<Kernels, String>> = OnceLock::new();
        CHOSEN
            .get_or_init(|| match std::env::var(ENV) {
                Err(_) => Ok(Kernels::best()),
                Ok(v) => v
                    .parse::<Kernels>()
                    .map_err(|e| format!("{ENV}: {e}"))
                    .and_then(|k| {
                        if k.supported() {
                            Ok(k)
                        } else {
                            Err(format!(
                                "{ENV}={v}, but this CPU cannot run the {k} kernels; \
                             unset it or name one of: {}",
                                names(&Kernels::available())
                            ))
                        }
                    }),
            })
            .clone()
            .map_err(Error::Config)
    }

    /// The name `L2L_KERNELS` and `bench` use.
    pub fn name(self) -> &'static str {
        match self {
            Kernels::Portable => "portable",
            Kernels::Avx2 => "avx2",
            Kernels::Avx512 => "avx512",
        }
    }
}

fn names(ks: &[Kernels]) -> String {
    ks.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ")
}

impl fmt::Display for Kernels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Kernels {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s.trim())
            .ok_or_else(|| {
                format!(
                    "unknown kernels '{s}'; expected one of: {}",
                    names(&Self::ALL)
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_ones_are_refused() {
        for k in Kernels::ALL {
            assert_eq!(k.name().parse::<Kernels>(), Ok(k));
        }
        let e = "sse9".parse::<Kernels>().unwrap_err();
        assert!(e.contains("portable, avx2, avx512"), "{e}");
        assert!(Kernels::Portable.supported());
        assert!(Kernels::available().contains(&Kernels::best()));
    }
}
