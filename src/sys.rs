//! Process-level plumbing: the open-files limit and termination signals; and a timer that may
//! be unset, which the hub's connections and the fleet's devices both wait on.

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
