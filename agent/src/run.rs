//! The agent's main loop: one window per interval until the duration ends or a signal arrives;
//! the last (partial) window is flushed and the programs are detached on the way out.

use std::{
    io::Write,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use tokenflow_schema::TelemetryWindow;
use tokio::{
    signal::unix::{SignalKind, signal},
    time::{Instant, MissedTickBehavior, interval_at},
};

use crate::{
    backlog::BacklogReader,
    capture::{Capture, check_privileges},
    cli::Args,
    sink::{
        prometheus,
        redis::{RedisConfig, RedisSink},
    },
    window::{Snapshot, WindowBuilder},
};

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Every place a window goes.
struct Sinks {
    stdout: bool,
    redis: Option<RedisSink>,
    prometheus: Option<Arc<prometheus::Exporter>>,
}

impl Sinks {
    fn emit(&self, mut w: TelemetryWindow) -> Result<()> {
        if let Some(r) = &self.redis {
            w.sinks = r.stats.snapshot();
        }
        if let Some(p) = &self.prometheus {
            p.record(&w);
        }
        if self.stdout {
            // One write per window: serialised straight into stdout, the line buffer's 1 KiB
            // made a write(2) per kilobyte — about 190 a second on the benchmark's node.
            let mut line = serde_json::to_vec(&w)?;
            line.push(b'\n');
            let mut out = std::io::stdout().lock();
            out.write_all(&line)?;
            out.flush().context("writing a window to stdout")?;
        }
        if let Some(r) = &self.redis {
            r.send(w);
        }
        Ok(())
    }
}

pub async fn run(args: Args) -> Result<()> {
    check_privileges()?;
    let filter = args.filter()?;
    let metrics_addr = args.metrics_addr()?;
    let redis = args.redis_target()?.map(|target| {
        RedisSink::start(RedisConfig {
            target,
            node_id: args.node_id.clone(),
            retention: args.redis_retention,
            buffer: args.redis_buffer,
            latest_ttl: args.interval * 3,
        })
    });
    let exporter = match metrics_addr {
        Some(addr) => {
            let e = prometheus::install(addr).await?;
            tracing::info!(%addr, "serving Prometheus metrics at /metrics");
            Some(e)
        }
        None => None,
    };
    let sinks = Sinks {
        stdout: args.stdout(),
        redis,
        prometheus: exporter,
    };
    let mut gpu = crate::gpu::detect();
    let first = gpu.sample();
    match &first.reason {
        None => tracing::info!(devices = first.devices.len(), "GPU metrics from NVML"),
        Some(r) => tracing::info!("no GPU metrics: {r}"),
    }
    // sock_diag sees one namespace: the watched one when --netns names a path, else the agent's.
    let backlog_ns = args
        .netns
        .as_deref()
        .filter(|n| n.parse::<u32>().is_err())
        .map(std::path::Path::new);
    let mut backlog = BacklogReader::new(backlog_ns, &filter.ports)?;
    let mut capture = Capture::start(&filter, &args.btf, &args.uprobes, &args.spans)?;
    // Start-up read the kernel's BTF and every probed ELF file (tens of MB, all freed by now), and
    // glibc keeps freed heap resident: hand it back rather than carry it for the agent's life.
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free pages of the allocator's own heap to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
    tracing::info!(node = %args.node_id, interval = ?args.interval, ?filter, "capture attached");

    let mut builder = WindowBuilder::new(args.node_id.clone()).with_probes(
        args.uprobes
            .iter()
            .map(|u| {
                (
                    u.label.clone(),
                    format!("{}:{}", u.path.display(), u.symbol),
                )
            })
            .chain(args.spans.iter().map(|s| (s.label.clone(), s.target())))
            .collect(),
    );
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut tick = interval_at(Instant::now() + args.interval, args.interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let windows_wanted = args.duration.map(|d| windows_for(d, args.interval));
    let mut emitted = 0u64;
    let mut start_ms = unix_ms();

    loop {
        let signalled = tokio::select! {
            _ = tick.tick() => false,
            r = capture.drain_closed() => { r?; continue; }
            _ = sigint.recv() => true,
            _ = sigterm.recv() => true,
        };
        if signalled {
            tracing::info!("signal received: flushing the last window");
        }
        sinks.emit(close_window(
            &mut capture,
            &mut builder,
            gpu.as_mut(),
            &mut backlog,
            &mut start_ms,
        )?)?;
        emitted += 1;
        if signalled || windows_wanted.is_some_and(|n| emitted >= n) {
            break;
        }
    }
    // Detach first: the kernel programs must not outlive a slow sink.
    drop(capture);
    if let Some(r) = sinks.redis {
        r.close(Duration::from_millis(1500)).await;
    }
    tracing::info!(windows = emitted, "detached; bye");
    Ok(())
}

/// Number of whole intervals in `duration`, at least one.
pub fn windows_for(duration: Duration, interval: Duration) -> u64 {
    let n = duration.as_nanos().div_ceil(interval.as_nanos().max(1));
    (n as u64).max(1)
}

fn close_window(
    capture: &mut Capture,
    builder: &mut WindowBuilder,
    gpu: &mut dyn crate::gpu::GpuProvider,
    backlog: &mut BacklogReader,
    start_ms: &mut u64,
) -> Result<TelemetryWindow> {
    let k = capture.snapshot()?;
    let end = unix_ms();
    let w = builder.build(Snapshot {
        live: k.live,
        closed: k.closed,
        counters: k.counters,
        start_unix_ms: *start_ms,
        end_unix_ms: end,
        gpu: gpu.sample(),
        backlog: backlog.sample(),
        req_lat: k.req_lat,
        probe_lat: k.probe_lat,
        skipped_runs: k.skipped_runs,
    });
    *start_ms = end;
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_count_rounds_up() {
        let s = Duration::from_secs;
        assert_eq!(windows_for(s(5), s(1)), 5);
        assert_eq!(windows_for(Duration::from_millis(5500), s(1)), 6);
        assert_eq!(windows_for(Duration::from_millis(10), s(1)), 1);
    }
}
