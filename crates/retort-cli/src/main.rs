//! `retort`: knowledge distillation of large language models, in one binary.
//!
//! clap arguments ([`cli`]) → one `commands/<verb>.rs` per subcommand → library calls. This crate
//! is the only place that prints or reads environment variables; data goes to stdout, logs and
//! progress to stderr.

#![forbid(unsafe_code)]
#![allow(clippy::print_stdout, clippy::print_stderr)]

/// `println!` that returns the write's `io::Result` instead of panicking: a closed stdout
/// (`retort eval … | head`) becomes a `BrokenPipe` error, which `main` ends quietly.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)
    }};
}

/// `print!` as [`outln!`] is `println!`.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        write!(std::io::stdout().lock(), $($arg)*)
    }};
}

mod cli;
mod commands;
mod progress;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    if let Err(e) = process_settings(args.global.threads) {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    init_logging(args.global.verbose, args.global.quiet);
    retort_kernels::runtime::configure_allocator(args.global.allocator);
    match commands::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // A closed stdout (e.g. `retort generate … | head`) is not an error.
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

fn init_logging(verbose: u8, quiet: bool) {
    use tracing_subscriber::EnvFilter;
    let default = match (quiet, verbose) {
        (true, _) => "warn",
        (false, 0) => "info",
        (false, 1) => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_env("RETORT_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

/// Settings read or set once, before any other thread exists:
/// - candle sizes its thread pools from `RAYON_NUM_THREADS` when they are first used, so
///   `--threads` becomes that variable;
/// - with `RUST_BACKTRACE=1`, candle captures a backtrace into every error it returns and prints
///   it with the message (a bad GGUF file would answer with dozens of frames); errors here carry
///   their own context and hints, so library backtraces are off unless `RUST_LIB_BACKTRACE` asks
///   for them (panics still print theirs under `RUST_BACKTRACE`);
/// - the kernel switches `RETORT_AMX` and `RETORT_Q8_KERNEL` ([`retort_kernels::cpu`]).
fn process_settings(threads: Option<usize>) -> Result<(), String> {
    let mut vars = Vec::new();
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        vars.push(("RUST_LIB_BACKTRACE", "0".to_string()));
    }
    if let Some(n) = threads {
        vars.push(("RAYON_NUM_THREADS", n.to_string()));
    }
    retort_kernels::runtime::set_env_at_start(&vars)?;
    retort_kernels::cpu::set_switches(retort_kernels::cpu::Switches::from_env()?)
}
