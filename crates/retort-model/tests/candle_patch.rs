//! The vendored candle-core's changes (`vendor/candle-core/RETORT-PATCH.md`) against plain
//! definitions: a transposed 2-D view made contiguous holds every element where it belongs.

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use candle_core::{Device, Tensor};

#[test]
fn transposed_views_copy_to_the_right_places() {
    // Tile edges (32), a single row or column, a view with an offset (narrow) and one with a
    // row stride larger than its width.
    for (r, c) in [(33, 70), (64, 64), (1, 2000), (2000, 1), (45, 129)] {
        let base: Vec<f32> = (0..(r + 3) * (c + 5)).map(|i| i as f32).collect();
        let m = Tensor::from_vec(base, (r + 3, c + 5), &Device::Cpu).unwrap();
        let view = m.narrow(0, 2, r).unwrap().narrow(1, 4, c).unwrap(); // (r, c), offset
        let t = view.t().unwrap(); // (c, r), strides (1, c + 5)
        let got = t.contiguous().unwrap().to_vec2::<f32>().unwrap();
        for (j, row) in got.iter().enumerate() {
            for (i, &x) in row.iter().enumerate() {
                let want = ((i + 2) * (c + 5) + (j + 4)) as f32;
                assert_eq!(x, want, "({r}×{c})ᵀ at ({j}, {i})");
            }
        }
    }
}
