//! Budget windows, pure: which counters a budget sums at a given instant.
//!
//! A calendar window (`daily`, `weekly`, `monthly`) is one counter, named
//! by its start in the configured time zone (so midnight is the zone's
//! midnight, daylight-saving days included: jiff's `start_of_day`). A
//! `rolling` window of length `period` is 60 counters of `period / 60`
//! each (one-second counters for periods under a minute), the last of
//! which takes new spend: spend leaves the window one counter at a time,
//! at most one counter's length late.

use std::time::Duration;

use jiff::{Timestamp, ToSpan, tz::TimeZone};

use super::config::WindowKind;

/// Counters of a rolling window of a minute or more.
pub const ROLLING_BUCKETS: i64 = 60;

/// The counters of one budget at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Start of every counter summed, in Unix seconds, oldest first; the
    /// last takes new spend.
    pub buckets: Vec<i64>,
    /// Length of one counter in seconds (a calendar window: its whole
    /// length).
    pub bucket_s: i64,
    /// When the current counter ends, in Unix seconds (a calendar
    /// window: when the budget resets).
    pub end_s: i64,
    /// How long the current counter must be kept, in seconds (its end plus
    /// a day, so a turn settling after the boundary finds it).
    pub ttl_s: i64,
}

impl Window {
    /// When spend counted in bucket `index` leaves the window, in Unix
    /// seconds: the window's end for a calendar window, the bucket's start
    /// plus the period for a rolling one.
    pub fn released_at(&self, index: usize) -> i64 {
        if self.buckets.len() == 1 {
            return self.end_s;
        }
        self.buckets.get(index).copied().unwrap_or(self.end_s)
            + self.bucket_s * self.buckets.len() as i64
    }
}

/// The window of a `kind` budget (`period` for a rolling one) in `tz` at
/// `now`. Errors with a message when the calendar arithmetic overflows
/// (years beyond 9999).
pub fn at(
    kind: WindowKind,
    period: Option<Duration>,
    tz: &TimeZone,
    now: Timestamp,
) -> Result<Window, String> {
    let overflow = |e: jiff::Error| format!("budget window out of range: {e}");
    let now_s = now.as_second();
    let calendar = |start: jiff::Zoned, end: jiff::Zoned| {
        let (start, end) = (start.timestamp().as_second(), end.timestamp().as_second());
        Window {
            buckets: vec![start],
            bucket_s: end - start,
            end_s: end,
            ttl_s: end - now_s + 86_400,
        }
    };
    let zoned = now.to_zoned(tz.clone());
    Ok(match kind {
        WindowKind::Daily => {
            let start = zoned.start_of_day().map_err(overflow)?;
            let end = zoned
                .tomorrow()
                .map_err(overflow)?
                .start_of_day()
                .map_err(overflow)?;
            calendar(start, end)
        }
        WindowKind::Weekly => {
            let back = i64::from(zoned.weekday().to_monday_zero_offset());
            let monday = zoned
                .checked_sub(back.days())
                .map_err(overflow)?
                .start_of_day()
                .map_err(overflow)?;
            let next = monday
                .checked_add(7.days())
                .map_err(overflow)?
                .start_of_day()
                .map_err(overflow)?;
            calendar(monday, next)
        }
        WindowKind::Monthly => {
            let first = zoned
                .first_of_month()
                .map_err(overflow)?
                .start_of_day()
                .map_err(overflow)?;
            let next = first
                .checked_add(1.month())
                .map_err(overflow)?
                .start_of_day()
                .map_err(overflow)?;
            calendar(first, next)
        }
        WindowKind::Rolling => {
            let period = period
                .unwrap_or(super::config::MIN_ROLLING_PERIOD)
                .as_secs() as i64;
            let count = ROLLING_BUCKETS.min(period).max(1);
            let len = (period / count).max(1);
            let current = now_s.div_euclid(len) * len;
            Window {
                buckets: (0..count).rev().map(|i| current - i * len).collect(),
                bucket_s: len,
                end_s: current + len,
                ttl_s: len * (count + 1),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn calendar_windows_follow_the_zone() {
        let berlin = TimeZone::get("Europe/Berlin").unwrap();
        // 2026-12-07 (a Monday) 23:30 UTC is already Tuesday in Berlin.
        let now = ts("2026-12-07T23:30:00Z");
        let d = at(WindowKind::Daily, None, &berlin, now).unwrap();
        assert_eq!(d.buckets, vec![ts("2026-12-07T23:00:00Z").as_second()]);
        assert_eq!(d.end_s, ts("2026-12-08T23:00:00Z").as_second());
        let w = at(WindowKind::Weekly, None, &berlin, now).unwrap();
        assert_eq!(w.buckets, vec![ts("2026-12-06T23:00:00Z").as_second()]);
        assert_eq!(w.end_s - w.buckets[0], 7 * 86_400);
        let m = at(WindowKind::Monthly, None, &berlin, now).unwrap();
        assert_eq!(m.buckets, vec![ts("2026-11-30T23:00:00Z").as_second()]);
        assert_eq!(m.end_s, ts("2026-12-31T23:00:00Z").as_second());
        // The day daylight saving ends in Berlin has 25 hours.
        let dst = at(WindowKind::Daily, None, &berlin, ts("2026-10-25T12:00:00Z")).unwrap();
        assert_eq!(dst.bucket_s, 25 * 3600);
        // UTC: the day rolls over at midnight UTC.
        let utc = at(WindowKind::Daily, None, &TimeZone::UTC, now).unwrap();
        assert_eq!(utc.end_s, ts("2026-12-08T00:00:00Z").as_second());
        assert_eq!(d.released_at(0), d.end_s);
    }

    #[test]
    fn a_rolling_window_slides_bucket_by_bucket() {
        let now = ts("2026-12-07T12:00:30Z");
        let r = at(
            WindowKind::Rolling,
            Some(Duration::from_secs(3600)),
            &TimeZone::UTC,
            now,
        )
        .unwrap();
        assert_eq!(r.buckets.len(), 60);
        assert_eq!(r.bucket_s, 60);
        assert_eq!(
            *r.buckets.last().unwrap(),
            ts("2026-12-07T12:00:00Z").as_second()
        );
        assert_eq!(r.buckets[0], ts("2026-12-07T11:01:00Z").as_second());
        // Spend of the oldest bucket leaves the window a period after it
        // began.
        assert_eq!(r.released_at(0), ts("2026-12-07T12:01:00Z").as_second());
        // A minute later the oldest bucket is gone.
        let later = at(
            WindowKind::Rolling,
            Some(Duration::from_secs(3600)),
            &TimeZone::UTC,
            ts("2026-12-07T12:01:00Z"),
        )
        .unwrap();
        assert_eq!(later.buckets[0], r.buckets[1]);
        // Under a minute: one-second counters.
        let short = at(
            WindowKind::Rolling,
            Some(Duration::from_secs(10)),
            &TimeZone::UTC,
            now,
        )
        .unwrap();
        assert_eq!((short.buckets.len(), short.bucket_s), (10, 1));
        assert_eq!(short.released_at(0), now.as_second() - 9 + 10);
    }
}
