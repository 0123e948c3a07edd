//! What each of tapwire's eBPF programs costs: run count and run time per program, as the kernel
//! counts them (`bpf_prog_info.run_cnt` / `run_time_ns`).
//!
//! The kernel only counts while run-time statistics are on. [`enable_run_time_stats`] turns them
//! on with `BPF_ENABLE_STATS` (the same switch as the `kernel.bpf_stats_enabled` sysctl, but held
//! by a file descriptor: the kernel turns it off again when the last holder closes it, so nothing
//! is left changed when tapwire exits, even after `kill -9`). Counting adds two clock reads per
//! program run, for every eBPF program on the host while it is on.
//!
//! | metric | unit | attributes |
//! | --- | --- | --- |
//! | `tapwire.agent.ebpf.program.runs` | `{run}` | `program` |
//! | `tapwire.agent.ebpf.program.run_time` | `s` | `program` |

use std::os::fd::OwnedFd;

use super::model::{Data, Metric, Number, NumberPoint};
use crate::{capture::probes::ProgramRunStats, model::Attributes};

/// Turns on the kernel's run-time statistics for as long as the returned descriptor is held.
/// None (with a warning) when the kernel refuses (before Linux 5.8, or without CAP_SYS_ADMIN):
/// the metrics then read 0 unless something else enabled the statistics.
pub fn enable_run_time_stats() -> Option<OwnedFd> {
    match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
        Ok(fd) => Some(fd),
        Err(e) => {
            tracing::warn!(error = %e, "cannot enable eBPF run-time statistics: per-program run counts and times stay at 0");
            None
        }
    }
}

/// The two cumulative counters, one point per program, since `start_unix_nano` (the agent's
/// start: its programs are loaded then).
pub fn program_metrics(stats: &[ProgramRunStats], start_unix_nano: u64, now_unix_nano: u64) -> Vec<Metric> {
    if stats.is_empty() {
        return Vec::new();
    }
    let point = |s: &ProgramRunStats, value: Number| {
        let mut attributes = Attributes::default();
        attributes.push("program", s.program.as_str());
        NumberPoint { attributes, start_unix_nano, time_unix_nano: now_unix_nano, value }
    };
    vec![
        Metric {
            name: "tapwire.agent.ebpf.program.runs".into(),
            description: "Times each of tapwire's eBPF programs ran (kernel run-time statistics).".into(),
            unit: "{run}".into(),
            data: Data::Sum {
                monotonic: true,
                points: stats
                    .iter()
                    .map(|s| point(s, Number::Int(i64::try_from(s.run_count).unwrap_or(i64::MAX))))
                    .collect(),
            },
        },
        Metric {
            name: "tapwire.agent.ebpf.program.run_time".into(),
            description: "Time spent running each of tapwire's eBPF programs (kernel run-time statistics).".into(),
            unit: "s".into(),
            data: Data::Sum {
                monotonic: true,
                points: stats.iter().map(|s| point(s, Number::Double(s.run_time.as_secs_f64()))).collect(),
            },
        },
    ]
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn one_point_per_program_with_its_counts() {
        let stats = vec![
            ProgramRunStats { program: "sys_enter_read".into(), run_count: 12, run_time: Duration::from_micros(1500) },
            ProgramRunStats { program: "sock_send_length".into(), run_count: 3, run_time: Duration::from_nanos(700) },
        ];
        let m = program_metrics(&stats, 5, 9);
        assert_eq!(m.len(), 2);
        assert_eq!((m[0].name.as_str(), m[0].unit.as_str()), ("tapwire.agent.ebpf.program.runs", "{run}"));
        assert_eq!((m[1].name.as_str(), m[1].unit.as_str()), ("tapwire.agent.ebpf.program.run_time", "s"));
        let values = |m: &Metric| -> Vec<(String, Number, u64, u64)> {
            let Data::Sum { monotonic: true, points } = &m.data else { panic!("a counter") };
            points
                .iter()
                .map(|p| (p.attributes.get("program").unwrap().to_string(), p.value, p.start_unix_nano, p.time_unix_nano))
                .collect()
        };
        assert_eq!(
            values(&m[0]),
            vec![("sys_enter_read".into(), Number::Int(12), 5, 9), ("sock_send_length".into(), Number::Int(3), 5, 9)]
        );
        assert_eq!(
            values(&m[1]),
            vec![
                ("sys_enter_read".into(), Number::Double(0.0015), 5, 9),
                ("sock_send_length".into(), Number::Double(7e-7), 5, 9)
            ]
        );
        assert!(program_metrics(&[], 5, 9).is_empty());
    }
}
