//! Where the CPU time of a measurement went: user + system time of the processes that
//! share the machine's cores during a delivery run (RabbitMQ, the sender, this tool with
//! its receiver), read from `/proc/<pid>/stat` before and after. On a 2-core machine the
//! ratio of two drain rates is mostly the ratio of these costs per message.

use std::time::Instant;

use serde::Serialize;

/// CPU time spent by one process during a measurement.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct CpuUse {
    pub process: String,
    /// CPU seconds (user + system) over the measurement.
    pub seconds: f64,
    /// Average number of cores it kept busy.
    pub cores: f64,
    /// CPU milliseconds per 1000 messages.
    pub ms_per_1000: f64,
}

/// A running measurement of some processes' CPU time.
pub struct CpuMeter {
    started: Instant,
    start: Vec<(String, u32, Option<u64>)>,
}

impl CpuMeter {
    /// Starts metering `procs` (name, pid); RabbitMQ and this process are added when found.
    pub fn start(procs: &[(&str, u32)]) -> Self {
        let mut all: Vec<(String, u32)> =
            procs.iter().map(|(n, p)| ((*n).to_owned(), *p)).collect();
        if let Some(pid) = rabbitmq_pid() {
            all.push(("rabbitmq".into(), pid));
        }
        all.push((
            "conduit-bench (publisher, receiver)".into(),
            std::process::id(),
        ));
        Self {
            started: Instant::now(),
            start: all
                .into_iter()
                .map(|(n, p)| {
                    let ticks = ticks(p);
                    (n, p, ticks)
                })
                .collect(),
        }
    }

    /// CPU used since [`CpuMeter::start`], per process, for `messages` messages.
    pub fn finish(&self, messages: usize) -> Vec<CpuUse> {
        let wall = self.started.elapsed().as_secs_f64();
        let hz = clock_ticks_per_second();
        self.start
            .iter()
            .filter_map(|(name, pid, before)| {
                let used = ticks(*pid)?.checked_sub((*before)?)?;
                let seconds = used as f64 / hz;
                Some(CpuUse {
                    process: name.clone(),
                    seconds,
                    cores: if wall > 0.0 { seconds / wall } else { 0.0 },
                    ms_per_1000: if messages > 0 {
                        seconds * 1e6 / messages as f64
                    } else {
                        0.0
                    },
                })
            })
            .collect()
    }
}

/// utime + stime of `pid`, in clock ticks.
fn ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_ticks(&stat)
}

fn parse_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) may contain spaces; the fields after it are fixed.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, utime field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// The RabbitMQ node on this machine (the Erlang VM whose command line names `rabbit`).
fn rabbitmq_pid() -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(entry.path().join("comm")).ok()?;
            if !comm.trim().starts_with("beam") {
                return None;
            }
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            String::from_utf8_lossy(&cmdline)
                .contains("rabbit")
                .then_some(pid)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_user_and_system_ticks() {
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 1 1 1";
        assert_eq!(parse_ticks(stat), Some(300));
    }

    #[test]
    fn meters_this_process() {
        let meter = CpuMeter::start(&[]);
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        let used = meter.finish(1000);
        assert!(used.iter().any(|u| u.process.starts_with("conduit-bench")));
    }
}
