//! CPU references for the shipped kernels: straightforward loops, written for
//! obviousness, with float sums accumulated in f64.

/// y = a * x + y.
pub fn saxpy(a: f32, x: &[f32], y: &[f32]) -> Vec<f32> {
    x.iter().zip(y).map(|(x, y)| a * x + y).collect()
}

/// a + b element by element.
pub fn add(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(a, b)| a + b).collect()
}

/// a * b element by element.
pub fn mul(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(a, b)| a * b).collect()
}

/// The sum of all elements (in f64), and the sum of their magnitudes, which
/// bounds the rounding error of any summation order.
pub fn reduce_sum(input: &[f32]) -> (f64, f64) {
    input.iter().fold((0.0, 0.0), |(s, m), &v| {
        (s + f64::from(v), m + f64::from(v).abs())
    })
}

/// c = a x b for row-major a (m x k) and b (k x n); also returns, per element,
/// the sum of |a_ik * b_kj|, which bounds its rounding error.
pub fn matmul(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> (Vec<f64>, Vec<f64>) {
    let mut c = vec![0.0f64; m * n];
    let mut mag = vec![0.0f64; m * n];
    for i in 0..m {
        for p in 0..k {
            let av = f64::from(a[i * k + p]);
            for j in 0..n {
                let prod = av * f64::from(b[p * n + j]);
                c[i * n + j] += prod;
                mag[i * n + j] += prod.abs();
            }
        }
    }
    (c, mag)
}

/// Exclusive prefix sum with wrapping addition.
pub fn prefix_sum(input: &[u32]) -> Vec<u32> {
    let mut run = 0u32;
    input
        .iter()
        .map(|&v| {
            let out = run;
            run = run.wrapping_add(v);
            out
        })
        .collect()
}

/// Histogram: bin i counts values with min(v / bin_width, num_bins - 1) == i.
pub fn histogram(values: &[u32], num_bins: u32, bin_width: u32) -> Vec<u32> {
    let mut bins = vec![0u32; num_bins as usize];
    let last = num_bins.saturating_sub(1);
    for &v in values {
        let bin = (v / bin_width.max(1)).min(last);
        bins[bin as usize] += 1;
    }
    bins
}

/// Copy: the output is the input.
pub fn copy(input: &[u32]) -> Vec<u32> {
    input.to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_cases() {
        assert_eq!(saxpy(2.0, &[1.0, 2.0], &[1.0, 1.0]), vec![3.0, 5.0]);
        assert_eq!(prefix_sum(&[1, 2, 3, u32::MAX]), vec![0, 1, 3, 6]);
        assert_eq!(histogram(&[0, 1, 5, 100], 3, 2), vec![2, 0, 2]);
        let (c, _) = matmul(&[1.0, 2.0, 3.0, 4.0], &[5.0, 6.0, 7.0, 8.0], 2, 2, 2);
        assert_eq!(c, vec![19.0, 22.0, 43.0, 50.0]);
        assert_eq!(reduce_sum(&[1.0, -2.0]).0, -1.0);
    }
}
