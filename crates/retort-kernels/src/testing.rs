//! Equivalence checks of a fused op against the plain composition it replaces: values, and the
//! gradients of `Σ out ⊙ R` (R fixed and random) with respect to every input.

use candle_core::{Tensor, Var};

/// Max |a − b| ≤ tol · (1 + max |b|).
pub fn assert_close(a: &Tensor, b: &Tensor, tol: f32) {
    assert_eq!(a.dims(), b.dims());
    let diff = max_abs_diff(a, b);
    let scale = max_abs_diff(b, &b.zeros_like().unwrap());
    assert!(
        diff <= tol * (1.0 + scale),
        "max abs diff {diff} (scale {scale}, tol {tol})"
    );
}

pub fn check_against_composition(
    inputs: &[Tensor],
    fused: impl Fn(&[Tensor]) -> candle_core::Result<Tensor>,
    composed: impl Fn(&[Tensor]) -> candle_core::Result<Tensor>,
    tol: f32,
) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let a = fused(&ts).unwrap();
    let b = composed(&ts).unwrap();
    assert_close(&a, &b, tol);
    let r = Tensor::randn(0f32, 1.0, a.shape(), a.device()).unwrap();
    let ga = (&a * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let gb = (&b * &r).unwrap().sum_all().unwrap().backward().unwrap();
    for (i, t) in ts.iter().enumerate() {
        let (x, y) = (ga.get(t), gb.get(t));
        match (x, y) {
            (Some(x), Some(y)) => assert_close(x, y, tol),
            (None, None) => {}
            _ => panic!("input {i}: gradient present in one version only"),
        }
    }
}

/// max |a − b| over all elements (f32).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b).and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>());
    d.expect("max_abs_diff of two f32 tensors of one shape")
}

/// A test marked `#[cfg_attr(not(retort_cpu_…), ignore = "this CPU has no …")]` runs only where
/// the build host had the feature; if the binary then runs on a CPU without it, fail loudly
/// rather than pass. Keep the reason starting with "this CPU": `.ci/run` counts the skips by it.
pub fn require(has: bool, what: &str) {
    assert!(
        has,
        "this test needs {what}: the build host had it, this CPU has not (rebuild the tests here)"
    );
}

/// `len` seeded values in [-1, 1) (an LCG; the GEMM tests' inputs).
pub fn uniform(len: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}
