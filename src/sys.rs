//! Process-level plumbing: the open-files limit, termination signals, the process's own metrics;
//! a timer that may be unset, which the hub's connections and the fleet's devices both wait on;
//! and an error told with all its causes, which every layer's messages use.

/// Raises the soft open-files limit to the hard limit: every connection is a descriptor.
pub fn raise_fd_limit() {
    #[cfg(unix)]
    unsafe {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// The soft open-files limit (after `raise_fd_limit`, the hard one); 1,024 where it cannot be read.
pub fn open_files_limit() -> usize {
    #[cfg(unix)]
    unsafe {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            return usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX);
        }
    }
    1024
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

/// A deadline later than any run lasts (about 30 years on), for a wait whose real deadline is
/// past what the clock can count: `Instant + Duration` panics on overflow, this never does.
pub fn far_future() -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(std::time::Duration::from_secs(30 * 365 * 86_400)).unwrap_or(now)
}

/// `now + d`, or `None` when that is past what the clock can count (treat it as never).
pub fn deadline_after(d: std::time::Duration) -> Option<tokio::time::Instant> {
    tokio::time::Instant::now().checked_add(d)
}

/// Sleeps until `at`, or forever when there is no deadline.
pub async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The process's own metrics in the Prometheus text format, named as Prometheus' client
/// libraries name them (`process_cpu_seconds_total`, `process_resident_memory_bytes`,
/// `process_open_fds`, `process_start_time_seconds`), plus `fleetsim_build_info{version}` = 1.
/// Read from /proc on Linux; elsewhere only the build info.
pub fn process_metrics() -> String {
    let mut out = format!(
        "# HELP fleetsim_build_info The running fleetsim's version\n# TYPE fleetsim_build_info gauge\nfleetsim_build_info{{version=\"{}\"}} 1\n",
        env!("CARGO_PKG_VERSION")
    );
    #[cfg(target_os = "linux")]
    if let Some(p) = linux_process() {
        for (name, kind, help, value) in [
            ("process_cpu_seconds_total", "counter", "User and system CPU time spent, in seconds", p.cpu_secs),
            ("process_resident_memory_bytes", "gauge", "Resident memory size, in bytes", p.rss_bytes),
            ("process_open_fds", "gauge", "Open file descriptors", p.open_fds),
            ("process_start_time_seconds", "gauge", "Start time since the Unix epoch, in seconds", p.start_secs),
        ] {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"));
        }
    }
    out
}

#[cfg(target_os = "linux")]
struct ProcessStats {
    cpu_secs: f64,
    rss_bytes: f64,
    open_fds: f64,
    start_secs: f64,
}

/// proc(5): fields 14-15 (utime, stime) and 22 (starttime) of /proc/self/stat are in clock
/// ticks, 24 (rss) in pages; the boot time is `btime` in /proc/stat.
#[cfg(target_os = "linux")]
fn linux_process() -> Option<ProcessStats> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may hold spaces; fields are counted after its closing ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| f.get(n - 3).and_then(|v| v.parse::<f64>().ok());
    // SAFETY: sysconf only reads configuration values.
    let (ticks, page) = unsafe { (libc::sysconf(libc::_SC_CLK_TCK) as f64, libc::sysconf(libc::_SC_PAGESIZE) as f64) };
    let boot: f64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime ")?.trim().parse().ok())?;
    Some(ProcessStats {
        cpu_secs: (field(14)? + field(15)?) / ticks,
        rss_bytes: field(24)? * page,
        open_fds: std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count()) as f64,
        start_secs: boot + field(22)? / ticks,
    })
}

/// An error and every `source()` under it, joined by ": ", leaving out a cause whose text the
/// message before it already contains (many wrappers repeat their source).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn process_metrics_are_in_the_text_format() {
        let text = super::process_metrics();
        assert!(text.contains(&format!("fleetsim_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"))));
        #[cfg(target_os = "linux")]
        for name in ["process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"] {
            let value: f64 = text
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .unwrap_or_else(|| panic!("no {name} in {text}"))
                .parse()
                .unwrap();
            assert!(value > 0.0 || name == "process_cpu_seconds_total", "{name} = {value}");
        }
    }
}
