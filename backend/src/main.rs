use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use tokenflow_backend::{
    api::{AppState, install_metrics, router},
    engine::{Engine, Limits},
    model::{Model, Size, init},
};

/// An OpenAI-compatible LLM server (the API vLLM serves) running a Llama-family model in candle.
#[derive(Parser)]
#[command(name = "tokenflow-backend", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write a model folder with random weights and a real (byte-level BPE) tokenizer.
    InitModel {
        #[arg(long, value_enum, default_value_t = Size::Tiny)]
        size: Size,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 7)]
        seed: u64,
    },
    /// Serve a model folder (config.json, *.safetensors, tokenizer.json).
    Serve {
        #[arg(long, env = "TOKENFLOW_BACKEND_MODEL")]
        model: PathBuf,
        #[arg(
            long,
            env = "TOKENFLOW_BACKEND_LISTEN",
            default_value = "127.0.0.1:8000"
        )]
        listen: SocketAddr,
        /// Sequences decoded together.
        #[arg(long, default_value_t = 16)]
        max_running: usize,
        /// Requests waiting for a slot before new ones get 429.
        #[arg(long, default_value_t = 64)]
        max_waiting: usize,
        /// Tokens per scheduler step (prefill + one per running sequence).
        #[arg(long, default_value_t = 2048)]
        token_budget: usize,
        /// Run on the first CUDA GPU (needs the `cuda` feature).
        #[arg(long)]
        cuda: bool,
        /// CPU threads for the model's matrix products (default: `RAYON_NUM_THREADS`, else
        /// candle's own choice, the physical cores).
        #[arg(long, env = "TOKENFLOW_BACKEND_THREADS", value_parser = clap::value_parser!(u16).range(1..))]
        threads: Option<u16>,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let r = match Cli::parse().cmd {
        Cmd::InitModel { size, out, seed } => {
            init(size, &out, seed).map(|()| eprintln!("model written to {}", out.display()))
        }
        Cmd::Serve {
            model,
            listen,
            max_running,
            max_waiting,
            token_budget,
            cuda,
            threads,
        } => {
            settle_cpu_threads(threads);
            serve(
                model,
                listen,
                Limits {
                    max_running,
                    max_waiting,
                    token_budget,
                },
                cuda,
            )
        }
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tokenflow-backend: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Fixes the model's CPU thread count once, before any thread starts.
///
/// candle asks for its thread count on every CPU matrix product, and unless `RAYON_NUM_THREADS`
/// is set that means reading and parsing `/proc/cpuinfo` each time (candle-core 0.11,
/// `utils::get_num_threads`): a perf profile of the compute-bound demo put a fifth of the
/// scheduler thread in `show_cpuinfo`, and on this 2-core machine the old and the new binary,
/// alternated, served 410–461 and 614–717 tokens/s (24 users on 8 slots; 64 on 64).
fn settle_cpu_threads(threads: Option<u16>) {
    // candle ignores a value that is not a positive number (and rereads /proc/cpuinfo then).
    let preset = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|n| n > 0);
    if threads.is_none() && preset {
        return;
    }
    let n = threads.map_or_else(candle_core::utils::get_num_threads, usize::from);
    // SAFETY: called from `main` before the scheduler thread, the tokio runtime or any other
    // thread exists, so nothing can read the environment concurrently.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    tracing::info!(threads = n, "model CPU threads");
}

fn serve(dir: PathBuf, listen: SocketAddr, limits: Limits, cuda: bool) -> anyhow::Result<()> {
    anyhow::ensure!(
        limits.max_running >= 1 && limits.token_budget >= 1,
        "--max-running and --token-budget must be ≥ 1"
    );
    let device = if cuda {
        candle_core::Device::new_cuda(0)?
    } else {
        candle_core::Device::Cpu
    };
    let model = Model::load(&dir, device)?;
    let metrics = install_metrics()?;
    let engine = Engine::start(Model::load(&dir, model.device.clone())?, limits);
    let state = AppState::new(engine, &model, Some(metrics));
    tracing::info!(model = %model.name, %listen, "serving");
    drop(model);
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let l = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| anyhow::anyhow!("listening on {listen}: {e} (use --listen)"))?;
        axum::serve(l, router(state))
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
        anyhow::Ok(())
    })
}
