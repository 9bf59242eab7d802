//! Proleptic Gregorian calendar arithmetic on days since 1970-01-01, in whole integers (the
//! well-known era/day-of-era method: 400-year eras of 146,097 days, years starting in March so
//! the leap day comes last).

/// Days from 0000-03-01 to 1970-01-01.
const EPOCH_SHIFT: i64 = 719_468;
/// Days in a 400-year era.
const ERA_DAYS: i64 = 146_097;

/// A calendar date: year, month 1..=12, day 1..=31.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Date {
    pub year: i64,
    pub month: u8,
    pub day: u8,
}

/// The date `days` days after 1970-01-01 (before it when negative).
pub fn date_from_days(days: i64) -> Date {
    let z = days.saturating_add(EPOCH_SHIFT);
    let era = z.div_euclid(ERA_DAYS);
    let doe = z.rem_euclid(ERA_DAYS); // 0..=146_096
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // 0..=399
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // 0..=365, from March 1st
    let mp = (5 * doy + 2) / 153; // 0..=11, March = 0
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    Date {
        year,
        // Both are in range by construction; the fallbacks are never taken.
        month: u8::try_from(month).unwrap_or(1),
        day: u8::try_from(day).unwrap_or(1),
    }
}

/// Days from 1970-01-01 to `date`. A day past the end of its month rolls into the next one,
/// as the arithmetic goes; the month must be 1..=12 (it is clamped).
pub fn days_from_date(date: Date) -> i64 {
    let month = i64::from(date.month.clamp(1, 12));
    let year = date.year - i64::from(month <= 2);
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let mp = (month + 9) % 12; // March = 0
    let doy = (153 * mp + 2) / 5 + i64::from(date.day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * ERA_DAYS + doe - EPOCH_SHIFT
}

/// Day of the week of the day `days` after 1970-01-01 (a Thursday): 1 = Sunday ..= 7 = Saturday,
/// as the RTC counts.
pub fn weekday_from_days(days: i64) -> u8 {
    // rem_euclid(7) is 0..=6.
    u8::try_from((days + 4).rem_euclid(7)).unwrap_or(0) + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn date(year: i64, month: u8, day: u8) -> Date {
        Date { year, month, day }
    }

    #[test]
    fn known_dates() {
        let cases = [
            (0, date(1970, 1, 1), 5),
            (-1, date(1969, 12, 31), 4),
            (10_957, date(2000, 1, 1), 7),
            (11_016, date(2000, 2, 29), 3),
            (11_017, date(2000, 3, 1), 4),
            (19_782, date(2024, 2, 29), 5),
            (47_541, date(2100, 3, 1), 2),
            (-719_468, date(0, 3, 1), 4),
            (2_932_896, date(9999, 12, 31), 6),
        ];
        for (days, d, weekday) in cases {
            assert_eq!(date_from_days(days), d, "{days}");
            assert_eq!(days_from_date(d), days, "{d:?}");
            assert_eq!(weekday_from_days(days), weekday, "{d:?}");
        }
    }

    #[test]
    fn round_trip_over_centuries() {
        let mut prev = date_from_days(-800_000);
        for days in -799_999..800_000 {
            let d = date_from_days(days);
            assert_eq!(days_from_date(d), days);
            assert!((1..=12).contains(&d.month) && (1..=31).contains(&d.day));
            if d.day != 1 {
                assert_eq!(
                    (d.year, d.month, d.day - 1),
                    (prev.year, prev.month, prev.day)
                );
            }
            prev = d;
        }
    }

    #[test]
    fn overflowing_days_roll_over_and_extremes_do_not_panic() {
        assert_eq!(
            date_from_days(days_from_date(date(2023, 2, 31))),
            date(2023, 3, 3)
        );
        assert_eq!(
            days_from_date(date(2023, 0, 1)),
            days_from_date(date(2023, 1, 1))
        );
        let _ = date_from_days(i64::MAX);
        let _ = date_from_days(i64::MIN);
        let _ = weekday_from_days(i64::MIN);
    }
}
