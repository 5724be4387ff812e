//! Seasons: a board's reset schedule (a cron expression read in an IANA time zone), the wall
//! clock schedules run on, and the state of a board's current season.
//!
//! Why `croner` + `chrono-tz`: croner parses the usual five-field expressions (plus `L`,
//! `#`, `W`, names and `@weekly`-style aliases) and documents what it does across DST
//! changes (a time in a spring-forward gap fires once right after the gap, a time in a
//! fall-back overlap fires once, at its first pass: the OCPS / Vixie rules), which is what
//! a season boundary needs; chrono-tz compiles the IANA database into the binary, so a
//! zone means the same on every node whatever the host's `/usr/share/zoneinfo` holds.
//!
//! The clock is injectable ([`WallClock::set`]): schedules across time zones and DST
//! changes are tested by moving it, never by sleeping.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds};
use croner::Cron;
use tokio::sync::Notify;

/// Closed seasons a board keeps unless its options say otherwise.
pub const DEFAULT_KEEP_SEASONS: usize = 10;
/// Most closed seasons a board may keep (`keep_seasons`).
pub const MAX_KEEP_SEASONS: usize = 1000;
/// Longest cron expression or zone name accepted.
const MAX_SCHEDULE_TEXT: usize = 128;

/// Checks a board's season options (`reset`, `timezone`, `keep_seasons`), from `PUT` or a
/// `[[board]]` table.
pub fn check_season_options(
    reset: Option<&str>,
    timezone: Option<&str>,
    keep: Option<usize>,
) -> Result<(), String> {
    match reset {
        Some(r) => Schedule::parse(r, timezone).map(drop)?,
        None => parse_zone(timezone).map(drop)?,
    }
    if keep.is_some_and(|k| !(1..=MAX_KEEP_SEASONS).contains(&k)) {
        return Err(format!("keep_seasons must be 1-{MAX_KEEP_SEASONS}"));
    }
    Ok(())
}

/// A parsed `reset` expression in its `timezone`.
#[derive(Clone, Debug)]
pub struct Schedule {
    cron: Cron,
    tz: Tz,
}

impl Schedule {
    /// Parses `reset` (five fields, minute resolution: a season shorter than a minute is
    /// a mistake) in `timezone` (an IANA name, UTC when absent). The message says what is
    /// wrong, for a 400 `bad_options` or a settings error.
    pub fn parse(reset: &str, timezone: Option<&str>) -> Result<Schedule, String> {
        if reset.len() > MAX_SCHEDULE_TEXT {
            return Err(format!("reset must be at most {MAX_SCHEDULE_TEXT} bytes"));
        }
        let tz = parse_zone(timezone)?;
        let cron = CronParser::builder()
            .seconds(Seconds::Disallowed)
            .build()
            .parse(reset)
            .map_err(|e| {
                format!(
                    "reset {reset:?} is not a cron expression (minute hour day month weekday): {e}"
                )
            })?;
        let s = Schedule { cron, tz };
        // An expression that never fires (`0 0 30 2 *`) would never end a season.
        if s.next_after(0).is_none() {
            return Err(format!("reset {reset:?} never fires"));
        }
        Ok(s)
    }

    /// The first boundary strictly after `ms` (ms since the Unix epoch), if any.
    pub fn next_after(&self, ms: i64) -> Option<i64> {
        let t = self.tz.from_utc_datetime(&utc(ms)?.naive_utc());
        self.cron
            .find_next_occurrence(&t, false)
            .ok()
            .map(|t| t.timestamp_millis())
    }

    /// The latest boundary at or before `ms`, if any.
    pub fn last_at_or_before(&self, ms: i64) -> Option<i64> {
        let t = self.tz.from_utc_datetime(&utc(ms)?.naive_utc());
        self.cron
            .find_previous_occurrence(&t, true)
            .ok()
            .map(|t| t.timestamp_millis())
    }
}

/// A `timezone` option: an IANA name (`Europe/Berlin`), UTC when absent.
pub fn parse_zone(timezone: Option<&str>) -> Result<Tz, String> {
    match timezone {
        None => Ok(Tz::UTC),
        Some(z) if z.len() > MAX_SCHEDULE_TEXT => Err(format!(
            "timezone must be at most {MAX_SCHEDULE_TEXT} bytes"
        )),
        Some(z) => z.parse::<Tz>().map_err(|_| {
            format!("timezone {z:?} is not an IANA time zone name (e.g. Europe/Berlin, UTC)")
        }),
    }
}

fn utc(ms: i64) -> Option<DateTime<Utc>> {
    DateTime::<Utc>::from_timestamp_millis(ms)
}

/// RFC 3339 text of a time in ms (UTC), for the API.
pub fn rfc3339(ms: i64) -> String {
    utc(ms).map_or_else(String::new, |t| {
        t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    })
}

/// A board's current season: its number (from 1), when it started, and the time its end
/// is computed from (`anchor`: the start, or when the schedule last changed, so that a
/// schedule set mid-season ends the season at its next boundary, not at one already past).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeasonState {
    pub number: u64,
    pub started: i64,
    pub anchor: i64,
}

impl SeasonState {
    pub fn first(now: i64) -> Self {
        SeasonState {
            number: 1,
            started: now,
            anchor: now,
        }
    }

    /// When this season ends under `schedule`.
    pub fn ends(&self, schedule: Option<&Schedule>) -> Option<i64> {
        schedule.and_then(|s| s.next_after(self.anchor))
    }

    /// The season after this one, closed at `now` (at or past its end): it starts at the
    /// latest boundary at or before `now`, so a node that was down over several
    /// boundaries closes the open season once, and the next one ends at the next
    /// boundary still ahead.
    pub fn next(&self, schedule: &Schedule, now: i64) -> SeasonState {
        let started = schedule
            .last_at_or_before(now)
            .filter(|b| *b >= self.anchor)
            .unwrap_or(now);
        SeasonState {
            number: self.number + 1,
            started,
            anchor: started,
        }
    }
}

/// The wall clock seasons run on, in ms since the Unix epoch. Tests fix it
/// ([`WallClock::set`]) to cross boundaries, time zones and DST changes without sleeping;
/// whoever waits for a boundary is woken by [`WallClock::changed`].
#[derive(Default)]
pub struct WallClock {
    /// `i64::MIN` while the real clock is used.
    fixed: AtomicI64,
    changed: Notify,
}

impl WallClock {
    pub fn new() -> Self {
        WallClock {
            fixed: AtomicI64::new(i64::MIN),
            changed: Notify::new(),
        }
    }

    pub fn now_ms(&self) -> i64 {
        match self.fixed.load(Ordering::Acquire) {
            i64::MIN => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or(Duration::ZERO)
                .as_millis() as i64,
            ms => ms,
        }
    }

    /// Fixes the clock at `ms` (tests). Not for production use.
    #[doc(hidden)]
    pub fn set(&self, ms: i64) {
        self.fixed.store(ms, Ordering::Release);
        self.changed.notify_waiters();
    }

    /// Resolves when the clock is moved by [`WallClock::set`].
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s).unwrap().timestamp_millis()
    }

    #[test]
    fn weekly_in_utc_and_in_a_zone() {
        let s = Schedule::parse("0 0 * * MON", None).unwrap();
        // 2026-12-02 is a Wednesday.
        assert_eq!(
            s.next_after(ms("2026-12-02T10:00:00Z")),
            Some(ms("2026-12-07T00:00:00Z"))
        );
        let s = Schedule::parse("0 0 * * MON", Some("Asia/Tokyo")).unwrap();
        assert_eq!(
            s.next_after(ms("2026-12-02T10:00:00Z")),
            Some(ms("2026-12-06T15:00:00Z"))
        );
    }

    /// Midnight in New York is 05:00 UTC in winter and 04:00 UTC in summer: the boundary
    /// follows the zone's wall clock across the change (2026-03-08 and 2026-11-01).
    #[test]
    fn daily_midnight_across_dst_in_new_york() {
        let s = Schedule::parse("0 0 * * *", Some("America/New_York")).unwrap();
        assert_eq!(
            s.next_after(ms("2026-03-07T12:00:00Z")),
            Some(ms("2026-03-08T05:00:00Z"))
        );
        assert_eq!(
            s.next_after(ms("2026-03-08T05:00:00Z")),
            Some(ms("2026-03-09T04:00:00Z"))
        );
        assert_eq!(
            s.next_after(ms("2026-10-31T12:00:00Z")),
            Some(ms("2026-11-01T04:00:00Z"))
        );
        assert_eq!(
            s.next_after(ms("2026-11-01T04:00:00Z")),
            Some(ms("2026-11-02T05:00:00Z"))
        );
    }

    /// 02:30 does not exist in Berlin on 2026-03-29 (02:00 jumps to 03:00): the season
    /// ends right after the gap, once. On 2026-10-25 02:30 happens twice: it ends at the
    /// first pass only.
    #[test]
    fn a_boundary_in_a_dst_gap_or_overlap_fires_once() {
        let s = Schedule::parse("30 2 * * *", Some("Europe/Berlin")).unwrap();
        let spring = s.next_after(ms("2026-03-28T00:00:00Z")).unwrap();
        assert_eq!(spring, ms("2026-03-28T01:30:00Z"), "the day before, CET");
        let gap = s.next_after(spring).unwrap();
        assert_eq!(
            gap,
            ms("2026-03-29T01:00:00Z"),
            "03:00 CEST, right after the gap"
        );
        assert_eq!(s.next_after(gap), Some(ms("2026-03-30T00:30:00Z")));
        let before = s.next_after(ms("2026-10-24T12:00:00Z")).unwrap();
        assert_eq!(before, ms("2026-10-25T00:30:00Z"), "02:30 CEST, first pass");
        assert_eq!(
            s.next_after(before),
            Some(ms("2026-10-26T01:30:00Z")),
            "not again at 02:30 CET"
        );
    }

    #[test]
    fn a_node_down_over_several_boundaries_closes_once() {
        let s = Schedule::parse("0 0 * * *", None).unwrap();
        let season = SeasonState::first(ms("2026-12-01T10:00:00Z"));
        assert_eq!(season.ends(Some(&s)), Some(ms("2026-12-02T00:00:00Z")));
        let next = season.next(&s, ms("2026-12-05T07:00:00Z"));
        assert_eq!(next.number, 2);
        assert_eq!(next.started, ms("2026-12-05T00:00:00Z"));
        assert_eq!(next.ends(Some(&s)), Some(ms("2026-12-06T00:00:00Z")));
    }

    #[test]
    fn bad_schedules_say_why() {
        for (reset, tz, want) in [
            ("every monday", None, "not a cron expression"),
            ("0 0 0 * * MON", None, "not a cron expression"),
            ("0 0 30 2 *", None, "never fires"),
            ("0 0 * * MON", Some("Mars/Olympus"), "not an IANA time zone"),
        ] {
            let e = Schedule::parse(reset, tz).unwrap_err();
            assert!(e.contains(want), "{reset}: {e}");
        }
    }
}
