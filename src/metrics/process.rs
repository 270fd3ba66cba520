//! The process's own metrics under the names every Prometheus client library uses (`process_cpu_seconds_total`,
//! `process_resident_memory_bytes`, ...), read from `/proc/self` at each scrape: prometheus-client has no process
//! collector, and these few files are all it takes on Linux. Elsewhere (no `/proc`) nothing is reported.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// One reading of the process's figures.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessStats {
    /// User and system CPU time, in seconds.
    pub cpu_seconds: f64,
    /// Resident set size, in bytes.
    pub resident_bytes: i64,
    /// Virtual memory size, in bytes.
    pub virtual_bytes: i64,
    /// Threads.
    pub threads: i64,
    /// Open file descriptors.
    pub open_fds: i64,
    /// Start time since the Unix epoch, in seconds.
    pub start_time_seconds: f64,
}

/// Clock ticks per second of `/proc/<pid>/stat`'s times.
fn ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a constant of the C library; it has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Bytes per memory page (`/proc/<pid>/statm` counts pages).
fn page_size() -> i64 {
    // SAFETY: as above.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as i64
    } else {
        4096
    }
}

/// Parses `/proc/self/stat`, `/proc/self/statm` and `/proc/stat`'s `btime`; `None` when one is missing or malformed.
pub fn parse(stat: &str, statm: &str, proc_stat: &str, open_fds: i64) -> Option<ProcessStats> {
    // The command name (field 2) is in parentheses and may hold spaces: the fields after it follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state), so field n is f[n - 3].
    let field = |n: usize| f.get(n - 3).and_then(|v| v.parse::<f64>().ok());
    let ticks = ticks_per_second();
    let cpu_seconds = (field(14)? + field(15)?) / ticks;
    let threads = field(20)? as i64;
    let started_ticks = field(22)?;
    let btime: f64 = proc_stat.lines().find_map(|l| l.strip_prefix("btime ")).and_then(|v| v.trim().parse().ok())?;
    let mut pages = statm.split_whitespace().map(|v| v.parse::<i64>().ok());
    let virtual_pages = pages.next()??;
    let resident_pages = pages.next()??;
    Some(ProcessStats {
        cpu_seconds,
        resident_bytes: resident_pages * page_size(),
        virtual_bytes: virtual_pages * page_size(),
        threads,
        open_fds,
        start_time_seconds: btime + started_ticks / ticks,
    })
}

/// Reads the figures of this process now.
pub fn read() -> Option<ProcessStats> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let proc_stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as i64;
    parse(&stat, &statm, &proc_stat, fds)
}

/// Encodes [`read`]'s figures at each scrape.
#[derive(Debug)]
pub struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(p) = read() else { return Ok(()) };
        let cpu = ConstCounter::new(p.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            None,
            cpu.metric_type(),
        )?)?;
        let gauges: [(&str, &str, f64); 5] = [
            ("process_resident_memory_bytes", "Resident memory size in bytes", p.resident_bytes as f64),
            ("process_virtual_memory_bytes", "Virtual memory size in bytes", p.virtual_bytes as f64),
            ("process_threads", "Number of OS threads in the process", p.threads as f64),
            ("process_open_fds", "Number of open file descriptors", p.open_fds as f64),
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                p.start_time_seconds,
            ),
        ];
        for (name, help, value) in gauges {
            let g = ConstGauge::new(value);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_stat_line_whose_command_name_holds_spaces_and_parentheses() {
        // Fields 14/15 (utime, stime) = 250 + 50 ticks, 20 (threads) = 7, 22 (start) = 1000 ticks.
        let stat = "42 (acm (a) b) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 7 0 1000 12345 678";
        let statm = "3000 1500 200 10 0 900 0";
        let proc_stat = "cpu  1 2 3\nbtime 1700000000\nprocesses 5\n";
        let p = parse(stat, statm, proc_stat, 9).expect("parses");
        let ticks = ticks_per_second();
        assert_eq!(p.cpu_seconds, 300.0 / ticks);
        assert_eq!(p.threads, 7);
        assert_eq!(p.open_fds, 9);
        assert_eq!(p.resident_bytes, 1500 * page_size());
        assert_eq!(p.virtual_bytes, 3000 * page_size());
        assert_eq!(p.start_time_seconds, 1_700_000_000.0 + 1000.0 / ticks);
    }

    #[test]
    fn malformed_input_gives_nothing() {
        assert_eq!(parse("no parenthesis", "1 2", "btime 1", 0), None);
        assert_eq!(parse("1 (x) S 1", "1 2", "btime 1", 0), None);
    }

    #[test]
    fn this_process_reads_a_plausible_resident_size_and_cpu_time() {
        let p = read().expect("/proc/self is readable on Linux");
        assert!(p.resident_bytes > 1 << 20, "resident size {} bytes is below 1 MiB", p.resident_bytes);
        assert!(p.virtual_bytes >= p.resident_bytes, "virtual {} < resident {}", p.virtual_bytes, p.resident_bytes);
        assert!(p.threads >= 1 && p.open_fds >= 3, "threads {} fds {}", p.threads, p.open_fds);
        assert!(p.cpu_seconds >= 0.0 && p.start_time_seconds > 1.6e9, "{p:?}");
    }
}
