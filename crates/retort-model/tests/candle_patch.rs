//! The vendored candle-core's changes (`vendor/candle-core/RETORT-PATCH.md`) against plain
//! definitions: a transposed 2-D view made contiguous holds every element where it belongs;
//! frozen (untracked) operands get no gradient while the tracked ones get the same as before.

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use candle_core::{Device, Tensor, Var};

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

#[test]
fn frozen_operands_get_no_gradient_and_tracked_ones_the_same() {
    let dev = Device::Cpu;
    let ints = |n: usize, seed: usize| -> Vec<f32> {
        (0..n).map(|i| ((i * 7 + seed) % 9) as f32 - 4.0).collect()
    };
    // y = (table[ids] · Wᵀ) · Aᵀ with table and W frozen, A trained; and the same with all
    // three trained: A's gradient is identical, the frozen ones are absent.
    let ids = Tensor::new(&[2u32, 0, 3, 3], &dev).unwrap();
    let up = Tensor::from_vec(ints(4 * 5, 3), (4, 5), &dev).unwrap();
    let run = |all: bool| {
        let table = Var::from_vec(ints(5 * 6, 1), (5, 6), &dev).unwrap();
        let w = Var::from_vec(ints(7 * 6, 2), (7, 6), &dev).unwrap();
        let a = Var::from_vec(ints(5 * 7, 4), (5, 7), &dev).unwrap();
        let (t, wt) = if all {
            (table.as_tensor().clone(), w.as_tensor().clone())
        } else {
            (table.as_tensor().detach(), w.as_tensor().detach())
        };
        let x = t.index_select(&ids, 0).unwrap(); // (4, 6)
        let h = x.matmul(&wt.t().unwrap()).unwrap(); // (4, 7)
        let y = h.matmul(&a.as_tensor().t().unwrap()).unwrap(); // (4, 5)
        let g = (y * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let ga = g.get(a.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        (ga, g.get(&t).is_some(), g.get(&wt).is_some())
    };
    let (ga_all, table_all, w_all) = run(true);
    let (ga_frozen, table_frozen, w_frozen) = run(false);
    assert_eq!(ga_all, ga_frozen);
    assert!(table_all && w_all, "trained operands get gradients");
    assert!(!table_frozen && !w_frozen, "frozen operands get none");
}
