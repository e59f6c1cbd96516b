//! Measurement helpers shared by the benchmark binaries.

use std::time::Duration;

pub mod load;

/// User + system CPU seconds a process has used, from `/proc/<pid>/stat` (0 when unreadable).
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Linux reports these in clock ticks of 1/100 s (USER_HZ).
    (ticks(11) + ticks(12)) / 100.0
}

/// User + system CPU seconds of every process whose command is `name` (e.g. `postgres`: the
/// server and all its backends), from `/proc`. Processes that exited in between are not
/// counted, so measure over a span in which they all live (a pool's connections do).
pub fn cpu_seconds_of(name: &str) -> f64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == name)
        })
        .map(cpu_seconds)
        .sum()
}

/// The `p`th percentile of sorted samples (nearest rank); zero for no samples.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p / 100.0).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}
