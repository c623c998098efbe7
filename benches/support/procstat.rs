//! What a process costs, read from /proc: RSS and CPU time. Included by path (`#[path]`) from the
//! benches that measure another process.

/// RSS in KiB and CPU seconds (user + system) of a process; zeros once it is gone. CPU time is
/// in clock ticks of 1/100 s (`USER_HZ`, 100 on Linux).
pub fn proc_stats(pid: u32) -> (u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<&str> = stat.rsplit(')').next().unwrap_or_default().split_whitespace().collect();
    let field = |n: usize| f.get(n - 3).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    (rss, (field(14) + field(15)) as f64 / 100.0)
}
