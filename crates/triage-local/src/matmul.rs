//! The one matrix product the CPU encoder needs, over slices: a safe face on
//! the `gemm` crate (the kernels candle itself runs on the CPU, with their
//! AVX-512 variants switched on by the workspace), with every index the
//! kernel will touch checked against the slices first.

/// A row-major view: element `(r, c)` is at `offset + r * row_stride + c * col_stride`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct View {
    pub offset: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl View {
    /// A dense row-major matrix with `cols` columns starting at `offset`.
    pub fn rows(offset: usize, cols: usize) -> Self {
        Self {
            offset,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose of a dense row-major matrix with `cols` columns.
    pub fn transposed(offset: usize, cols: usize) -> Self {
        Self {
            offset,
            row_stride: 1,
            col_stride: cols,
        }
    }

    /// One past the last index of an `r × c` matrix seen through this view.
    fn end(&self, r: usize, c: usize) -> usize {
        self.offset + (r - 1) * self.row_stride + (c - 1) * self.col_stride + 1
    }
}

/// A matrix the product reads: its slice and how to see it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Operand<'a> {
    pub data: &'a [f32],
    pub view: View,
}

/// How the product lands in `dst`: added to it or over it, scaled, on how
/// many threads.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Product {
    /// Add to `dst` (else overwrite it).
    pub accumulate: bool,
    pub scale: f32,
    pub threads: usize,
}

/// Work below this many multiply-adds runs on the calling thread: splitting
/// it costs more than it saves.
const PARALLEL_MIN_MACS: usize = 1 << 18;

/// `dst = accumulate·dst + scale · lhs · rhs` with `lhs` `m × k`, `rhs` `k × n`, `dst` `m × n`.
///
/// # Panics
/// When a view reaches past its slice, or two views of `dst` overlap (a bug
/// in the caller, caught before any memory is touched).
#[expect(
    unsafe_code,
    reason = "gemm takes raw pointers; every index it reads or writes is bounds-checked \
              first, `dst` is borrowed mutably and `lhs`/`rhs` shared, so none alias it"
)]
pub(crate) fn gemm(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_view: View,
    lhs: Operand<'_>,
    rhs: Operand<'_>,
    how: Product,
) {
    let (
        Operand {
            data: lhs,
            view: lhs_view,
        },
        Operand {
            data: rhs,
            view: rhs_view,
        },
    ) = (lhs, rhs);
    let Product {
        accumulate,
        scale,
        threads,
    } = how;
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                for c in 0..n {
                    dst[dst_view.offset + r * dst_view.row_stride + c * dst_view.col_stride] = 0.0;
                }
            }
        }
        return;
    }
    assert!(dst_view.end(m, n) <= dst.len(), "gemm: dst out of bounds");
    assert!(lhs_view.end(m, k) <= lhs.len(), "gemm: lhs out of bounds");
    assert!(rhs_view.end(k, n) <= rhs.len(), "gemm: rhs out of bounds");
    // Distinct (r, c) must land on distinct dst elements, or threads would race.
    assert!(
        (dst_view.col_stride == 1 && dst_view.row_stride >= n)
            || (dst_view.row_stride == 1 && dst_view.col_stride >= m),
        "gemm: dst view overlaps itself"
    );
    let parallelism = if threads > 1 && m * n * k >= PARALLEL_MIN_MACS {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    let stride = |s: usize| isize::try_from(s).unwrap_or(isize::MAX);
    // SAFETY: see the reason above: the three views fit their slices, and dst's
    // elements are distinct for distinct (r, c).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr().add(dst_view.offset),
            stride(dst_view.col_stride),
            stride(dst_view.row_stride),
            accumulate,
            lhs.as_ptr().add(lhs_view.offset),
            stride(lhs_view.col_stride),
            stride(lhs_view.row_stride),
            rhs.as_ptr().add(rhs_view.offset),
            stride(rhs_view.col_stride),
            stride(rhs_view.row_stride),
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        c
    }

    #[test]
    fn matches_the_naive_product_plain_and_transposed() {
        let (m, n, k) = (37, 19, 70);
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0)
            .collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| ((i * 5 % 11) as f32 - 5.0) / 3.0)
            .collect();
        let want = naive(m, n, k, &a, &b);
        let mut got = vec![1.0; m * n];
        gemm(
            (m, n, k),
            &mut got,
            View::rows(0, n),
            Operand {
                data: &a,
                view: View::rows(0, k),
            },
            Operand {
                data: &b,
                view: View::rows(0, n),
            },
            Product {
                accumulate: true,
                scale: 1.0,
                threads: 2,
            },
        );
        for (g, w) in got.iter().zip(&want) {
            assert!((g - (w + 1.0)).abs() < 1e-3, "{g} vs {w} + 1");
        }
        // b stored transposed (n × k), read as k × n.
        let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        let mut got = vec![0.0; m * n];
        gemm(
            (m, n, k),
            &mut got,
            View::rows(0, n),
            Operand {
                data: &a,
                view: View::rows(0, k),
            },
            Operand {
                data: &bt,
                view: View::transposed(0, k),
            },
            Product {
                accumulate: false,
                scale: 0.5,
                threads: 1,
            },
        );
        for (g, w) in got.iter().zip(&want) {
            assert!((g - 0.5 * w).abs() < 1e-3);
        }
    }

    #[test]
    #[should_panic(expected = "out of bounds")]
    fn a_view_past_its_slice_panics_before_touching_memory() {
        let a = vec![0.0; 4];
        let mut c = vec![0.0; 4];
        gemm(
            (2, 2, 3),
            &mut c,
            View::rows(0, 2),
            Operand {
                data: &a,
                view: View::rows(0, 3),
            },
            Operand {
                data: &a,
                view: View::rows(0, 2),
            },
            Product {
                accumulate: false,
                scale: 1.0,
                threads: 1,
            },
        );
    }
}
