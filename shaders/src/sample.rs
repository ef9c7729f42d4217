//! Sample calls: random inputs for a kernel, and a checker that compares the
//! outputs of a call with the CPU reference.
//!
//! Tolerances are stated per kernel: integer kernels must match exactly;
//! float kernels may differ from the f64 reference by a relative error of the
//! magnitudes involved (see each constructor), which covers any summation
//! order and fused multiply-add.

use quasar_transport::{ElemType, Scalar};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::reference;

/// A seeded generator, so a failing case can be replayed.
pub fn seeded(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// An owned, typed host buffer.
#[derive(Debug, Clone, PartialEq)]
pub enum HostBuffer {
    /// f32 elements.
    F32(Vec<f32>),
    /// u32 elements.
    U32(Vec<u32>),
    /// i32 elements.
    I32(Vec<i32>),
}

impl HostBuffer {
    /// The element type.
    pub fn elem(&self) -> ElemType {
        match self {
            Self::F32(_) => ElemType::F32,
            Self::U32(_) => ElemType::U32,
            Self::I32(_) => ElemType::I32,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Self::F32(v) => v.len(),
            Self::U32(v) => v.len(),
            Self::I32(v) => v.len(),
        }
    }

    /// True if there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements' little-endian bytes (host order; every supported host is
    /// little-endian, as the protocol is).
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Self::F32(v) => bytemuck::cast_slice(v),
            Self::U32(v) => bytemuck::cast_slice(v),
            Self::I32(v) => bytemuck::cast_slice(v),
        }
    }
}

/// How a sample's output differs from the reference.
#[derive(Debug, Clone, PartialEq)]
pub struct Mismatch {
    /// The output buffer.
    pub buffer: String,
    /// What was wrong.
    pub detail: String,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "output `{}`: {}", self.buffer, self.detail)
    }
}

impl std::error::Error for Mismatch {}

/// What an output must be.
#[derive(Debug, Clone)]
enum Expected {
    /// Exactly these integers.
    Exact(HostBuffer),
    /// Within `tol[i]` of `values[i]`.
    Close { values: Vec<f64>, tol: Vec<f64> },
}

/// A call to a shipped kernel with random inputs, and its expected outputs.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Kernel name.
    pub kernel: &'static str,
    /// Scalar arguments.
    pub args: Vec<(String, Scalar)>,
    /// Input buffers, in the order they are sent.
    pub inputs: Vec<(String, HostBuffer)>,
    expected: Vec<(String, Expected)>,
}

/// Relative tolerance of elementwise float kernels, against the magnitudes
/// of the operands: a few ulps, which covers a fused multiply-add.
const ELEMENTWISE_REL: f64 = 1e-6;
/// Absolute floor of every float tolerance, for results near zero.
const ABS_FLOOR: f64 = 1e-6;

fn uniform_f32(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// Request payload bytes of [`Sample::for_kernel`] at `size`, computed
/// without generating anything, so callers can refuse sizes that could
/// never be sent before allocating them. `None` for a kernel not shipped.
pub fn request_bytes(kernel: &str, size: usize) -> Option<u64> {
    let n = size.max(1) as u64;
    Some(match kernel {
        "saxpy" | "add" | "mul" => 2 * n.saturating_mul(4),
        "matmul" => 2 * n.saturating_mul(n).saturating_mul(4),
        "reduce_sum" | "prefix_sum" | "histogram" | "copy" => n.saturating_mul(4),
        _ => return None,
    })
}

impl Sample {
    /// A sample for a shipped kernel at `size`: the element count of its main
    /// input, or for `matmul` the side of square matrices. `None` for a kernel
    /// that is not shipped.
    pub fn for_kernel(kernel: &str, size: usize, rng: &mut StdRng) -> Option<Self> {
        let size = size.max(1);
        Some(match kernel {
            "saxpy" => Self::saxpy(size, rng),
            "add" => Self::add(size, rng),
            "mul" => Self::mul(size, rng),
            "reduce_sum" => Self::reduce_sum(size, rng),
            "matmul" => Self::matmul(size, size, size, rng),
            "prefix_sum" => Self::prefix_sum(size, rng),
            "histogram" => Self::histogram(size, 64, 16, rng),
            "copy" => Self::copy(size, rng),
            _ => return None,
        })
    }

    /// saxpy of `n` elements; tolerance 1e-6 x (|a x| + |y|) + 1e-6.
    pub fn saxpy(n: usize, rng: &mut StdRng) -> Self {
        let a = rng.random_range(-4.0f32..4.0);
        let x = uniform_f32(rng, n);
        let y = uniform_f32(rng, n);
        let values = reference::saxpy(a, &x, &y);
        let tol = x
            .iter()
            .zip(&y)
            .map(|(x, y)| ELEMENTWISE_REL * f64::from((a * x).abs() + y.abs()) + ABS_FLOOR)
            .collect();
        Self {
            kernel: "saxpy",
            args: vec![("a".into(), Scalar::F32(a))],
            inputs: vec![
                ("x".into(), HostBuffer::F32(x)),
                ("y".into(), HostBuffer::F32(y)),
            ],
            expected: vec![(
                "y".into(),
                Expected::Close {
                    values: values.into_iter().map(f64::from).collect(),
                    tol,
                },
            )],
        }
    }

    /// Elementwise add of `n` elements; tolerance 1e-6 x (|a| + |b|) + 1e-6.
    pub fn add(n: usize, rng: &mut StdRng) -> Self {
        Self::binary("add", n, rng, reference::add, |a, b| a.abs() + b.abs())
    }

    /// Elementwise multiply of `n` elements; tolerance 1e-6 x |a b| + 1e-6.
    pub fn mul(n: usize, rng: &mut StdRng) -> Self {
        Self::binary("mul", n, rng, reference::mul, |a, b| (a * b).abs())
    }

    fn binary(
        kernel: &'static str,
        n: usize,
        rng: &mut StdRng,
        f: fn(&[f32], &[f32]) -> Vec<f32>,
        magnitude: fn(f32, f32) -> f32,
    ) -> Self {
        let a = uniform_f32(rng, n);
        let b = uniform_f32(rng, n);
        let values = f(&a, &b);
        let tol = a
            .iter()
            .zip(&b)
            .map(|(a, b)| ELEMENTWISE_REL * f64::from(magnitude(*a, *b)) + ABS_FLOOR)
            .collect();
        Self {
            kernel,
            args: Vec::new(),
            inputs: vec![
                ("a".into(), HostBuffer::F32(a)),
                ("b".into(), HostBuffer::F32(b)),
            ],
            expected: vec![(
                "out".into(),
                Expected::Close {
                    values: values.into_iter().map(f64::from).collect(),
                    tol,
                },
            )],
        }
    }

    /// Sum of `n` elements; tolerance 1e-4 x sum |x| + 1e-6, which bounds the
    /// f32 rounding of any summation order up to 2^26 elements.
    pub fn reduce_sum(n: usize, rng: &mut StdRng) -> Self {
        let input = uniform_f32(rng, n);
        let (sum, magnitude) = reference::reduce_sum(&input);
        Self {
            kernel: "reduce_sum",
            args: Vec::new(),
            inputs: vec![("input".into(), HostBuffer::F32(input))],
            expected: vec![(
                "sum".into(),
                Expected::Close {
                    values: vec![sum],
                    tol: vec![1e-4 * magnitude + ABS_FLOOR],
                },
            )],
        }
    }

    /// Matrix product of (m x k) by (k x n); tolerance (k x 2^-23 + 1e-6) x
    /// sum |a b| + 1e-6 per element.
    pub fn matmul(m: usize, n: usize, k: usize, rng: &mut StdRng) -> Self {
        let a = uniform_f32(rng, m * k);
        let b = uniform_f32(rng, k * n);
        let (values, magnitude) = reference::matmul(&a, &b, m, n, k);
        let rel = k as f64 * f64::from(f32::EPSILON) + 1e-6;
        let tol = magnitude.iter().map(|m| rel * m + ABS_FLOOR).collect();
        let dim = |v: usize| Scalar::U32(u32::try_from(v).unwrap_or(u32::MAX));
        Self {
            kernel: "matmul",
            args: vec![
                ("m".into(), dim(m)),
                ("n".into(), dim(n)),
                ("k".into(), dim(k)),
            ],
            inputs: vec![
                ("a".into(), HostBuffer::F32(a)),
                ("b".into(), HostBuffer::F32(b)),
            ],
            expected: vec![("c".into(), Expected::Close { values, tol })],
        }
    }

    /// Exclusive prefix sum of `n` random u32 (wrapping); exact.
    pub fn prefix_sum(n: usize, rng: &mut StdRng) -> Self {
        Self::of_random_u32s("prefix_sum", "output", n, rng, reference::prefix_sum)
    }

    /// Histogram of `n` values into `num_bins` bins of `bin_width`; about one
    /// value in ten lands past the last bin (and is counted in it); exact.
    pub fn histogram(n: usize, num_bins: u32, bin_width: u32, rng: &mut StdRng) -> Self {
        let span = u64::from(num_bins) * u64::from(bin_width);
        let top = u32::try_from(span + span / 10 + 1).unwrap_or(u32::MAX);
        let values: Vec<u32> = (0..n).map(|_| rng.random_range(0..top)).collect();
        let expected = reference::histogram(&values, num_bins, bin_width);
        Self {
            kernel: "histogram",
            args: vec![
                ("num_bins".into(), Scalar::U32(num_bins)),
                ("bin_width".into(), Scalar::U32(bin_width)),
            ],
            inputs: vec![("values".into(), HostBuffer::U32(values))],
            expected: vec![("bins".into(), Expected::Exact(HostBuffer::U32(expected)))],
        }
    }

    /// Copy of `n` random u32s; exact.
    pub fn copy(n: usize, rng: &mut StdRng) -> Self {
        Self::of_random_u32s("copy", "out", n, rng, reference::copy)
    }

    /// A kernel of one input `input` of `n` random u32s and no arguments,
    /// whose output `out` must equal `f(input)` exactly.
    fn of_random_u32s(
        kernel: &'static str,
        out: &str,
        n: usize,
        rng: &mut StdRng,
        f: fn(&[u32]) -> Vec<u32>,
    ) -> Self {
        let input: Vec<u32> = (0..n).map(|_| rng.random::<u32>()).collect();
        let expected = f(&input);
        Self {
            kernel,
            args: Vec::new(),
            inputs: vec![("input".into(), HostBuffer::U32(input))],
            expected: vec![(out.into(), Expected::Exact(HostBuffer::U32(expected)))],
        }
    }

    /// Bytes of input this sample sends.
    pub fn input_bytes(&self) -> usize {
        self.inputs.iter().map(|(_, b)| b.as_bytes().len()).sum()
    }

    /// Names of the outputs the reference checks.
    pub fn output_names(&self) -> impl Iterator<Item = &str> {
        self.expected.iter().map(|(n, _)| n.as_str())
    }

    /// Compares a call's outputs with the reference.
    ///
    /// # Errors
    /// The first [`Mismatch`]: a missing output, a wrong type or length, or
    /// the first element outside the tolerance.
    pub fn check(&self, outputs: &[(String, HostBuffer)]) -> Result<(), Mismatch> {
        for (name, expected) in &self.expected {
            let fail = |detail: String| Mismatch {
                buffer: name.clone(),
                detail,
            };
            let got = outputs
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, b)| b)
                .ok_or_else(|| fail("missing from the response".into()))?;
            match expected {
                Expected::Exact(want) => {
                    if got.elem() != want.elem() || got.len() != want.len() {
                        return Err(fail(format!(
                            "expected {} x {}, got {} x {}",
                            want.len(),
                            want.elem(),
                            got.len(),
                            got.elem()
                        )));
                    }
                    if got != want {
                        let (g, w) = (got.as_bytes(), want.as_bytes());
                        let i = g
                            .chunks(4)
                            .zip(w.chunks(4))
                            .position(|(a, b)| a != b)
                            .unwrap_or(0);
                        return Err(fail(format!("element {i} differs from the reference")));
                    }
                }
                Expected::Close { values, tol } => {
                    let HostBuffer::F32(got) = got else {
                        return Err(fail(format!("expected f32, got {}", got.elem())));
                    };
                    if got.len() != values.len() {
                        return Err(fail(format!(
                            "expected {} elements, got {}",
                            values.len(),
                            got.len()
                        )));
                    }
                    for (i, ((g, w), t)) in got.iter().zip(values).zip(tol).enumerate() {
                        let err = (f64::from(*g) - w).abs();
                        // A NaN result has no ordering and fails too.
                        let within = matches!(
                            err.partial_cmp(t),
                            Some(std::cmp::Ordering::Less | std::cmp::Ordering::Equal)
                        );
                        if !within {
                            return Err(fail(format!(
                                "element {i}: got {g}, reference {w}, error {err:e} > tolerance {t:e}"
                            )));
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outputs_from_reference(s: &Sample) -> Vec<(String, HostBuffer)> {
        s.expected
            .iter()
            .map(|(n, e)| {
                let b = match e {
                    Expected::Exact(b) => b.clone(),
                    Expected::Close { values, .. } => {
                        HostBuffer::F32(values.iter().map(|v| *v as f32).collect())
                    }
                };
                (n.clone(), b)
            })
            .collect()
    }

    #[test]
    fn checker_accepts_the_reference_and_rejects_changes() {
        let mut rng = seeded(7);
        for k in crate::SHIPPED {
            let s = Sample::for_kernel(k.name, 37, &mut rng).expect("sample");
            let mut out = outputs_from_reference(&s);
            s.check(&out).expect("reference must pass");
            match &mut out[0].1 {
                HostBuffer::F32(v) => v[0] += 1.0,
                HostBuffer::U32(v) => v[0] ^= 1,
                HostBuffer::I32(v) => v[0] ^= 1,
            }
            assert!(s.check(&out).is_err(), "{}: change not caught", k.name);
            out[0].0 = "other".into();
            assert!(
                s.check(&out).is_err(),
                "{}: missing output not caught",
                k.name
            );
        }
    }

    #[test]
    fn nan_fails() {
        let mut rng = seeded(3);
        let s = Sample::saxpy(4, &mut rng);
        let out = vec![("y".to_string(), HostBuffer::F32(vec![f32::NAN; 4]))];
        assert!(s.check(&out).is_err());
    }
}
