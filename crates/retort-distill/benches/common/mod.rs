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

/// The median of `x` (the upper one for an even count); `x` must not be empty.
pub fn median(mut x: Vec<f64>) -> f64 {
    x.sort_by(f64::total_cmp);
    x[x.len() / 2]
}
