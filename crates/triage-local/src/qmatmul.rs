//! Int8 dense layers for the CPU encoder: `y = x · w + b` with `w` quantised
//! once at load (symmetric, one scale per output) and each row of `x`
//! quantised on the fly (symmetric, one scale per row), multiplied in
//! integers and scaled back to `f32`.
//!
//! Why: at batch 1 a BERT layer is a handful of products of a few dozen
//! rows with large weight matrices. In `f32` each multiply-add is one lane
//! of an FMA; with AVX-512 VNNI one `vpdpbusd` does four `u8 × i8`
//! multiply-adds per lane, and the weights are a quarter of the bytes.
//!
//! Without VNNI, AVX2 does the same in three instructions (`vpsignb`,
//! `vpmaddubsw`, `vpmaddwd`; see [`avx2`]), and a portable kernel covers
//! the rest. The integer sums are exact, so all three give bit-identical
//! results: a quantised model answers the same on every CPU. Activations
//! are stored as `u8` (`q + 128`, which `vpdpbusd` needs); the `128 · Σ w`
//! this adds to each output is precomputed per column and taken off.

use rayon::prelude::*;

/// Outputs per block: one 512-bit register of `i32` sums.
const LANES: usize = 16;
/// Inputs per `vpdpbusd` step.
const GROUP: usize = 4;
/// Rows and blocks of one register tile (4 × 4 accumulators).
const TILE_ROWS: usize = 4;
const TILE_BLOCKS: usize = 4;
/// Below this many multiply-adds a product runs on the calling thread.
const PARALLEL_MIN_MACS: usize = 1 << 18;

/// A dense layer's weights in int8, packed for the kernel.
#[derive(Debug)]
pub(crate) struct QDense {
    inp: usize,
    out: usize,
    /// `inp` in groups of four (the last one padded with zero weights).
    k4: usize,
    blocks: usize,
    /// `[block][k4][LANES][GROUP]`: each step of a block is 64 bytes.
    packed: Vec<i8>,
    /// Per output (padded to whole blocks): its weight scale, and
    /// `128 · Σ_k w_q[k][c]`, and its bias.
    scale: Vec<f32>,
    shift: Vec<i32>,
    bias: Vec<f32>,
}

impl QDense {
    /// Quantise `w`, stored `inp × out` row-major, and keep `b`.
    pub fn quantize(w: &[f32], b: &[f32], inp: usize, out: usize) -> Self {
        assert_eq!(w.len(), inp * out, "weights are not inp × out");
        assert_eq!(b.len(), out, "one bias per output");
        let k4 = inp.div_ceil(GROUP);
        let blocks = out.div_ceil(LANES);
        // Row by row (the weights are stored that way), not column by column.
        let mut max = vec![0.0f32; out];
        for row in w.chunks_exact(out) {
            for (m, v) in max.iter_mut().zip(row) {
                *m = m.max(v.abs());
            }
        }
        let mut scale = vec![1.0f32; blocks * LANES];
        for (s, &m) in scale.iter_mut().zip(&max) {
            if m > 0.0 {
                *s = m / 127.0;
            }
        }
        let mut packed = vec![0i8; blocks * k4 * LANES * GROUP];
        let mut shift = vec![0i32; blocks * LANES];
        for k in 0..inp {
            for c in 0..out {
                let q = (w[k * out + c] / scale[c]).round().clamp(-127.0, 127.0) as i8;
                let (blk, lane) = (c / LANES, c % LANES);
                packed[((blk * k4 + k / GROUP) * LANES + lane) * GROUP + k % GROUP] = q;
                shift[c] += 128 * i32::from(q);
            }
        }
        Self {
            inp,
            out,
            k4,
            blocks,
            packed,
            scale,
            shift,
            bias: {
                let mut padded = b.to_vec();
                padded.resize(blocks * LANES, 0.0);
                padded
            },
        }
    }

    /// Whether this CPU runs a vectorised kernel (AVX-512 VNNI or AVX2).
    /// Without one the portable kernel gives the same sums but is far
    /// slower than `f32`: before the AVX2 kernel, a 2-core AVX2 machine ran
    /// the toxicity specialist at 7.9 tweets/s in int8 against 64.4 in
    /// `f32`; with it, 101.2 against 68.0 (`scripts/bench/encoders.sh 2 3`).
    pub fn fast_on_this_cpu() -> bool {
        Kernel::detect() != Kernel::Portable
    }

    /// `y = x · w + b` for `rows` rows of `x`.
    pub fn forward(&self, x: &[f32], rows: usize, threads: usize) -> Vec<f32> {
        self.forward_with(Kernel::detect(), x, rows, threads)
    }

    /// [`Self::forward`] on a given kernel (tests run the portable one on
    /// CPUs that have VNNI too).
    fn forward_with(&self, kernel: Kernel, x: &[f32], rows: usize, threads: usize) -> Vec<f32> {
        assert_eq!(x.len(), rows * self.inp, "input is not rows × inp");
        let mut y = vec![0f32; rows * self.out];
        if rows == 0 || self.out == 0 {
            return y;
        }
        let lda = self.k4 * GROUP;
        let (a, row_scale) = quantize_rows(x, rows, self.inp, lda, threads);
        let a = kernel.prepare(&a);
        let groups = self.blocks.div_ceil(TILE_BLOCKS);
        let tasks = if threads > 1 && rows * self.inp * self.out >= PARALLEL_MIN_MACS {
            threads.min(groups)
        } else {
            1
        };
        // Each task takes a run of whole groups of blocks (64 outputs) and
        // fills its own `rows × width` slab, copied into place after: few
        // tasks, so that a batch of one text is not lost in scheduling.
        let per_task = groups.div_ceil(tasks);
        // Every task gets at least one group (8 threads over 12 groups is 6
        // tasks of 2, not 8 tasks of which the last two start past the end).
        let tasks = groups.div_ceil(per_task);
        let task = |t: usize| -> (usize, Vec<f32>) {
            let b_first = t * per_task * TILE_BLOCKS;
            let b_end = ((t + 1) * per_task * TILE_BLOCKS).min(self.blocks);
            let width = (b_end - b_first) * LANES;
            let mut slab = vec![0f32; rows * width];
            let mut acc = [[[0i32; LANES]; TILE_BLOCKS]; TILE_ROWS];
            for b0 in (b_first..b_end).step_by(TILE_BLOCKS) {
                let nb = TILE_BLOCKS.min(b_end - b0);
                let mut r0 = 0;
                while r0 < rows {
                    let nr = TILE_ROWS.min(rows - r0);
                    let tile = Tile {
                        a: &a,
                        lda,
                        r0,
                        nr,
                        packed: &self.packed,
                        k4: self.k4,
                        b0,
                        nb,
                        shift: &self.shift,
                    };
                    kernel.tile(&tile, &mut acc);
                    for (r, acc_r) in acc.iter().enumerate().take(nr) {
                        let at = (r0 + r) * width + (b0 - b_first) * LANES;
                        let c0 = b0 * LANES;
                        rescale(
                            &mut slab[at..at + nb * LANES],
                            &acc_r[..nb],
                            &self.shift[c0..c0 + nb * LANES],
                            &self.scale[c0..c0 + nb * LANES],
                            &self.bias[c0..c0 + nb * LANES],
                            row_scale[r0 + r],
                        );
                    }
                    r0 += nr;
                }
            }
            (b_first * LANES, slab)
        };
        let slabs: Vec<(usize, Vec<f32>)> = if tasks > 1 {
            (0..tasks).into_par_iter().map(task).collect()
        } else {
            vec![task(0)]
        };
        for (c0, slab) in &slabs {
            let width = slab.len() / rows;
            let take = width.min(self.out.saturating_sub(*c0));
            for (dst, src) in y.chunks_exact_mut(self.out).zip(slab.chunks_exact(width)) {
                dst[*c0..c0 + take].copy_from_slice(&src[..take]);
            }
        }
        y
    }
}

/// `dst = (acc − shift) · row_scale · scale + bias`, lane by lane.
fn rescale(
    dst: &mut [f32],
    acc: &[[i32; LANES]],
    shift: &[i32],
    scale: &[f32],
    bias: &[f32],
    row_scale: f32,
) {
    let (dst, _) = dst.as_chunks_mut::<LANES>();
    let (shift, _) = shift.as_chunks::<LANES>();
    let (scale, _) = scale.as_chunks::<LANES>();
    let (bias, _) = bias.as_chunks::<LANES>();
    pulp::Arch::new().dispatch(|| {
        for ((((d, v), sh), sc), b) in dst.iter_mut().zip(acc).zip(shift).zip(scale).zip(bias) {
            for l in 0..LANES {
                d[l] = (v[l] - sh[l]) as f32 * (row_scale * sc[l]) + b[l];
            }
        }
    });
}

/// Each row of `x` (`inp` wide) as `u8` codes `q + 128`, `q = round(v / s)`
/// in ±127 with `s = max |v| / 127`, padded to `lda` with zeros (code 128).
fn quantize_rows(
    x: &[f32],
    rows: usize,
    inp: usize,
    lda: usize,
    threads: usize,
) -> (Vec<u8>, Vec<f32>) {
    // 1.5 · 2^23: adding and subtracting it rounds to the nearest integer
    // (ties to even), in a form that vectorises.
    const ROUND: f32 = 12_582_912.0;
    let mut a = vec![128u8; rows * lda];
    let mut scales = vec![0f32; rows];
    let one = |((dst, row), s): ((&mut [u8], &[f32]), &mut f32)| {
        pulp::Arch::new().dispatch(|| {
            let mut lanes = [0f32; LANES];
            let (chunks, rest) = row.as_chunks::<LANES>();
            for c in chunks {
                for l in 0..LANES {
                    lanes[l] = lanes[l].max(c[l].abs());
                }
            }
            let max = rest
                .iter()
                .chain(&lanes)
                .fold(0.0f32, |m, v| m.max(v.abs()));
            *s = if max > 0.0 { max / 127.0 } else { 1.0 };
            let inv = 1.0 / *s;
            for (d, &v) in dst[..inp].iter_mut().zip(row) {
                // |v · inv| ≤ 127 up to rounding; the clamp keeps it there.
                let q = ((v * inv).clamp(-127.0, 127.0) + ROUND) - ROUND;
                *d = (q as i32 + 128) as u8;
            }
        });
    };
    if threads > 1 && rows >= 64 {
        a.par_chunks_exact_mut(lda)
            .zip(x.par_chunks_exact(inp))
            .zip(scales.par_iter_mut())
            .for_each(one);
    } else {
        a.chunks_exact_mut(lda)
            .zip(x.chunks_exact(inp))
            .zip(scales.iter_mut())
            .for_each(one);
    }
    (a, scales)
}

/// The integer kernel this CPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Vnni,
}

type Acc = [[[i32; LANES]; TILE_BLOCKS]; TILE_ROWS];

/// What one register tile multiplies: rows `r0..r0 + nr` of the activation
/// codes `a` (`lda` bytes a row, in the form [`Kernel::prepare`] gave)
/// with blocks `b0..b0 + nb` of a layer's `packed` weights (`k4` steps a
/// block); `shift` is the layer's `128 · Σ w` per output, which the AVX2
/// kernel needs (see [`avx2`]).
#[derive(Clone, Copy)]
struct Tile<'a> {
    a: &'a [u8],
    lda: usize,
    r0: usize,
    nr: usize,
    packed: &'a [i8],
    k4: usize,
    b0: usize,
    nb: usize,
    shift: &'a [i32],
}

/// Every kernel, fastest first.
const KERNELS: &[Kernel] = &[
    #[cfg(target_arch = "x86_64")]
    Kernel::Vnni,
    #[cfg(target_arch = "x86_64")]
    Kernel::Avx2,
    Kernel::Portable,
];

impl Kernel {
    /// Whether this CPU has the instructions the kernel needs.
    fn runs_here(self) -> bool {
        match self {
            Self::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
            #[cfg(target_arch = "x86_64")]
            Self::Vnni => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512vnni")
            }
        }
    }

    /// The fastest kernel this CPU runs.
    fn detect() -> Self {
        KERNELS
            .iter()
            .copied()
            .find(|k| k.runs_here())
            .unwrap_or(Self::Portable)
    }

    /// The activation codes (`rows × lda`, from [`quantize_rows`]) in the
    /// form this kernel reads: the same bytes for all but AVX2, which takes
    /// each step's `|q|` and `q` side by side (see [`avx2::prepare`]).
    fn prepare(self, a: &[u8]) -> std::borrow::Cow<'_, [u8]> {
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => std::borrow::Cow::Owned(avx2::prepare(a)),
            _ => std::borrow::Cow::Borrowed(a),
        }
    }

    /// Every kernel this CPU can run, the portable one first (tests compare
    /// them all).
    #[cfg(test)]
    fn available() -> Vec<Self> {
        KERNELS
            .iter()
            .rev()
            .copied()
            .filter(|k| k.runs_here())
            .collect()
    }

    /// The tile's sums into `acc[..nr][..nb]`.
    #[inline(always)]
    fn tile(self, t: &Tile<'_>, acc: &mut Acc) {
        let (a, lda, r0, nr, packed, k4, b0, nb, shift) =
            (t.a, t.lda, t.r0, t.nr, t.packed, t.k4, t.b0, t.nb, t.shift);
        assert!((1..=TILE_ROWS).contains(&nr) && (1..=TILE_BLOCKS).contains(&nb));
        assert!(
            shift.len() >= (b0 + nb) * LANES,
            "tile: shift out of bounds"
        );
        assert!(
            lda >= k4 * GROUP && (r0 + nr) * lda <= a.len(),
            "tile: rows out of bounds"
        );
        assert!(
            (b0 + nb) * k4 * LANES * GROUP <= packed.len(),
            "tile: blocks out of bounds"
        );
        match self {
            Self::Portable => portable(t, acc),
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => avx2::tile(t, acc),
            #[cfg(target_arch = "x86_64")]
            Self::Vnni => vnni::tile(t, acc),
        }
    }
}

/// The kernel for CPUs with neither VNNI nor AVX2, and the reference the
/// tests hold the others to: the same sums, written (like the other
/// kernels' stores) over `acc[..nr][..nb]`, never added to what is there.
/// Each product `u8 × i8` fits an `i16` (255 · 127 < 2^15). Exact, but
/// several times slower than `f32` (see [`QDense::fast_on_this_cpu`]).
fn portable(t: &Tile<'_>, acc: &mut Acc) {
    let (a, lda, r0, nr, packed, k4, b0, nb) = (t.a, t.lda, t.r0, t.nr, t.packed, t.k4, t.b0, t.nb);
    let step = LANES * GROUP;
    pulp::Arch::new().dispatch(|| {
        for (r, acc_r) in acc.iter_mut().enumerate().take(nr) {
            let row = &a[(r0 + r) * lda..(r0 + r) * lda + k4 * GROUP];
            for (j, acc_rj) in acc_r.iter_mut().enumerate().take(nb) {
                let blk = &packed[(b0 + j) * k4 * step..(b0 + j + 1) * k4 * step];
                let mut sums = [0i32; LANES];
                for (w, av) in blk.chunks_exact(step).zip(row.chunks_exact(GROUP)) {
                    let av = [
                        i16::from(av[0]),
                        i16::from(av[1]),
                        i16::from(av[2]),
                        i16::from(av[3]),
                    ];
                    for (sum, w) in sums.iter_mut().zip(w.chunks_exact(GROUP)) {
                        let p0 =
                            i32::from(av[0] * i16::from(w[0])) + i32::from(av[1] * i16::from(w[1]));
                        let p1 =
                            i32::from(av[2] * i16::from(w[2])) + i32::from(av[3] * i16::from(w[3]));
                        *sum += p0 + p1;
                    }
                }
                *acc_rj = sums;
            }
        }
    });
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Acc, GROUP, LANES, TILE_ROWS, Tile};
    use std::arch::x86_64::{
        __m256i, _mm256_add_epi32, _mm256_loadu_si256, _mm256_madd_epi16, _mm256_maddubs_epi16,
        _mm256_set1_epi16, _mm256_set1_epi32, _mm256_setzero_si256, _mm256_sign_epi8,
        _mm256_storeu_si256,
    };

    /// [`super::portable`] with AVX2, which has no `u8 × i8` dot product
    /// into `i32`. `vpmaddubsw` multiplies `u8 × i8` and adds pairs into
    /// `i16` with saturation, and `255 · 127 · 2` would saturate; so the
    /// code `q + 128` is turned back into `q` (a sign-bit flip), and each
    /// pair is `|q| × (w · sign q)`: at most `2 · 127 · 127 < 2^15`, exact.
    /// `vpmaddwd` by ones widens the pairs to `i32`. That gives `Σ q · w`;
    /// the other kernels' `Σ (q + 128) · w` is `128 · Σ w` more, which the
    /// kernel adds from the tile's `shift`.
    ///
    /// One block (16 outputs, two 256-bit halves) at a time, for up to 4
    /// rows: 8 accumulators, within AVX2's 16 registers. `a` is the codes
    /// as [`prepare`] lays them out, `2 · lda` bytes a row.
    #[expect(
        unsafe_code,
        reason = "calls the AVX2 kernel, which `Kernel::detect` found on this CPU"
    )]
    pub(super) fn tile(t: &Tile<'_>, acc: &mut Acc) {
        assert!(
            (t.r0 + t.nr) * 2 * t.lda <= t.a.len(),
            "tile: rows out of bounds"
        );
        for j in 0..t.nb {
            // SAFETY: `Kernel::Avx2` is only chosen when the CPU has avx2;
            // the bounds were checked by `Kernel::tile`.
            unsafe {
                match t.nr {
                    4 => kernel::<4>(t, j, acc),
                    3 => kernel::<3>(t, j, acc),
                    2 => kernel::<2>(t, j, acc),
                    _ => kernel::<1>(t, j, acc),
                }
            }
        }
    }

    /// Each row's codes `q + 128` as, step by step, the four `|q|` then
    /// the four `q` (a sign-bit flip): worked out once per row here rather
    /// than once per block in the kernel's inner loop.
    pub(super) fn prepare(a: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; 2 * a.len()];
        for (dst, src) in out.chunks_exact_mut(2 * GROUP).zip(a.chunks_exact(GROUP)) {
            for (g, &code) in src.iter().enumerate() {
                let q = (code ^ 0x80) as i8;
                dst[g] = q.unsigned_abs();
                dst[GROUP + g] = q as u8;
            }
        }
        out
    }

    /// Rows `r0..r0 + R` against block `blk`, into `acc[..R][j]`.
    ///
    /// # Safety
    /// The CPU has avx2; rows `r0..r0 + R` of `a` (each `2 · lda ≥ 8·k4`
    /// bytes, from [`prepare`]) and block `blk` of `packed` are in bounds.
    #[target_feature(enable = "avx2")]
    #[expect(
        unsafe_code,
        reason = "raw loads and stores of 32-byte vectors, bounds checked by the caller"
    )]
    unsafe fn kernel<const R: usize>(t: &Tile<'_>, j: usize, acc: &mut Acc) {
        const { assert!(R <= TILE_ROWS) };
        let (a, lda, r0, packed, k4) = (t.a, t.lda, t.r0, t.packed, t.k4);
        let blk = t.b0 + j;
        let shift = &t.shift[blk * LANES..(blk + 1) * LANES];
        let step = LANES * GROUP;
        let ones = _mm256_set1_epi16(1);
        let mut sums = [[_mm256_setzero_si256(); 2]; R];
        let w = packed.as_ptr().wrapping_add(blk * k4 * step);
        let x = a.as_ptr();
        for kk in 0..k4 {
            // SAFETY: step kk < k4 of block `blk` is in bounds (64 bytes).
            let wv = unsafe {
                [
                    _mm256_loadu_si256(w.add(kk * step).cast::<__m256i>()),
                    _mm256_loadu_si256(w.add(kk * step + 32).cast::<__m256i>()),
                ]
            };
            for (r, sums_r) in sums.iter_mut().enumerate() {
                // SAFETY: row r0 + r is in bounds and holds at least 8·k4 bytes.
                let (mag, q) = unsafe {
                    let at = x.add((r0 + r) * 2 * lda + kk * 2 * GROUP);
                    (
                        _mm256_set1_epi32(at.cast::<i32>().read_unaligned()),
                        _mm256_set1_epi32(at.add(GROUP).cast::<i32>().read_unaligned()),
                    )
                };
                for (s, &v) in sums_r.iter_mut().zip(&wv) {
                    let pairs = _mm256_maddubs_epi16(mag, _mm256_sign_epi8(v, q));
                    *s = _mm256_add_epi32(*s, _mm256_madd_epi16(pairs, ones));
                }
            }
        }
        // SAFETY: `shift` holds this block's 16 outputs (checked by `tile`).
        let offset = unsafe {
            [
                _mm256_loadu_si256(shift.as_ptr().cast::<__m256i>()),
                _mm256_loadu_si256(shift.as_ptr().add(8).cast::<__m256i>()),
            ]
        };
        for (sums_r, acc_r) in sums.iter().zip(acc.iter_mut()) {
            for (h, (s, &o)) in sums_r.iter().zip(&offset).enumerate() {
                // Σ (q + 128) · w = Σ q · w + 128 · Σ w.
                let total = _mm256_add_epi32(*s, o);
                // SAFETY: `acc_r[j][8h..8h + 8]` is 8 i32, the 32 bytes stored.
                unsafe {
                    _mm256_storeu_si256(acc_r[j][8 * h..].as_mut_ptr().cast::<__m256i>(), total);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::{Acc, GROUP, LANES, TILE_BLOCKS, TILE_ROWS, Tile};
    use std::arch::x86_64::{
        __m512i, _mm512_dpbusd_epi32, _mm512_loadu_si512, _mm512_set1_epi32, _mm512_setzero_si512,
        _mm512_storeu_si512,
    };

    /// [`super::portable`] with `vpdpbusd`, in register tiles of up to
    /// 4 rows × 4 blocks.
    #[expect(
        unsafe_code,
        reason = "calls the AVX-512 VNNI kernel, which `Kernel::detect` found on this CPU"
    )]
    pub(super) fn tile(t: &Tile<'_>, acc: &mut Acc) {
        let (a, lda, r0, nr, packed, k4, b0, nb) =
            (t.a, t.lda, t.r0, t.nr, t.packed, t.k4, t.b0, t.nb);
        // SAFETY: `Kernel::Vnni` is only chosen when the CPU has avx512f and
        // avx512vnni; the bounds were checked by `Kernel::tile`.
        unsafe {
            match (nr, nb) {
                (4, 4) => kernel::<4, 4>(a, lda, r0, packed, k4, b0, acc),
                (4, 3) => kernel::<4, 3>(a, lda, r0, packed, k4, b0, acc),
                (4, 2) => kernel::<4, 2>(a, lda, r0, packed, k4, b0, acc),
                (4, _) => kernel::<4, 1>(a, lda, r0, packed, k4, b0, acc),
                (3, 4) => kernel::<3, 4>(a, lda, r0, packed, k4, b0, acc),
                (3, 3) => kernel::<3, 3>(a, lda, r0, packed, k4, b0, acc),
                (3, 2) => kernel::<3, 2>(a, lda, r0, packed, k4, b0, acc),
                (3, _) => kernel::<3, 1>(a, lda, r0, packed, k4, b0, acc),
                (2, 4) => kernel::<2, 4>(a, lda, r0, packed, k4, b0, acc),
                (2, 3) => kernel::<2, 3>(a, lda, r0, packed, k4, b0, acc),
                (2, 2) => kernel::<2, 2>(a, lda, r0, packed, k4, b0, acc),
                (2, _) => kernel::<2, 1>(a, lda, r0, packed, k4, b0, acc),
                (_, 4) => kernel::<1, 4>(a, lda, r0, packed, k4, b0, acc),
                (_, 3) => kernel::<1, 3>(a, lda, r0, packed, k4, b0, acc),
                (_, 2) => kernel::<1, 2>(a, lda, r0, packed, k4, b0, acc),
                (_, _) => kernel::<1, 1>(a, lda, r0, packed, k4, b0, acc),
            }
        }
    }

    /// # Safety
    /// The CPU has avx512f and avx512vnni; rows `r0..r0 + R` of `a` (each
    /// `lda ≥ 4·k4` bytes) and blocks `b0..b0 + B` of `packed` are in bounds.
    #[target_feature(enable = "avx512f,avx512vnni")]
    #[expect(
        unsafe_code,
        reason = "raw loads and stores of 64-byte vectors, bounds checked by the caller"
    )]
    unsafe fn kernel<const R: usize, const B: usize>(
        a: &[u8],
        lda: usize,
        r0: usize,
        packed: &[i8],
        k4: usize,
        b0: usize,
        acc: &mut Acc,
    ) {
        const { assert!(R <= TILE_ROWS && B <= TILE_BLOCKS) };
        let step = LANES * GROUP;
        let mut sums = [[_mm512_setzero_si512(); B]; R];
        let w = packed.as_ptr();
        let x = a.as_ptr();
        for kk in 0..k4 {
            let mut wv = [_mm512_setzero_si512(); B];
            for (j, v) in wv.iter_mut().enumerate() {
                // SAFETY: block b0 + j < b0 + B is in bounds, and so is its step kk < k4.
                *v = unsafe {
                    _mm512_loadu_si512(w.add(((b0 + j) * k4 + kk) * step).cast::<__m512i>())
                };
            }
            for (r, sums_r) in sums.iter_mut().enumerate() {
                // SAFETY: row r0 + r is in bounds and holds at least 4·k4 bytes.
                let four = unsafe {
                    x.add((r0 + r) * lda + kk * GROUP)
                        .cast::<i32>()
                        .read_unaligned()
                };
                let av = _mm512_set1_epi32(four);
                for (s, &v) in sums_r.iter_mut().zip(&wv) {
                    *s = _mm512_dpbusd_epi32(*s, av, v);
                }
            }
        }
        for (sums_r, acc_r) in sums.iter().zip(acc.iter_mut()) {
            for (s, dst) in sums_r.iter().zip(acc_r.iter_mut()) {
                // SAFETY: `dst` is 16 i32, the 64 bytes stored.
                unsafe { _mm512_storeu_si512(dst.as_mut_ptr().cast::<__m512i>(), *s) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32, spread: f32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                ((s >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * spread
            })
            .collect()
    }

    fn reference(x: &[f32], w: &[f32], b: &[f32], rows: usize, inp: usize, out: usize) -> Vec<f32> {
        let mut y = vec![0f32; rows * out];
        for r in 0..rows {
            for c in 0..out {
                y[r * out + c] = b[c]
                    + (0..inp)
                        .map(|k| x[r * inp + k] * w[k * out + c])
                        .sum::<f32>();
            }
        }
        y
    }

    #[test]
    fn the_int8_product_is_close_to_the_f32_product() {
        // Sizes off every tile edge: 7 rows, 45 inputs (not a multiple of 4),
        // 83 outputs (5 blocks + 3).
        for (rows, inp, out) in [(7, 45, 83), (1, 768, 64), (33, 64, 16), (20, 64, 768)] {
            let x = data(rows * inp, 1, 4.0);
            let w = data(inp * out, 2, 0.2);
            let b = data(out, 3, 1.0);
            let want = reference(&x, &w, &b, rows, inp, out);
            let q = QDense::quantize(&w, &b, inp, out);
            // More threads than groups, and counts that do not divide them;
            // the portable kernel too where the CPU has VNNI (a portable
            // kernel that added to the last tile's sums gave noise on CPUs
            // without it, and no test on a VNNI machine saw it).
            for (threads, kernel) in [1, 2, 3, 5, 8, 16]
                .into_iter()
                .flat_map(|t| Kernel::available().into_iter().map(move |k| (t, k)))
            {
                let got = q.forward_with(kernel, &x, rows, threads);
                let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (g, w) in got.iter().zip(&want) {
                    // Two 8-bit roundings, summed over `inp` terms of random sign.
                    assert!((g - w).abs() <= 0.02 * scale, "{g} vs {w} (scale {scale})");
                }
            }
        }
    }

    #[test]
    fn every_kernel_gives_the_same_integer_sums() {
        let (rows, inp, out) = (9, 70, 100);
        let x = data(rows * inp, 4, 2.0);
        let w = data(inp * out, 5, 0.3);
        let q = QDense::quantize(&w, &vec![0.0; out], inp, out);
        let lda = q.k4 * GROUP;
        let (a, _) = quantize_rows(&x, rows, inp, lda, 1);
        let kernels = Kernel::available();
        assert!(kernels.contains(&Kernel::detect()));
        for (r0, nr) in [(0, 4), (4, 4), (8, 1), (5, 3), (2, 2)] {
            for (b0, nb) in [(0, 4), (4, 3), (6, 1), (1, 2)] {
                // Tiles are written over what the last one left, not added to it.
                let mut want = [[[7; LANES]; TILE_BLOCKS]; TILE_ROWS];
                let tile = Tile {
                    a: &a,
                    lda,
                    r0,
                    nr,
                    packed: &q.packed,
                    k4: q.k4,
                    b0,
                    nb,
                    shift: &q.shift,
                };
                Kernel::Portable.tile(&tile, &mut want);
                for &kernel in &kernels {
                    let mut got = [[[-3; LANES]; TILE_BLOCKS]; TILE_ROWS];
                    let a = kernel.prepare(&a);
                    kernel.tile(&Tile { a: &a, ..tile }, &mut got);
                    for (got_r, want_r) in got.iter().zip(&want).take(nr) {
                        assert_eq!(
                            got_r[..nb],
                            want_r[..nb],
                            "{kernel:?} at rows {r0}+{nr}, blocks {b0}+{nb}"
                        );
                    }
                }
                // And the portable sums are the plain dot products.
                for (r, want_r) in want.iter().enumerate().take(nr) {
                    for (j, want_rj) in want_r.iter().enumerate().take(nb) {
                        for (l, &sum) in want_rj.iter().enumerate() {
                            let c = (b0 + j) * LANES + l;
                            let direct: i32 = (0..lda)
                                .map(|k| {
                                    let wq = q.packed[((c / LANES * q.k4 + k / GROUP) * LANES + l)
                                        * GROUP
                                        + k % GROUP];
                                    i32::from(a[(r0 + r) * lda + k]) * i32::from(wq)
                                })
                                .sum();
                            assert_eq!(sum, direct);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn full_scale_codes_do_not_saturate() {
        // Every code at ±127 with every sign pattern, where a `u8 × i8`
        // pair sum (up to 2 · 255 · 127) would overflow `i16`: each kernel
        // gives the exact sums, so y = x · w to the last bit.
        let (rows, inp, out) = (4, 64, 32);
        let sign = |i: usize, p: usize| if (i >> p) & 1 == 0 { 1.0 } else { -1.0 };
        let x: Vec<f32> = (0..rows * inp).map(|i| sign(i, i % 3)).collect();
        let w: Vec<f32> = (0..inp * out).map(|i| sign(i, 1 + i % 4)).collect();
        let q = QDense::quantize(&w, &vec![0.0; out], inp, out);
        let want = reference(&x, &w, &vec![0.0; out], rows, inp, out);
        for kernel in Kernel::available() {
            let got = q.forward_with(kernel, &x, rows, 1);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-3, "{kernel:?}: {g} vs {w}");
            }
        }
    }

    #[test]
    fn zero_rows_and_zero_weights_give_the_bias() {
        let q = QDense::quantize(&[0.0; 8 * 20], &[0.5; 20], 8, 20);
        let y = q.forward(&data(3 * 8, 6, 1.0), 3, 1);
        assert!(y.iter().all(|&v| v == 0.5));
        let q = QDense::quantize(&data(8 * 20, 7, 1.0), &[0.25; 20], 8, 20);
        assert!(q.forward(&[0.0; 2 * 8], 2, 1).iter().all(|&v| v == 0.25));
    }
}
