//! KD losses against PyTorch: values and gradients from `scripts/reference/kd_losses.py`
//! (output committed as `tests/fixtures/kd_losses_torch.json`).

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use candle_core::{Device, Tensor, Var};
use retort_distill::Divergence;
use retort_distill::loss::{cross_entropy_sum, divergence_sum};

#[test]
fn losses_and_gradients_match_pytorch() {
    let text = include_str!("fixtures/kd_losses_torch.json");
    let fx: serde_json::Value = serde_json::from_str(text).unwrap();
    let mat = |k: &str| -> Tensor {
        let rows: Vec<Vec<f32>> = serde_json::from_value(fx[k].clone()).unwrap();
        Tensor::new(rows, &Device::Cpu).unwrap()
    };
    let (student, teacher) = (mat("student"), mat("teacher"));
    let targets: Vec<u32> = serde_json::from_value(fx["targets"].clone()).unwrap();
    let targets = Tensor::new(targets, &Device::Cpu).unwrap();
    let cases = fx["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 36);
    for c in cases {
        let div = Divergence::parse(c["loss"].as_str().unwrap()).unwrap();
        let t = c["temperature"].as_f64().unwrap();
        let alpha = c["alpha"].as_f64().unwrap();
        let s = Var::from_tensor(&student).unwrap();
        let kd = divergence_sum(s.as_tensor(), &teacher, div, t).unwrap();
        let ce = cross_entropy_sum(s.as_tensor(), &targets).unwrap();
        let total = ((&ce * (1.0 - alpha)).unwrap() + (&kd * alpha).unwrap()).unwrap();
        for (name, got) in [("kd", &kd), ("ce", &ce), ("total", &total)] {
            let got = got.to_scalar::<f32>().unwrap() as f64;
            let want = c[name].as_f64().unwrap();
            assert!(
                (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "{div} T={t} α={alpha} {name}: ours {got} torch {want}"
            );
        }
        let grad = total
            .backward()
            .unwrap()
            .get(s.as_tensor())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let want: Vec<Vec<f64>> = serde_json::from_value(c["grad"].clone()).unwrap();
        for (gr, wr) in grad.iter().zip(&want) {
            for (&g, &w) in gr.iter().zip(wr) {
                assert!(
                    (g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()),
                    "{div} T={t} α={alpha} grad: ours {g} torch {w}"
                );
            }
        }
    }
}
