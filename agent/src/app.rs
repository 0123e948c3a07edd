//! Command line and top-level wiring: capture -> correlate -> export.

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    config::{self, Settings, file::ContextPropagation},
    capture::{self, CaptureConfig, Probes, check, event::Event, ring::RingReader, tracefs},
    clock::{Clock, monotonic_ns},
    correlate::{CorrelateConfig, Correlator},
    discover::{
        cgroup,
        resource::ProcResources,
        select::{self, Selector},
    },
    export::{
        self,
        metrics::{MetricsExportConfig, spawn_metrics},
        prometheus::{PrometheusServer, PrometheusState},
    },
    metrics::collect::Collectors,
    telemetry::Counters,
};

#[derive(Parser, Debug)]
#[command(name = "tapwire", version, about = "Zero-code instrumentation: spans and metrics for the services in the cgroups you select, from eBPF tracepoints, exported as OTLP.")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Check that this node can run tapwire: kernel, privileges, tracefs, cgroup v2 and every hook.
    Check,
    /// Watch the selected services and export their spans.
    Run(RunArgs),
    /// Show the effective configuration (`--print`), with the same flags as `run`.
    Config(ConfigArgs),
}

/// `tapwire config`: show the configuration `tapwire run` would use with the same flags.
#[derive(clap::Args, Debug)]
pub struct ConfigArgs {
    /// Print every setting with its effective value and where it came from.
    #[arg(long)]
    pub print: bool,
    #[command(flatten)]
    pub run: RunArgs,
}

pub use crate::config::RunArgs;
pub use crate::export::ExporterChoice;

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let env = |name: &str| std::env::var(name).ok();
    let settings = match &cli.command {
        Command::Run(args) | Command::Config(ConfigArgs { run: args, .. }) => match config::resolve(args, &env) {
            Ok(s) => Some(s),
            Err(e) => {
                eprintln!("tapwire: {}", check::error_chain(&e));
                return ExitCode::FAILURE;
            }
        },
        Command::Check => None,
    };
    let log = settings.as_ref().map_or("info", |s| s.log.as_str());
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(log).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")))
        .init();
    match (cli.command, settings) {
        (Command::Config(c), Some(settings)) => {
            if !c.print {
                eprintln!("tapwire: `tapwire config` needs --print");
                return ExitCode::FAILURE;
            }
            print!("{}", config::render(&settings));
            ExitCode::SUCCESS
        }
        (Command::Check, _) | (_, None) => {
            let (lines, ok) = check::run();
            print!("{}", check::render(&lines, ok));
            if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }
        (Command::Run(_), Some(settings)) => {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("tapwire: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(run(settings)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tapwire: {}", check::error_chain(e.as_ref()));
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Attaches the propagation programs to the outermost selected cgroups (a program attached
/// there also runs in every cgroup below it); cgroups already done are skipped. Returns whether
/// propagation stays on: a kernel where a sockhash member misbehaves (see
/// [`capture::sockcheck`]) gets none, with one warning, and the watched traffic is left alone.
fn attach_propagation(probes: &mut Probes, ids: &HashMap<u64, PathBuf>) -> anyhow::Result<bool> {
    let dirs: HashSet<&PathBuf> = ids.values().collect();
    for dir in &dirs {
        if dir.ancestors().skip(1).any(|a| dirs.contains(&a.to_path_buf())) {
            continue;
        }
        match probes.attach_propagation(dir) {
            Ok(()) => {}
            Err(e @ capture::probes::CaptureError::PropagationUnsafe(_)) => {
                tracing::warn!("{e}; spans are still made and parented within each service");
                return Ok(false);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(true)
}

/// Logs what [`Probes::maintain_pins`] did: each removal, and each pin kept, once.
fn report_pins(reaped: capture::pin::Reaped, reported: &mut HashSet<PathBuf>) {
    for path in reaped.removed {
        tracing::info!(path = %path.display(), "removed the sockhash a stopped tapwire left pinned: no connection is left in it");
    }
    for (path, connections) in reaped.kept {
        if reported.insert(path.clone()) {
            tracing::info!(path = %path.display(), connections, "a stopped tapwire's sockhash still holds connections: kept until they close");
        }
    }
}

/// The kernel's form of the head sampler: (root 0 never | 1 always | 2 ratio, parent-based, T).
fn kernel_sampler((root, parent_based, threshold): (u32, u32, u64)) -> tapwire_common::SamplerParams {
    let threshold = match root {
        0 => tapwire_common::SAMPLE_NONE,
        1 => 0,
        _ => threshold,
    };
    tapwire_common::SamplerParams { threshold, parent_based, _pad: 0 }
}

async fn run(args: Settings) -> anyhow::Result<()> {
    if let Some(sentence) = capture::caps::effective().and_then(capture::caps::missing_required_error) {
        anyhow::bail!("{sentence}");
    }
    if let tracefs::TracefsState::Unavailable { reason } = tracefs::ensure() {
        anyhow::bail!("{reason}");
    }
    let mount = cgroup::cgroup2_mount().ok_or(cgroup::CgroupError::NoCgroup2)?;
    let counters = Arc::new(Counters::default());
    let process_env = |name: &str| std::env::var(name).ok();
    let otel = |name: &str| args.otel_var(&process_env, name);
    let explain = |e: export::ConfigError| anyhow::anyhow!(args.explain_otel_error(&process_env, &e.to_string()));
    // Kubernetes metadata of this node's pods, watched in the background (never waited for).
    let pods = crate::discover::k8s::start(&args.kubernetes, counters.clone()).await?;
    // A selection error names the cgroup and the fix: no context in front of that sentence.
    let mut selector = Selector::new(&args.selection, &mount, pods.clone())?;
    let export_config = export::ExportConfig::resolve(args.exporter, &otel).map_err(explain)?;
    let sampling = crate::sampling::SamplingConfig::resolve_with_file(&args.sampling_args, &process_env, &args.sampling.to_sampling())?;
    let sampler = crate::sampling::Sampler::new(sampling, counters.clone());
    sampler.log_settings();
    let exporter = export::spawn(export_config, counters.clone()).context("while starting the span exporter")?;
    let metrics_config = MetricsExportConfig::resolve(args.exporter, &otel).map_err(explain)?.with_prometheus_listen(args.prometheus_listen);
    let prometheus = Arc::new(PrometheusState::new());
    let mut prometheus_task = None;
    if let Some(addr) = metrics_config.prometheus {
        let server = PrometheusServer::bind(addr).await.context("while starting the Prometheus endpoint")?;
        tracing::info!(address = %server.local_addr(), "serving Prometheus metrics at /metrics");
        prometheus_task = Some(tokio::spawn(server.run(prometheus.clone())));
    }
    let metrics_exporter = spawn_metrics(metrics_config, counters.clone()).context("while starting the metrics exporter")?;
    let mut collectors = Collectors::new(counters.clone());
    let push_every = metrics_exporter.interval();
    let mut push = tokio::time::interval_at(tokio::time::Instant::now() + push_every, push_every);

    let mut probes = Probes::load(&CaptureConfig { payload_cap: args.payload_bytes })?;
    // Held until exit: the kernel counts per-program run time while it is open.
    let _run_time_stats = crate::metrics::ebpf::enable_run_time_stats();
    probes.attach_all()?;
    probes.set_sampler(kernel_sampler(sampler.kernel_params()))?;
    selector.sync(&mut probes)?;
    let mut ids = selector.cgroups().clone();
    let mut propagate = args.context_propagation == ContextPropagation::Headers;
    if propagate {
        propagate = attach_propagation(&mut probes, &ids)?;
    }
    let mut resources = ProcResources::new().with_context(pods, args.resource_attributes.clone());
    resources.set_cgroups(ids.clone());
    let mut reader = RingReader::new(probes.take_ring()?).context("while setting up the ring-buffer reader")?;
    let correlate_config = CorrelateConfig {
        route_patterns: args.routes.clone(),
        idle_timeout: args.idle_timeout,
        max_connections: args.max_connections,
        ..CorrelateConfig::default()
    };
    let mut correlator = Correlator::new(correlate_config, Clock::measure(), counters.clone());

    tracing::info!(
        cgroups = ids.len(),
        watched_directories = selector.watched(),
        hooks = capture::HOOKS.len(),
        "capture ready"
    );

    let mut sigterm = signal(SignalKind::terminate()).context("while installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("while installing the SIGINT handler")?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut events: Vec<Event> = Vec::with_capacity(1024);
    let mut spans = Vec::new();
    let mut last_prune = Instant::now();
    let mut reported_lost = 0u64;
    let mut pins_reported = HashSet::new();
    report_pins(probes.maintain_pins(), &mut pins_reported);
    let mut last_pin_check = Instant::now();

    loop {
        tokio::select! {
            r = reader.read_batch(&mut events, &counters, 1024) => {
                r.context("while reading the ring buffer")?;
                for event in events.drain(..) {
                    if !selector.admits(event.origin().pid, event.origin().cgroup_id) {
                        continue;
                    }
                    collectors.on_event(&event, &mut resources);
                    correlator.on_event(event, &mut resources, &mut spans);
                }
                for span in spans.drain(..) {
                    if let Some(pid) = select::otlp_export_sender(&span) {
                        selector.saw_otlp_export(pid);
                    }
                    collectors.on_span(&span);
                    if let Some(span) = sampler.apply(span) {
                        exporter.send(span);
                    }
                }
            }
            _ = push.tick(), if metrics_exporter.pushes() => {
                collectors.set_active_requests(&correlator.active_server_requests());
                collectors.set_connections(correlator.connections(), correlator.buffered_bytes());
                metrics_exporter.export(collectors.snapshot(&ids, &mut resources, exporter.queue_len()));
            }
            r = selector.tree_changed() => {
                r.context("while watching the cgroup tree")?;
                if selector.on_tree_change() {
                    ids = selector.cgroups().clone();
                    resources.set_cgroups(ids.clone());
                    if propagate {
                        propagate = attach_propagation(&mut probes, &ids)?;
                    }
                }
                selector.sync(&mut probes)?;
            }
            _ = tick.tick() => {
                if selector.tick() {
                    ids = selector.cgroups().clone();
                    resources.set_cgroups(ids.clone());
                    if propagate {
                        propagate = attach_propagation(&mut probes, &ids)?;
                    }
                }
                selector.sync(&mut probes)?;
                correlator.expire(monotonic_ns(), &mut resources, &mut spans);
                for span in spans.drain(..) {
                    collectors.on_span(&span);
                    if let Some(span) = sampler.apply(span) {
                        exporter.send(span);
                    }
                }
                if let Ok(k) = probes.kernel_counters() {
                    for (slot, value) in counters.kernel.iter().zip(k) {
                        slot.store(value, std::sync::atomic::Ordering::Relaxed);
                    }
                    let lost = k[tapwire_common::Counter::RingbufFull as usize];
                    counters.events_lost.store(lost, std::sync::atomic::Ordering::Relaxed);
                    if lost > reported_lost {
                        tracing::warn!(lost_since_last_report = lost - reported_lost, total = lost, "the ring buffer was full: events were lost");
                        reported_lost = lost;
                    }
                }
                collectors.set_program_stats(probes.program_stats());
                if prometheus_task.is_some() {
                    collectors.set_active_requests(&correlator.active_server_requests());
                    collectors.set_connections(correlator.connections(), correlator.buffered_bytes());
                    prometheus.update(collectors.snapshot(&ids, &mut resources, exporter.queue_len()));
                }
                if last_pin_check.elapsed() >= Duration::from_secs(5) {
                    report_pins(probes.maintain_pins(), &mut pins_reported);
                    last_pin_check = Instant::now();
                }
                if last_prune.elapsed() > Duration::from_secs(10) {
                    resources.prune();
                    selector.prune();
                    last_prune = Instant::now();
                }
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    tracing::info!("stopping: detaching probes and flushing spans");
    // Take what the kernel already queued, then detach everything before flushing.
    while let Ok(Ok(())) = tokio::time::timeout(Duration::from_millis(50), reader.read_batch(&mut events, &counters, 4096)).await {
        for event in events.drain(..) {
            collectors.on_event(&event, &mut resources);
            correlator.on_event(event, &mut resources, &mut spans);
        }
    }
    drop(reader);
    let left = probes.release_pin();
    if left > 0 {
        tracing::info!(
            connections = left,
            "propagated connections are still open: tapwire's sockhash stays pinned under {} with them, so they lose nothing; \
             the next tapwire on this node removes it once they have closed",
            capture::pin::DIR
        );
    }
    report_pins(probes.maintain_pins(), &mut pins_reported);
    drop(probes);
    for span in spans.drain(..) {
        collectors.on_span(&span);
        if let Some(span) = sampler.apply(span) {
            exporter.send(span);
        }
    }
    exporter.shutdown(Duration::from_secs(10)).await;
    // After the span exporter, so that the agent's own counters in the last snapshot are final.
    if metrics_exporter.pushes() {
        metrics_exporter.export(collectors.snapshot(&ids, &mut resources, 0));
    }
    metrics_exporter.shutdown(Duration::from_secs(5)).await;
    if let Some(task) = prometheus_task {
        task.abort();
    }
    let c = &counters;
    tracing::info!(
        events_read = Counters::get(&c.events_read),
        events_lost = Counters::get(&c.events_lost),
        spans_created = Counters::get(&c.spans_created),
        spans_sampled_out = Counters::get(&c.spans_sampled_out),
        spans_exported = Counters::get(&c.spans_exported),
        spans_failed = Counters::get(&c.spans_failed),
        spans_dropped = Counters::get(&c.spans_dropped),
        "stopped"
    );
    Ok(())
}
