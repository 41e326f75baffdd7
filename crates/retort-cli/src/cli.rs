//! Command-line arguments. Doc comments are the `--help` text.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Knowledge distillation of LLMs: a frozen teacher writes data and trains a smaller student.
#[derive(Debug, Parser)]
#[command(name = "retort", version, about, long_about = None)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// More log output on stderr (-v debug, -vv trace). `RETORT_LOG` overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only warnings and errors on stderr; no progress bars.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// CPU threads for tensor work (default: all cores, or `RAYON_NUM_THREADS`).
    #[arg(long, global = true, value_name = "N")]
    pub threads: Option<usize>,
    /// `retain` (default): the allocator keeps freed memory for reuse instead of returning it
    /// to the OS, which made a KD training step ~1.4x faster (no page faults on every new
    /// tensor; see docs/performance-history.md) at the cost of a process that stays at its peak
    /// memory. `system`: glibc's defaults.
    #[arg(long, global = true, value_name = "MODE", default_value = "retain")]
    pub allocator: retort_kernels::runtime::AllocatorMode,
    /// Where tensors live: `cpu` (default), `cuda[:N]`, or `auto` (CUDA where this build and
    /// machine have it, else the CPU). This build runs on the CPU; training and KD from a logit
    /// cache are CPU-only and say so.
    #[arg(long, global = true, value_name = "DEVICE", default_value = "cpu")]
    pub device: retort_model::device::DeviceChoice,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show a model's configuration, parameter count and tokenizer.
    Info(InfoArgs),
    /// Chat with a model interactively, streaming its answers.
    Chat(ChatArgs),
    /// Generate completions for one prompt or a JSONL file of prompts (batched).
    Generate(GenerateArgs),
    /// Build a depth-pruned student from a teacher and save it as a Hugging Face directory.
    InitStudent(InitStudentArgs),
    /// Write a model (a trained student's `model/` directory, or any checkpoint) as a GGUF file
    /// that llama.cpp, Ollama and LM Studio run.
    ExportGguf(ExportGgufArgs),
    /// Train a student from a recipe: SFT, KD, or several stages (e.g. KD then SFT).
    Train(TrainArgs),
    /// Label a dataset with the teacher's top-k log-probs once, for KD runs that read the cache.
    Label(LabelArgs),
    /// Inspect, verify, compare and shrink logit caches.
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Inspect and validate datasets.
    #[command(subcommand)]
    Data(DataCommand),
    /// Synthetic data: expand seed examples with the teacher, filter, and answer (resumable).
    Synth(SynthArgs),
    /// Serve a local model over an OpenAI-compatible API (chat, streaming, logprobs, scoring).
    Serve(ServeArgs),
    /// Review synthetic data in the browser: accept, edit, reject, or write your own answers.
    Review(ReviewArgs),
    /// Write the reviewed data as training sets: stage 1, stage 2 and preference pairs (JSONL).
    Export(ExportArgs),
    /// Evaluate models on reference answers: NLL, perplexity, ROUGE-L, agreement with a teacher.
    Eval(EvalArgs),
    /// Before training: is KD likely to beat SFT for this data and teacher? Says why.
    Probe(ProbeArgs),
    /// Run a grid of train + eval cells (arms × sizes × seeds), resumable, with report and plots.
    Experiment(ExperimentArgs),
}

#[derive(Debug, Args)]
pub struct ExperimentArgs {
    /// An experiment TOML file (see experiments/README.md).
    #[arg(value_name = "EXPERIMENT")]
    pub experiment: PathBuf,
    /// Output directory (default: `runs/NAME`).
    #[arg(long, short = 'o', value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Only rebuild report.md and the plots from the finished cells.
    #[arg(long)]
    pub report_only: bool,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// A model to evaluate (GGUF or HF directory; weights dequantized to f32); repeat for a
    /// side-by-side table.
    /// `NAME=PATH` names the column (e.g. `sft=runs/sft/model`).
    #[arg(long, short = 'm', value_name = "[NAME=]PATH", required = true)]
    pub model: Vec<PathBuf>,
    /// Held-out data with reference answers (JSONL, JSON or Parquet; the last assistant turn is
    /// the reference).
    #[arg(long, value_name = "FILE")]
    pub data: PathBuf,
    /// Also compare with this teacher on the same tokens: KL, top-1 agreement, entropy.
    #[arg(long, value_name = "PATH")]
    pub teacher: Option<PathBuf>,
    /// Generate greedy answers for the first N records and score them with ROUGE-L (0: none).
    #[arg(long, default_value_t = 32, value_name = "N")]
    pub generate: usize,
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Tokens per conversation (longer ones are cut on the right, as in training).
    #[arg(long, default_value_t = 512)]
    pub max_len: usize,
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Products of every model (and the teacher): f32 (exact) or bf16 (f32 accumulation,
    /// weights packed once: about half the memory and several times faster on CPUs with
    /// AVX-512 BF16 or AMX; f32 elsewhere). Recorded in the JSON report.
    #[arg(long, default_value = "f32", value_name = "f32|bf16")]
    pub matmul: retort_kernels::MatmulPrecision,
    /// Write the reports as JSON here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// The teacher (GGUF or HF directory).
    #[arg(long, value_name = "PATH")]
    pub teacher: PathBuf,
    /// The student before training (e.g. from `retort init-student`).
    #[arg(long, value_name = "PATH")]
    pub student: PathBuf,
    /// Your training data with gold answers; a held-out slice of it is scored.
    #[arg(long, value_name = "FILE")]
    pub data: PathBuf,
    /// Records scored (spread evenly over the file).
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub holdout: usize,
    /// Training examples you will train on (default: the records of --data).
    #[arg(long, value_name = "N")]
    pub train_size: Option<usize>,
    #[arg(long, default_value_t = 512)]
    pub max_len: usize,
    /// Print the numbers and the verdict as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ReviewArgs {
    /// The synth ledger (`OUT/ledger.sqlite`) or the synth output directory holding it.
    #[arg(value_name = "PIPELINE_DB")]
    pub db: PathBuf,
    /// Address to bind. Anything but loopback requires the token printed at start.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Name recorded with every decision (default: `$USER`).
    #[arg(long, value_name = "NAME")]
    pub reviewer: Option<String>,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The synth ledger (`OUT/ledger.sqlite`) or the synth output directory holding it.
    #[arg(value_name = "PIPELINE_DB")]
    pub db: PathBuf,
    /// Directory for stage1.jsonl, stage2.jsonl, preferences.jsonl and export.json.
    #[arg(long, short = 'o', value_name = "DIR")]
    pub out: PathBuf,
    /// Also export every teacher answer nobody has decided on, as accepted (no reviewer).
    #[arg(long)]
    pub auto_accept: bool,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to bind; anything but loopback exposes the model to the network.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Name clients pass as `model` (default: the model's file or directory name).
    #[arg(long)]
    pub name: Option<String>,
    /// Most rows (requests × n) generated together.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub max_batch: u32,
    /// Rows admitted beyond those decoding, waiting for a slot; past that, requests get 503
    /// with `Retry-After`.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(0..=100_000))]
    pub max_queue: u32,
    /// Memory for the key/value caches, e.g. `4GiB` or `512MiB` (default: a quarter of the
    /// machine's RAM). Sets the context a request may use and how many rows decode together.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub kv_cache_memory: Option<u64>,
    /// Prompt tokens prefilled per decoding step while other requests decode.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub prefill_chunk: u32,
    /// Require `Authorization: Bearer <key>`, the key read from this environment variable.
    #[arg(long, value_name = "VAR")]
    pub api_key_env: Option<String>,
}

#[derive(Debug, Args)]
pub struct SynthArgs {
    /// A pipeline TOML file (see examples/stock-advisor/pipeline.toml).
    #[arg(value_name = "PIPELINE")]
    pub pipeline: PathBuf,
    /// Output directory (ledger.sqlite, synth.jsonl, report.md); overrides `[output] dir`.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Novel inputs wanted; overrides `[expand] target`.
    #[arg(long, value_name = "N")]
    pub target: Option<usize>,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// A recipe TOML file (see recipes/README.md).
    #[arg(value_name = "RECIPE")]
    pub recipe: PathBuf,
    /// Override a recipe field by dotted path, e.g. `--set train.batch_size=8 --set stages.0.lr=5e-5`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Run directory (checkpoints, metrics.jsonl, the final model in OUT/model).
    #[arg(long, short = 'o', value_name = "DIR")]
    pub out: PathBuf,
    /// Continue the run in OUT from its latest checkpoint (bit-identical to an uninterrupted run).
    #[arg(long)]
    pub resume: bool,
    /// Validate the recipe, data and shapes, print the plan and memory estimate, and exit.
    #[arg(long)]
    pub dry_run: bool,
    /// Stop (with a checkpoint) after this many optimizer steps in this invocation.
    #[arg(long, value_name = "N")]
    pub max_steps: Option<usize>,
}

#[derive(Debug, Args)]
pub struct LabelArgs {
    /// The teacher: a GGUF file or a Hugging Face directory (dequantized to f32), or an
    /// OpenAI-compatible server (`http://HOST/v1`).
    #[arg(long, value_name = "PATH")]
    pub teacher: PathBuf,
    /// The dataset whose assistant tokens are labelled (JSONL, JSON or Parquet).
    #[arg(long, value_name = "FILE")]
    pub data: PathBuf,
    /// Token ids and log-probs kept per position.
    #[arg(long, default_value_t = 64, value_name = "K")]
    pub top_k: usize,
    /// Labelling temperature; stored values are log_softmax(logits / T). Training re-tempers.
    #[arg(long, default_value_t = 1.0, value_name = "T")]
    pub temperature: f64,
    /// Move entries (after the first) whose probability is below P into the tail bucket:
    /// smaller caches for a measured, tiny loss of detail (docs/logit-cache.md). 0 keeps all k.
    #[arg(long, default_value_t = 0.0, value_name = "P")]
    pub min_prob: f64,
    /// The cache directory; an unfinished cache with the same settings is resumed.
    #[arg(long, short = 'o', value_name = "DIR")]
    pub out: PathBuf,
    /// Value encoding: q8 (compact; see docs/logit-cache.md) or f32 (reference).
    #[arg(long, default_value = "q8", value_name = "q8|f32")]
    pub codec: retort_distill::cache::Codec,
    /// Longest sequence; must equal the recipe's `train.max_len` for training to find samples.
    #[arg(long, default_value_t = 512, value_name = "TOKENS")]
    pub max_len: usize,
    /// What to do with longer conversations (as the recipe's `train.truncation`).
    #[arg(long, default_value = "right", value_name = "right|drop")]
    pub truncation: retort_distill::batch::Truncation,
    /// Sequences per teacher forward.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Products of a local teacher: f32 (exact) or bf16 (f32 accumulation, weights packed once;
    /// several times faster on CPUs with AVX-512 BF16 or AMX, f32 elsewhere). Recorded in the
    /// manifest; a cache resumes only with the same value.
    #[arg(long, default_value = "f32", value_name = "f32|bf16")]
    pub matmul: retort_kernels::MatmulPrecision,
    /// Samples per shard (the unit of resumption).
    #[arg(long, default_value_t = 64)]
    pub shard_samples: usize,
    /// Force the record shape instead of detecting it.
    #[arg(long, value_parser = ["messages", "alpaca", "sharegpt"])]
    pub format: Option<String>,
    /// Skip and count invalid records instead of stopping at the first.
    #[arg(long)]
    pub skip_invalid: bool,
    /// With `--teacher http://HOST/v1`: a local copy of the served model (or any model with the
    /// same tokenizer) whose tokenizer and chat template turn the data into token ids.
    #[arg(long, value_name = "PATH")]
    pub tokenizer: Option<PathBuf>,
    /// With an HTTP teacher: the served model name (default: the first the server lists).
    #[arg(long)]
    pub name: Option<String>,
    /// With an HTTP teacher: samples scored at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// With an HTTP teacher: environment variable holding the API key.
    #[arg(long, value_name = "VAR")]
    pub api_key_env: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Verify a cache (every shard's checksum) and print what it holds and its bytes per token.
    Inspect(CacheInspectArgs),
    /// Write a copy with fewer top-k entries per token or another codec, without the teacher.
    Recode(CacheRecodeArgs),
}

#[derive(Debug, Args)]
pub struct CacheInspectArgs {
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// Also measure KL(DIR‖OTHER) per token against another cache of the same data and k.
    #[arg(long, value_name = "OTHER")]
    pub against: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct CacheRecodeArgs {
    #[arg(value_name = "SRC")]
    pub src: PathBuf,
    /// Entries kept per token (at most the source's k).
    #[arg(long, value_name = "K")]
    pub top_k: usize,
    /// Also move entries (after the first) below this probability into the tail.
    #[arg(long, default_value_t = 0.0, value_name = "P")]
    pub min_prob: f64,
    #[arg(long, default_value = "q8", value_name = "q8|f32")]
    pub codec: retort_distill::cache::Codec,
    #[arg(long, short = 'o', value_name = "DIR")]
    pub out: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Validate a dataset and print record, turn and token statistics.
    Inspect(InspectArgs),
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// JSONL, JSON array or Parquet; OpenAI `messages`, Alpaca or ShareGPT records.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// Force the record shape instead of detecting it.
    #[arg(long, value_parser = ["messages", "alpaca", "sharegpt"])]
    pub format: Option<String>,
    /// Skip and count invalid records instead of stopping at the first.
    #[arg(long)]
    pub skip_invalid: bool,
    /// Tokenize with this model's tokenizer and chat template to count tokens and truncations.
    #[arg(long, short = 'm', value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// Truncation limit for the token statistics.
    #[arg(long, default_value_t = 512, value_name = "TOKENS")]
    pub max_len: usize,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// How weights are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Weights {
    /// Dequantized to f32: exact; the format for scoring and training.
    F32,
    /// Linear layers as Q8_0: ~3× faster token-by-token generation on CPU than f32, nearly the
    /// same outputs (Q8_0 rounding of each weight ≤ 1/254 of its block's range).
    #[default]
    Q8,
    /// Keep the file's own GGUF quantization for linear layers: least memory.
    Quantized,
}

#[derive(Debug, Args)]
pub struct ModelArgs {
    /// A GGUF file or a Hugging Face model directory (config.json + *.safetensors + tokenizer.json).
    #[arg(long, short = 'm', value_name = "PATH")]
    pub model: PathBuf,
    /// How to hold the weights in memory.
    #[arg(long, value_enum, default_value_t = Weights::Q8)]
    pub weights: Weights,
}

#[derive(Debug, Args)]
pub struct SamplingArgs {
    /// Maximum new tokens per answer.
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Repetition penalty on the last 64 tokens (1.0: off; llama.cpp uses 1.1): curbs the
    /// loops small models fall into.
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// Sampler seed (prompt i of a batch uses seed + i).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when the text contains this string (repeatable).
    #[arg(long = "stop", value_name = "TEXT")]
    pub stop: Vec<String>,
}

#[derive(Debug, Args)]
pub struct InfoArgs {
    #[command(flatten)]
    pub model: ModelArgs,
}

#[derive(Debug, Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// System prompt (default: the chat template's own, if any).
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["prompt", "prompts"])))]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// One user message to answer.
    #[arg(long)]
    pub prompt: Option<String>,
    /// JSONL file, one prompt per line: `{"prompt": "…"}` or `{"messages": [{"role": …, "content": …}, …]}`,
    /// with optional `"id"` and `"system"`.
    #[arg(long, value_name = "FILE")]
    pub prompts: Option<PathBuf>,
    /// System prompt for prompts that have none.
    #[arg(long)]
    pub system: Option<String>,
    /// Write the JSONL records here (atomically) instead of stdout.
    #[arg(long, short = 'o', value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Prompts decoded together in one forward pass per step.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("depth").required(true).args(["keep_layers", "num_layers"])))]
pub struct InitStudentArgs {
    /// The teacher: a GGUF file (dequantized to f32) or a Hugging Face directory.
    #[arg(long, value_name = "PATH")]
    pub teacher: PathBuf,
    /// Teacher layers to keep, comma-separated, e.g. `0,3,6,9`.
    #[arg(long, value_delimiter = ',', value_name = "I,J,…")]
    pub keep_layers: Option<Vec<usize>>,
    /// Keep this many layers, evenly spaced, always including the first and the last.
    #[arg(long, value_name = "N")]
    pub num_layers: Option<usize>,
    /// Output directory (Hugging Face format).
    #[arg(long, short = 'o', value_name = "DIR")]
    pub out: PathBuf,
    /// Replace `--out` if it exists.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct ExportGgufArgs {
    /// The model: a Hugging Face directory (e.g. `runs/NAME/model`, LoRA already merged) or a
    /// GGUF file (re-quantized).
    #[arg(value_name = "MODEL")]
    pub model: PathBuf,
    /// Type of the weight matrices: q8_0 (near-lossless, ~1 byte per weight), q4_0 (smallest),
    /// f16 or f32. Norms and biases stay f32.
    #[arg(long, default_value = "q8_0", value_name = "q8_0|q4_0|f16|f32")]
    pub quant: retort_model::gguf_write::GgufType,
    /// The GGUF file to write.
    #[arg(long, short = 'o', value_name = "FILE.gguf")]
    pub out: PathBuf,
    /// `general.name` in the file (default: the model directory's name).
    #[arg(long)]
    pub name: Option<String>,
    /// Replace `--out` if it exists.
    #[arg(long)]
    pub force: bool,
}

/// A byte size: a number with an optional unit (`B`, `KiB`, `MiB`, `GiB`, `TiB`, or `K`/`M`/`G`/`T`
/// and `KB`/`MB`/`GB`/`TB` as powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let x: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size; write e.g. 4GiB, 512MiB or 1073741824"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        u => {
            return Err(format!(
                "unknown unit `{u}` in `{s}`; use B, KiB, MiB, GiB or TiB"
            ));
        }
    };
    let bytes = x * scale as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes > (1u64 << 50) as f64 {
        return Err(format!("`{s}` is out of range (1 B to 1 PiB)"));
    }
    Ok(bytes as u64)
}
