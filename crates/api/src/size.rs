//! Memory sizes as operators write them: `512` (MiB), `512M`, `2G`, `2GiB`.

use thiserror::Error;

/// A memory size that could not be understood.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SizeError {
    /// The text is empty.
    #[error("empty size")]
    Empty,
    /// The number part is missing or not a whole number.
    #[error("'{0}' is not a size: use MiB as a number (512) or a suffix (512M, 2G)")]
    Invalid(String),
    /// The size does not fit in 64 bits of MiB.
    #[error("size '{0}' is too large")]
    Overflow(String),
}

/// Parses a memory size and returns it in MiB. A bare number is MiB; suffixes K, M, G, T (with an
/// optional `i`/`iB`/`B`, any case) are binary units. Sizes in K must be whole MiB.
pub fn parse_mib(text: &str) -> Result<u64, SizeError> {
    let t = text.trim();
    if t.is_empty() {
        return Err(SizeError::Empty);
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(SizeError::Invalid(text.to_string()));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| SizeError::Overflow(text.to_string()))?;
    let unit = unit.trim().to_ascii_lowercase();
    let unit = unit
        .strip_suffix("ib")
        .or_else(|| unit.strip_suffix('b'))
        .or_else(|| unit.strip_suffix('i'))
        .unwrap_or(&unit);
    let mib = match unit {
        "" | "m" => Some(n),
        "k" => {
            if !n.is_multiple_of(1024) {
                return Err(SizeError::Invalid(text.to_string()));
            }
            Some(n / 1024)
        }
        "g" => n.checked_mul(1024),
        "t" => n.checked_mul(1024 * 1024),
        _ => return Err(SizeError::Invalid(text.to_string())),
    };
    mib.ok_or_else(|| SizeError::Overflow(text.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(parse_mib("512"), Ok(512));
        assert_eq!(parse_mib("512M"), Ok(512));
        assert_eq!(parse_mib("512MiB"), Ok(512));
        assert_eq!(parse_mib("2G"), Ok(2048));
        assert_eq!(parse_mib("2g"), Ok(2048));
        assert_eq!(parse_mib("16GiB"), Ok(16384));
        assert_eq!(parse_mib("1T"), Ok(1 << 20));
        assert_eq!(parse_mib("2048K"), Ok(2));
    }

    #[test]
    fn rejects() {
        assert_eq!(parse_mib(""), Err(SizeError::Empty));
        assert!(matches!(parse_mib("G"), Err(SizeError::Invalid(_))));
        assert!(matches!(parse_mib("12X"), Err(SizeError::Invalid(_))));
        assert!(matches!(parse_mib("-1"), Err(SizeError::Invalid(_))));
        assert!(matches!(parse_mib("1000K"), Err(SizeError::Invalid(_))));
        assert!(matches!(
            parse_mib("99999999999999999999"),
            Err(SizeError::Overflow(_))
        ));
        assert!(matches!(
            parse_mib("18014398509481984T"),
            Err(SizeError::Overflow(_))
        ));
    }
}
