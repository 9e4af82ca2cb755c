//! Branch-free f32 exp, sigmoid and tanh that the compiler can vectorize.
//!
//! `exp` is Cephes' `expf`: x = n·ln2 + r with |r| ≤ ln2/2, a degree-6 polynomial for
//! e^r, and 2^n put into the exponent bits; relative error about 2e-7 over the clamped
//! range [-87, 88]. libm's `expf`/`tanhf` are scalar calls; these inline into the loops.
//! Each is generic over [`Madd`], so that the SIMD kernels evaluate the polynomial and
//! the argument reduction with fused multiply-adds (one rounding each, half the
//! instructions) and the portable one with plain ones.

/// How `a · b + c` is computed: fused (one rounding, where the CPU has FMA) or plain.
pub trait Madd {
    /// `a · b + c`.
    fn madd(a: f32, b: f32, c: f32) -> f32;
}

/// `a · b + c` with two roundings: any CPU.
pub struct Plain;

impl Madd for Plain {
    #[inline(always)]
    fn madd(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// `a · b + c` with one rounding: only inside functions compiled with the `fma` feature
/// (elsewhere `mul_add` would be a slow library call).
#[cfg(target_arch = "x86_64")]
pub struct Fused;

#[cfg(target_arch = "x86_64")]
impl Madd for Fused {
    #[inline(always)]
    fn madd(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;

/// e^x for x in [-87, 88] (clamped outside).
#[inline(always)]
pub fn exp<M: Madd>(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let n = M::madd(x, LOG2E, 0.5).floor();
    let r = M::madd(-n, LN2_LO, M::madd(-n, LN2_HI, x));
    let mut p = 1.987_569_1e-4f32;
    p = M::madd(p, r, 1.398_199_9e-3);
    p = M::madd(p, r, 8.333_452e-3);
    p = M::madd(p, r, 4.166_579_6e-2);
    p = M::madd(p, r, 1.666_666_5e-1);
    p = M::madd(p, r, 5.000_000_1e-1);
    let e = M::madd(p, r * r, r) + 1.0;
    // n is an integer within [-126, 127] after the clamp. Adding 1.5·2^23 puts it in the
    // low mantissa bits (exactly), so 2^n is built with integer ops on the bits; `n as i32`
    // would give the same bits but its NaN and saturation checks are scalar code that
    // keeps the loops from vectorizing.
    let n_bits = (n + 12_582_912.0).to_bits().wrapping_sub(0x4B40_0000);
    f32::from_bits(n_bits.wrapping_add(127) << 23) * e
}

/// 1 / (1 + e^-x).
#[inline(always)]
pub fn sigmoid<M: Madd>(x: f32) -> f32 {
    1.0 / (1.0 + exp::<M>(-x))
}

/// tanh x = 2σ(2x) − 1, with the absolute error of σ (≈1e-7).
#[inline(always)]
pub fn tanh<M: Madd>(x: f32) -> f32 {
    2.0 / (1.0 + exp::<M>(-2.0 * x)) - 1.0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both ways of multiply-adding give exp, σ and tanh to within a few ulp.
    fn close_to_f64<M: Madd>() {
        let mut worst = (0f64, 0f64, 0f64);
        let mut x = -30.0f32;
        while x < 30.0 {
            let xe = x as f64;
            let e = (exp::<M>(x) as f64 - xe.exp()).abs() / xe.exp();
            let s = (sigmoid::<M>(x) as f64 - 1.0 / (1.0 + (-xe).exp())).abs();
            let t = (tanh::<M>(x) as f64 - xe.tanh()).abs();
            worst = (worst.0.max(e), worst.1.max(s), worst.2.max(t));
            x += 0.001;
        }
        // Relative error of exp a few ulp; absolute error of σ and tanh near f32's ulp of 1.
        assert!(worst.0 < 5e-7, "exp rel {:e}", worst.0);
        assert!(worst.1 < 2e-7, "sigmoid abs {:e}", worst.1);
        assert!(worst.2 < 4e-7, "tanh abs {:e}", worst.2);
        // The ends of the clamp, where 2^n is largest and smallest.
        for x in [-87.0f32, -86.5, 87.5, 88.0, -1e30, 1e30] {
            let xe = (x as f64).clamp(-87.0, 88.0);
            let e = (exp::<M>(x) as f64 - xe.exp()).abs() / xe.exp();
            assert!(e < 5e-7, "exp({x}) rel {e:e}");
        }
        assert_eq!(sigmoid::<M>(-200.0), 1.0 / (1.0 + 88f32.exp()));
        assert_eq!(tanh::<M>(100.0), 1.0);
        assert_eq!(tanh::<M>(-100.0), -1.0);
    }

    #[test]
    fn plain_close_to_f64_over_the_useful_range() {
        close_to_f64::<Plain>();
    }

    /// Outside the SIMD kernels `mul_add` is a (slow, exact) library call: same bits.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn fused_close_to_f64_over_the_useful_range() {
        close_to_f64::<Fused>();
    }
}
