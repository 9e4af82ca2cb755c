//! Dense matrix products on host slices, in f32 and f64, for the convolutional problem:
//! a safe front to `matrixmultiply`'s blocked, SIMD kernels.

use num_traits::Float;

/// A float type with a matrix product: f32 and f64.
pub trait Real: Float + Send + Sync + std::fmt::Debug + 'static {
    /// C ← A·B + beta·C for A `m×k`, B `k×n`, C `m×n`, each given as a slice with
    /// (row, column) strides in elements.
    ///
    /// Panics when a stride pattern reaches outside its slice: the callers derive every
    /// size from a validated network shape, so that is a bug, never bad input.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        m: usize,
        k: usize,
        n: usize,
        a: &[Self],
        sa: (usize, usize),
        b: &[Self],
        sb: (usize, usize),
        beta: Self,
        c: &mut [Self],
        sc: (usize, usize),
    );
}

/// Whether a `rows×cols` matrix with strides `s` fits in `len` elements.
fn fits(rows: usize, cols: usize, s: (usize, usize), len: usize) -> bool {
    rows == 0
        || cols == 0
        || (rows - 1)
            .checked_mul(s.0)
            .zip((cols - 1).checked_mul(s.1))
            .and_then(|(a, b)| a.checked_add(b))
            .is_some_and(|last| last < len)
}

/// Whether distinct elements of a `rows×cols` matrix with strides `s` are distinct in
/// memory (row-major or column-major blocks; what an output matrix needs).
fn distinct(rows: usize, cols: usize, s: (usize, usize)) -> bool {
    rows <= 1 && (cols <= 1 || s.1 >= 1)
        || cols <= 1 && s.0 >= 1
        || s.1 >= 1 && s.0 >= cols.saturating_mul(s.1)
        || s.0 >= 1 && s.1 >= rows.saturating_mul(s.0)
}

macro_rules! real {
    ($t:ty, $f:ident) => {
        impl Real for $t {
            fn gemm(
                m: usize,
                k: usize,
                n: usize,
                a: &[Self],
                sa: (usize, usize),
                b: &[Self],
                sb: (usize, usize),
                beta: Self,
                c: &mut [Self],
                sc: (usize, usize),
            ) {
                assert!(
                    fits(m, k, sa, a.len()) && fits(k, n, sb, b.len()) && fits(m, n, sc, c.len()),
                    "gemm {m}×{k}×{n} outside its slices"
                );
                assert!(
                    distinct(m, n, sc),
                    "gemm: C's strides {sc:?} alias its elements"
                );
                if m == 0 || n == 0 {
                    return;
                }
                // SAFETY: the assertion above keeps every index the kernel reads or
                // writes inside its slice; C does not alias A or B (a `&mut` borrow).
                unsafe {
                    matrixmultiply::$f(
                        m,
                        k,
                        n,
                        1.0,
                        a.as_ptr(),
                        sa.0 as isize,
                        sa.1 as isize,
                        b.as_ptr(),
                        sb.0 as isize,
                        sb.1 as isize,
                        beta,
                        c.as_mut_ptr(),
                        sc.0 as isize,
                        sc.1 as isize,
                    )
                }
            }
        }
    };
}

real!(f32, sgemm);
real!(f64, dgemm);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_with_transposed_strides_match_the_loops() {
        // A 2×3, B 3×2 read through a transposed layout, C accumulates (beta = 1).
        let a = [1.0f64, 2.0, 3.0, 4.0, 5.0, 6.0];
        let bt = [7.0f64, 9.0, 11.0, 8.0, 10.0, 12.0]; // B = [[7, 8], [9, 10], [11, 12]]
        let mut c = [1.0f64; 4];
        f64::gemm(2, 3, 2, &a, (3, 1), &bt, (1, 3), 1.0, &mut c, (2, 1));
        assert_eq!(c, [59.0, 65.0, 140.0, 155.0]);
        let mut c32 = [0f32; 4];
        let (a32, b32) = (a.map(|v| v as f32), bt.map(|v| v as f32));
        f32::gemm(2, 3, 2, &a32, (3, 1), &b32, (1, 3), 0.0, &mut c32, (2, 1));
        assert_eq!(c32, [58.0, 64.0, 139.0, 154.0]);
    }

    #[test]
    #[should_panic(expected = "alias")]
    fn an_output_whose_strides_alias_is_refused() {
        let mut c = [0f32; 4];
        f32::gemm(
            2,
            1,
            2,
            &[1.0; 2],
            (1, 1),
            &[1.0; 2],
            (2, 1),
            0.0,
            &mut c,
            (1, 1),
        );
    }

    #[test]
    #[should_panic(expected = "outside its slices")]
    fn strides_that_overflow_are_refused() {
        let mut c = [0f32; 4];
        f32::gemm(
            2,
            1,
            2,
            &[1.0; 2],
            (usize::MAX, 1),
            &[1.0; 2],
            (2, 1),
            0.0,
            &mut c,
            (2, 1),
        );
    }

    #[test]
    #[should_panic(expected = "outside its slices")]
    fn a_product_beyond_its_slice_is_refused() {
        let mut c = [0f32; 3];
        f32::gemm(
            2,
            1,
            2,
            &[1.0; 2],
            (1, 1),
            &[1.0; 2],
            (2, 1),
            0.0,
            &mut c,
            (2, 1),
        );
    }
}
