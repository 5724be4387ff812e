//! One log line per refusal of a hostile or broken client (a socket refused at accept, a
//! WebSocket closed for a protocol violation, an HTTP request refused for a duplicated
//! header, a forged key...), at most `LINES_PER_WINDOW` per reason in any `WINDOW`: an
//! attack that triggers a refusal a hundred thousand times a second must not turn into a
//! hundred thousand log lines a second (disk, journald and the log pipeline would pay for
//! it, and the lines would bury everything else). Past the budget a reason's refusals are
//! only counted, and once its window is over one summary line says how many went unlogged.
//! The metrics (`crier_refused_connections_total`, `crier_disconnects_total`) still count
//! every one.
//!
//! The table is keyed by reason (a fixed set of `&'static str`), so it stays small whatever
//! the attack; its lock is held for a few instructions and never while logging.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::close::DisconnectReason;
use crate::error_code::ErrorCode;

/// Lines logged per reason in one window, before the rest are only counted.
pub const LINES_PER_WINDOW: u32 = 5;
/// How long one window lasts.
pub const WINDOW: Duration = Duration::from_secs(10);

/// What to do with one refusal.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Log it; `suppressed` refusals of the same reason went unlogged in the window that
    /// just ended (say so first when non-zero).
    Log { suppressed: u64 },
    /// Count it only.
    Suppress,
}

#[derive(Debug)]
struct Window {
    start: Instant,
    logged: u32,
    suppressed: u64,
}

/// The per-reason budgets.
pub struct RefusalLog {
    lines: u32,
    window: Duration,
    reasons: Mutex<HashMap<&'static str, Window>>,
}

impl RefusalLog {
    pub fn new(lines: u32, window: Duration) -> Self {
        RefusalLog {
            lines,
            window,
            reasons: Mutex::new(HashMap::new()),
        }
    }

    /// Decides for one refusal of `reason` at `now`.
    pub fn admit(&self, reason: &'static str, now: Instant) -> Verdict {
        let mut reasons = self.reasons.lock();
        let w = reasons.entry(reason).or_insert(Window {
            start: now,
            logged: 0,
            suppressed: 0,
        });
        let mut carried = 0;
        if now.saturating_duration_since(w.start) >= self.window {
            carried = std::mem::take(&mut w.suppressed);
            w.start = now;
            w.logged = 0;
        }
        if w.logged < self.lines {
            w.logged += 1;
            Verdict::Log {
                suppressed: carried,
            }
        } else {
            w.suppressed += 1;
            Verdict::Suppress
        }
    }

    /// The reasons whose window is over with refusals left unlogged, and how many; their
    /// windows restart. Called periodically so the summary appears after an attack stops.
    pub fn due(&self, now: Instant) -> Vec<(&'static str, u64)> {
        let mut reasons = self.reasons.lock();
        let mut out = Vec::new();
        reasons.retain(|reason, w| {
            if now.saturating_duration_since(w.start) < self.window {
                return true;
            }
            if w.suppressed > 0 {
                out.push((*reason, w.suppressed));
            }
            // An idle reason leaves the table; the next refusal starts a fresh window.
            false
        });
        out
    }
}

static LOG: LazyLock<RefusalLog> = LazyLock::new(|| RefusalLog::new(LINES_PER_WINDOW, WINDOW));

fn summary(reason: &str, suppressed: u64) {
    tracing::warn!(
        target: "crier::refused",
        reason,
        suppressed,
        "refused {reason}: {suppressed} more in the last {}s not logged",
        WINDOW.as_secs()
    );
}

/// Logs one refusal of `reason`, within its budget. `peer` is the client's address when
/// known at that point.
pub fn note(reason: &'static str, peer: Option<IpAddr>, detail: &str) {
    match LOG.admit(reason, Instant::now()) {
        Verdict::Suppress => {}
        Verdict::Log { suppressed } => {
            if suppressed > 0 {
                summary(reason, suppressed);
            }
            match peer {
                Some(peer) => tracing::warn!(
                    target: "crier::refused",
                    reason,
                    peer = %peer,
                    "refused {reason} from {peer}: {detail}"
                ),
                None => tracing::warn!(
                    target: "crier::refused",
                    reason,
                    "refused {reason}: {detail}"
                ),
            }
        }
    }
}

/// Logs the summaries of windows that ended; the accept loop calls it every second.
pub fn flush() {
    for (reason, suppressed) in LOG.due(Instant::now()) {
        summary(reason, suppressed);
    }
}

/// A connection closed because the client broke the protocol or a limit (not a normal
/// close, a shutdown or a network failure).
pub fn disconnect(reason: DisconnectReason) {
    use DisconnectReason as R;
    let detail = match reason {
        R::ProtocolError => "WebSocket protocol violation (close 1002)",
        R::BadUtf8 => "text frame that is not UTF-8 (close 1007)",
        R::MessageTooLarge => "message above max_message_bytes (close 1009)",
        R::TooManyCommands => "frames above max_commands_per_second (close 4500)",
        R::TooManyFragments => "message in more than max_fragments_per_message frames (close 4502)",
        R::BadToken => "in-band token refused (close 4501)",
        R::SlowConsumer => "queued more than queue_max_bytes unread (close 4001)",
        _ => return,
    };
    note(reason.label(), None, detail);
}

/// An HTTP request refused for a reason that points at a hostile or broken client rather
/// than an ordinary mistake (a bad topic name or JSON body is not logged).
pub fn http(code: ErrorCode, message: &str) {
    use ErrorCode as C;
    if matches!(
        code,
        C::DuplicateHeader
            | C::MessageTooLarge
            | C::BodyTimeout
            | C::BadHandshake
            | C::Forbidden
            | C::BadToken
            | C::OriginNotAllowed
            | C::CrossSiteRequest
            | C::TooManyRequests
            | C::TooManyConnections
    ) {
        note(code.as_str(), None, message);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_logs_its_budget_then_one_summary_per_window() {
        let log = RefusalLog::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        let verdicts: Vec<_> = (0..1000).map(|_| log.admit("per_ip", t0)).collect();
        assert_eq!(
            verdicts
                .iter()
                .filter(|v| matches!(v, Verdict::Log { .. }))
                .count(),
            3
        );
        // Another reason has its own budget.
        assert_eq!(log.admit("bad_utf8", t0), Verdict::Log { suppressed: 0 });
        // Within the window: nothing is due yet.
        assert!(log.due(t0 + Duration::from_secs(5)).is_empty());
        // The next window's first refusal carries the count of the last one.
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(log.admit("per_ip", t1), Verdict::Log { suppressed: 997 });
        for _ in 0..10 {
            log.admit("per_ip", t1);
        }
        // After the attack stops, the periodic flush reports the rest, once.
        let due = log.due(t1 + Duration::from_secs(10));
        assert_eq!(due, vec![("per_ip", 8)]);
        assert!(log.due(t1 + Duration::from_secs(30)).is_empty());
    }
}
