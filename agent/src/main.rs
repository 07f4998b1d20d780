//! `tokenflow-agent`: see `tokenflow-agent --help`.

use tokenflow_agent::{cli::Args, run::run};
use tracing_subscriber::EnvFilter;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = match Args::load() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if args.gpu_check {
        // No privileges needed: show what NVML reports and stop.
        let w = tokenflow_agent::gpu::detect().sample();
        println!("{}", serde_json::to_string_pretty(&w).unwrap_or_default());
        return std::process::ExitCode::SUCCESS;
    }
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tokenflow-agent: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
