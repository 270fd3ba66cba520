//! CPU accounting from /proc: who used the two cores during a measurement.

use std::time::Instant;

/// CPU seconds used so far, machine-wide (busy) and per component.
pub struct CpuSample {
    at: Instant,
    busy: f64,
    by: Vec<(&'static str, f64)>,
}

const CLOCK_TICKS: f64 = 100.0; // USER_HZ on Linux

fn proc_cpu_secs(pid: &str) -> Option<(String, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (head, rest) = stat.rsplit_once(") ")?;
    let comm = head.split_once(" (")?.1.to_string();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some((comm, ticks / CLOCK_TICKS))
}

pub fn cpu_sample(worker: Option<u32>) -> CpuSample {
    let busy = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let line = s.lines().next()?.to_string();
            let v: Vec<f64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
            // user nice system idle iowait irq softirq steal
            Some((v.iter().take(8).sum::<f64>() - v.get(3)? - v.get(4)?) / CLOCK_TICKS)
        })
        .unwrap_or(f64::NAN);
    let me = std::process::id();
    let mut by: Vec<(&'static str, f64)> =
        ["worker", "postgres", "rabbitmq", "bench", "bare consumer"].iter().map(|k| (*k, 0.0)).collect();
    let my_comm = proc_cpu_secs(&me.to_string()).map(|c| c.0).unwrap_or_default();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let Ok(pid) = name.parse::<u32>() else { continue };
            let Some((comm, secs)) = proc_cpu_secs(&name) else { continue };
            let key = if Some(pid) == worker {
                "worker"
            } else if pid == me {
                "bench"
            } else if comm == "postgres" {
                "postgres"
            } else if comm == "beam.smp" {
                "rabbitmq"
            } else if comm == my_comm {
                "bare consumer"
            } else {
                continue;
            };
            if let Some(slot) = by.iter_mut().find(|(k, _)| *k == key) {
                slot.1 += secs;
            }
        }
    }
    CpuSample { at: Instant::now(), busy, by }
}

/// Cores used per component between two samples, plus `other` (the rest of the machine) and `idle` (of 2 cores).
pub fn cpu_use(a: &CpuSample, b: &CpuSample) -> Vec<(&'static str, f64)> {
    let wall = (b.at - a.at).as_secs_f64().max(1e-9);
    let mut out: Vec<(&'static str, f64)> =
        a.by.iter().zip(&b.by).map(|((k, x), (_, y))| (*k, ((y - x) / wall).max(0.0))).collect();
    let busy = (b.busy - a.busy) / wall;
    let known: f64 = out.iter().map(|(_, v)| v).sum();
    let cores = std::thread::available_parallelism().map(|n| n.get() as f64).unwrap_or(2.0);
    out.push(("other", (busy - known).max(0.0)));
    out.push(("idle", (cores - busy).max(0.0)));
    out
}

pub fn cpu_line(use_: &[(&'static str, f64)]) -> String {
    use_.iter().filter(|(_, v)| *v >= 0.005).map(|(k, v)| format!("{k} {v:.2}")).collect::<Vec<_>>().join(", ")
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}
