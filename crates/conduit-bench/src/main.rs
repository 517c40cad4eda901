//! `conduit-bench full` measures everything and regenerates docs/benchmarks.md;
//! `conduit-bench smoke` runs the same code with tiny counts; `conduit-bench only PHASE...`
//! runs some phases at full size and prints their JSON without touching the docs.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use conduit_bench::{Mode, Options, Phase};

#[derive(Parser)]
#[command(about = "Conduit benchmarks against the machine's own baselines")]
struct Cli {
    #[command(subcommand)]
    mode: Cmd,
    /// Folder of the service binaries (default: target/release for full, target/debug for smoke).
    #[arg(long, global = true)]
    bin_dir: Option<PathBuf>,
    /// Where the JSON result goes.
    #[arg(long, global = true)]
    json: Option<PathBuf>,
    /// The Markdown file whose generated section is rewritten (full only).
    #[arg(long, global = true)]
    docs: Option<PathBuf>,
}

#[derive(Subcommand, Clone)]
enum Cmd {
    /// Every measurement at full size (a few minutes).
    Full,
    /// Tiny counts, seconds; for CI.
    Smoke,
    /// Rewrites the docs' generated part from the JSON result of an earlier run.
    Docs {
        /// The JSON result (default: target/conduit-bench/result.json).
        #[arg(long)]
        from: Option<PathBuf>,
    },
    /// Some phases at full size; writes no docs (JSON only where --json says).
    Only {
        #[arg(required = true, value_enum)]
        phases: Vec<Phase>,
        /// Events per second of the paced runs, instead of measuring the sustainable rate.
        #[arg(long)]
        pace: Option<f64>,
    },
}

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"));
    let options = match cli.mode {
        Cmd::Docs { from } => {
            let from = from.unwrap_or_else(|| target.join("conduit-bench/result.json"));
            let report: conduit_bench::Report = serde_json::from_slice(
                &std::fs::read(&from).with_context(|| format!("reading {}", from.display()))?,
            )
            .with_context(|| format!("parsing {}", from.display()))?;
            let docs = cli
                .docs
                .unwrap_or_else(|| workspace().join("docs/benchmarks.md"));
            conduit_bench::report::write_docs(&report, &docs)?;
            return Ok(());
        }
        Cmd::Only { mut phases, pace } => {
            phases.sort_unstable();
            phases.dedup();
            Options {
                mode: Mode::Full,
                bin_dir: cli.bin_dir.unwrap_or_else(|| target.join("release")),
                json: cli.json,
                docs: None,
                command: "conduit-bench only".into(),
                phases,
                pace,
            }
        }
        Cmd::Full => Options {
            mode: Mode::Full,
            bin_dir: cli.bin_dir.unwrap_or_else(|| target.join("release")),
            json: Some(
                cli.json
                    .unwrap_or_else(|| target.join("conduit-bench/result.json")),
            ),
            docs: Some(
                cli.docs
                    .unwrap_or_else(|| workspace().join("docs/benchmarks.md")),
            ),
            command: "./scripts/bench".into(),
            phases: Phase::ALL.to_vec(),
            pace: None,
        },
        Cmd::Smoke => Options {
            json: cli.json,
            docs: cli.docs,
            ..Options::smoke(cli.bin_dir.unwrap_or_else(|| target.join("debug")))
        },
    };
    let report = conduit_bench::run(options).await?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
