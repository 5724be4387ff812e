//! The open-file limit. Every socket is a file descriptor, and most systems start a process
//! with a soft limit of 1,024 even when its hard limit is far higher: accept then fails with
//! EMFILE long before `max_sockets` or `max_connections` is reached. So the soft limit is
//! raised to the hard one at start, and the operator is warned when even that is below
//! what the configured limits need.
//!
//! `rlimit` rather than `nix`: it does only this, is small, keeps up with each platform's
//! quirks (macOS caps the soft limit at `kern.maxfilesperproc`), and depends on `libc` alone.

/// Descriptors besides client sockets: the data store, the listener, the runtime's epoll
/// and wake-up descriptors, stdio, with room to spare.
pub const FILE_HEADROOM: u64 = 256;

/// What happened, for the log and for tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileLimit {
    pub before: u64,
    pub soft: u64,
    pub hard: u64,
}

/// Raises the soft limit as far as the hard limit allows and logs the outcome; warns when
/// the result is below `needed`. Never fails: a low limit is the operator's to fix, and
/// crier still serves as many clients as it allows.
pub fn raise(needed: u64) -> Option<FileLimit> {
    use rlimit::Resource;
    let (before, hard) = match Resource::NOFILE.get() {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("could not read the open-file limit: {e}");
            return None;
        }
    };
    // An unlimited hard limit cannot be the soft one on Linux (fs.nr_open caps it), so
    // fall back to the usual nr_open of 2^20.
    let soft = rlimit::increase_nofile_limit(u64::MAX)
        .or_else(|_| rlimit::increase_nofile_limit(1 << 20))
        .unwrap_or_else(|e| {
            tracing::warn!("could not raise the open-file limit from {before}: {e}");
            before
        });
    if soft > before {
        tracing::info!("raised the open-file limit from {before} to {soft}");
    }
    if soft < needed {
        tracing::warn!(
            "open-file limit {soft} is below the {needed} files the limits need \
             (max_sockets + {}): accept will fail with EMFILE before max_sockets is reached; \
             raise the hard limit (ulimit -Hn, systemd LimitNOFILE=) or lower max_sockets",
            FILE_HEADROOM
        );
    }
    Some(FileLimit { before, soft, hard })
}
