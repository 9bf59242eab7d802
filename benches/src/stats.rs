//! Medians, ratios, targets and their verdicts: the pure arithmetic of the report.

/// The median of `xs` (the mean of the two middle values for an even count); `None` if empty.
/// NaNs are ignored.
pub fn median(xs: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Smallest and largest value of `xs` (NaNs ignored).
pub fn min_max(xs: &[f64]) -> Option<(f64, f64)> {
    xs.iter()
        .copied()
        .filter(|x| !x.is_nan())
        .fold(None, |acc, x| match acc {
            None => Some((x, x)),
            Some((lo, hi)) => Some((lo.min(x), hi.max(x))),
        })
}

/// `a / b`, or `None` when either is missing or `b` is not positive.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 && a.is_finite() && b.is_finite() => Some(a / b),
        _ => None,
    }
}

/// A ratio for the table: `0.083×`, `0.45×`, `1.07×`, `12.3×`.
pub fn fmt_ratio(r: f64) -> String {
    let a = r.abs();
    if a >= 100.0 {
        format!("{r:.0}×")
    } else if a >= 10.0 {
        format!("{r:.1}×")
    } else if a >= 0.1 || a == 0.0 {
        format!("{r:.2}×")
    } else {
        format!("{r:.3}×")
    }
}

/// A measured value with about three significant digits and its unit: `2.61 ms`, `31.4 ms`,
/// `112 ms`, `28,312 /s`.
pub fn fmt_value(v: f64, unit: &str) -> String {
    let a = v.abs();
    let num = if a >= 10_000.0 {
        group_thousands(v.round() as i64)
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    };
    if unit.is_empty() {
        num
    } else {
        format!("{num} {unit}")
    }
}

fn group_thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

/// What a row must achieve.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Target {
    /// ferro / comparator ≤ x.
    RatioAtMost(f64),
    /// ferro / comparator ≥ x.
    RatioAtLeast(f64),
    /// ferro's own value ≤ x (in the row's unit).
    ValueAtMost(f64),
    /// Reported for information only.
    Info,
}

/// The outcome of a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail,
    Info,
    NotMeasured,
}

impl Verdict {
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Fail => "FAIL",
            Verdict::Info => "info",
            Verdict::NotMeasured => "not measured",
        }
    }
}

impl Target {
    /// The target as the table shows it; `unit` is the row's unit for absolute targets.
    pub fn describe(self, unit: &str) -> String {
        match self {
            Target::RatioAtMost(x) => format!("≤ {}", fmt_ratio(x)),
            Target::RatioAtLeast(x) => format!("≥ {}", fmt_ratio(x)),
            Target::ValueAtMost(x) => format!("≤ {}", fmt_value(x, unit)),
            Target::Info => "—".to_string(),
        }
    }

    /// Judges ferro's median `ours` against the comparator's median `theirs`.
    pub fn judge(self, ours: Option<f64>, theirs: Option<f64>) -> Verdict {
        match self {
            Target::Info => {
                if ours.is_some() || theirs.is_some() {
                    Verdict::Info
                } else {
                    Verdict::NotMeasured
                }
            }
            Target::ValueAtMost(x) => match ours {
                Some(v) if v <= x => Verdict::Pass,
                Some(_) => Verdict::Fail,
                None => Verdict::NotMeasured,
            },
            Target::RatioAtMost(x) => match ratio(ours, theirs) {
                Some(r) if r <= x => Verdict::Pass,
                Some(_) => Verdict::Fail,
                None => Verdict::NotMeasured,
            },
            Target::RatioAtLeast(x) => match ratio(ours, theirs) {
                Some(r) if r >= x => Verdict::Pass,
                Some(_) => Verdict::Fail,
                None => Verdict::NotMeasured,
            },
        }
    }
}

/// `(year, month, day, hour, minute, second)` in UTC for seconds since the Unix epoch.
pub fn utc_from_unix(secs: i64) -> (i64, u32, u32, u32, u32, u32) {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        y,
        m,
        d,
        (rem / 3600) as u32,
        (rem % 3600 / 60) as u32,
        (rem % 60) as u32,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_odd_even_empty() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[5.0]), Some(5.0));
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[f64::NAN, 1.0, 9.0, 5.0]), Some(5.0));
        assert_eq!(median(&[7.0, 1.0, 100.0, 2.0, 3.0, 4.0, 5.0]), Some(4.0));
    }

    #[test]
    fn min_max_works() {
        assert_eq!(min_max(&[]), None);
        assert_eq!(min_max(&[2.0, -1.0, 7.5]), Some((-1.0, 7.5)));
    }

    #[test]
    fn ratio_guards() {
        assert_eq!(ratio(Some(1.0), Some(4.0)), Some(0.25));
        assert_eq!(ratio(Some(1.0), Some(0.0)), None);
        assert_eq!(ratio(None, Some(1.0)), None);
        assert_eq!(ratio(Some(1.0), None), None);
    }

    #[test]
    fn ratio_formatting() {
        assert_eq!(fmt_ratio(0.0834), "0.083×");
        assert_eq!(fmt_ratio(0.45), "0.45×");
        assert_eq!(fmt_ratio(1.054), "1.05×");
        assert_eq!(fmt_ratio(12.34), "12.3×");
        assert_eq!(fmt_ratio(250.0), "250×");
        assert_eq!(fmt_ratio(0.1), "0.10×");
    }

    #[test]
    fn value_formatting() {
        assert_eq!(fmt_value(2.614, "ms"), "2.61 ms");
        assert_eq!(fmt_value(31.42, "ms"), "31.4 ms");
        assert_eq!(fmt_value(112.4, "ms"), "112 ms");
        assert_eq!(fmt_value(28312.0, "/s"), "28,312 /s");
        assert_eq!(fmt_value(1_234_567.0, ""), "1,234,567");
    }

    #[test]
    fn verdicts() {
        let t = Target::RatioAtMost(0.1);
        assert_eq!(t.judge(Some(1.0), Some(20.0)), Verdict::Pass);
        assert_eq!(t.judge(Some(3.0), Some(20.0)), Verdict::Fail);
        assert_eq!(t.judge(None, Some(20.0)), Verdict::NotMeasured);
        let t = Target::RatioAtLeast(1.05);
        assert_eq!(t.judge(Some(110.0), Some(100.0)), Verdict::Pass);
        assert_eq!(t.judge(Some(104.0), Some(100.0)), Verdict::Fail);
        let t = Target::ValueAtMost(4.0);
        assert_eq!(t.judge(Some(3.9), None), Verdict::Pass);
        assert_eq!(t.judge(Some(4.1), Some(40.0)), Verdict::Fail);
        assert_eq!(Target::Info.judge(None, None), Verdict::NotMeasured);
        assert_eq!(Target::Info.judge(Some(1.0), None), Verdict::Info);
        assert_eq!(Target::RatioAtMost(0.3).describe(""), "≤ 0.30×");
        assert_eq!(Target::ValueAtMost(4.0).describe("MiB"), "≤ 4.00 MiB");
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc_from_unix(0), (1970, 1, 1, 0, 0, 0));
        assert_eq!(utc_from_unix(951_782_400), (2000, 2, 29, 0, 0, 0));
        // 2026-11-24 07:29:52 UTC
        assert_eq!(utc_from_unix(1_795_505_392), (2026, 11, 24, 7, 29, 52));
    }
}
