//! What one phase of the capacity bench cost: CPU time of the worker, of PostgreSQL (the postmaster and every
//! backend, live or reaped) and of RabbitMQ (`beam.smp`) read from `/proc/<pid>/stat`, and WAL written
//! (`pg_current_wal_lsn()`).

use std::fs;
use std::process::Command;
use std::time::Instant;

/// Clock ticks per second of `/proc/<pid>/stat` times (`getconf CLK_TCK`, normally 100).
pub fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// (ppid, utime + stime, cutime + cstime) of a process, in ticks.
fn stat(pid: u32) -> Option<(u32, u64, u64)> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3 (state).
    let rest: Vec<&str> = s.rsplit_once(')')?.1.split_whitespace().collect();
    let n = |i: usize| rest.get(i - 3).and_then(|v| v.parse::<u64>().ok());
    Some((n(4)? as u32, n(14)? + n(15)?, n(16)? + n(17)?))
}

/// CPU seconds of one process (its threads included).
pub fn process_cpu(pid: u32, ticks: f64) -> f64 {
    stat(pid).map(|(_, own, _)| own as f64 / ticks).unwrap_or(0.0)
}

/// CPU seconds of a PostgreSQL server: the postmaster, its reaped children (backends that ended) and its live
/// children (backends, walwriter, checkpointer, autovacuum, ...).
pub fn postgres_cpu(postmaster: u32, ticks: f64) -> f64 {
    let Some((_, own, reaped)) = stat(postmaster) else {
        return 0.0;
    };
    let mut total = own + reaped;
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if let Some((ppid, own, reaped)) = stat(pid) {
            if ppid == postmaster {
                total += own + reaped;
            }
        }
    }
    total as f64 / ticks
}

/// One reading of every counter.
#[derive(Clone, Debug)]
pub struct Sample {
    pub at: Instant,
    pub worker: f64,
    pub postgres: f64,
    pub rabbitmq: f64,
    pub wal_lsn: String,
}

/// What a phase cost: the difference of two samples, less what the same span costs idle.
#[derive(Clone, Debug)]
pub struct Cost {
    pub name: String,
    pub messages: u64,
    pub seconds: f64,
    pub worker: f64,
    pub postgres: f64,
    pub rabbitmq: f64,
    pub wal_bytes: f64,
}

impl Cost {
    /// Per message, in microseconds of CPU and bytes of WAL.
    pub fn per_message(&self) -> (f64, f64, f64, f64) {
        let m = self.messages.max(1) as f64;
        (self.worker / m * 1e6, self.postgres / m * 1e6, self.rabbitmq / m * 1e6, self.wal_bytes / m)
    }

    /// One row of the results table.
    pub fn row(&self) -> String {
        let (w, p, r, wal) = self.per_message();
        format!(
            "| {} | {} | {:.1} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
            self.name,
            self.messages,
            self.seconds,
            self.messages as f64 / self.seconds,
            w,
            p,
            r,
            wal
        )
    }
}

pub const HEADER: &str = "| phase | messages | seconds | messages/s | worker CPU µs/msg | PostgreSQL CPU µs/msg | \
RabbitMQ CPU µs/msg | WAL bytes/msg |\n|---|---:|---:|---:|---:|---:|---:|---:|";

/// Idle CPU rates (seconds per second) of worker, PostgreSQL and RabbitMQ, subtracted from each phase.
#[derive(Clone, Copy, Debug, Default)]
pub struct Idle {
    pub worker: f64,
    pub postgres: f64,
    pub rabbitmq: f64,
}

/// The cost between `a` and `b` of `messages` messages, idle cost over the span subtracted (never below zero).
pub fn cost(name: &str, messages: u64, a: &Sample, b: &Sample, wal_bytes: f64, idle: Idle) -> Cost {
    let seconds = (b.at - a.at).as_secs_f64();
    Cost {
        name: name.to_string(),
        messages,
        seconds,
        worker: (b.worker - a.worker - idle.worker * seconds).max(0.0),
        postgres: (b.postgres - a.postgres - idle.postgres * seconds).max(0.0),
        rabbitmq: (b.rabbitmq - a.rabbitmq - idle.rabbitmq * seconds).max(0.0),
        wal_bytes,
    }
}
