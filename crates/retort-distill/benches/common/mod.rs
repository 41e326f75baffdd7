//! Command-line and statistics helpers shared by the bench binaries (each includes this module
//! with `mod common;` and uses what it needs).

#![allow(dead_code)] // not every bench binary uses every helper

/// The value after `name` on the command line.
pub fn arg_str(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1).cloned()
}

/// The number after `name` on the command line, else `default`.
pub fn arg(name: &str, default: usize) -> usize {
    arg_str(name)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The median of `x` (the upper one for an even count); NaN when `x` is empty (e.g. a bench
/// run for its warm-up step only).
pub fn median(mut x: Vec<f64>) -> f64 {
    x.sort_by(f64::total_cmp);
    x.get(x.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The repository's root and the SmolLM2 teacher and HealthBench training data the real-model
/// benches use; `None` (after saying how to fetch them) when they are not there.
pub fn smollm_and_healthbench()
-> Option<(std::path::PathBuf, std::path::PathBuf, std::path::PathBuf)> {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let model = root.join("assets/SmolLM2-135M-Instruct.Q4_1.gguf");
    let data = root.join("assets/data/healthbench/train.jsonl");
    if !model.exists() || !data.exists() {
        #[allow(clippy::print_stdout)]
        {
            println!("skipped: run scripts/fetch-assets and scripts/fetch-data healthbench");
        }
        return None;
    }
    Some((root, model, data))
}

/// The first `n` records of the JSONL file `data`: the copy written to `dir`, and the dataset.
pub fn first_records(
    data: &std::path::Path,
    n: usize,
    dir: &std::path::Path,
) -> (std::path::PathBuf, retort_data::Dataset) {
    let head: String = fs_err::read_to_string(data)
        .expect("the data file")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take(n)
        .map(|l| format!("{l}\n"))
        .collect();
    let small = dir.join("head.jsonl");
    fs_err::write(&small, head).expect("a temporary file");
    let ds = retort_data::dataset::read(&small, &Default::default()).expect("the records parse");
    (small, ds)
}
