//! Sizes as users type them: `512`, `64M`, `1.5G`, `1T` (binary multiples,
//! like QEMU's `qemu_strtosz`).

use super::ImgError;

/// Parse a size: digits with an optional fraction and an optional suffix
/// (`b`, `k`/`K`, `M`, `G`, `T`, `P`, `E`; binary multiples). A fraction needs
/// a suffix, and the result must be a whole number of bytes.
pub fn parse_size(s: &str) -> Result<u64, ImgError> {
    let bad = || ImgError::usage(format!("Invalid size specified: '{s}'"));
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    if num.is_empty() || num.starts_with('.') || num.matches('.').count() > 1 {
        return Err(bad());
    }
    let shift = match suffix {
        "" | "b" | "B" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        "p" | "P" => 50,
        "e" | "E" => 60,
        _ => return Err(bad()),
    };
    let (int, frac) = match num.split_once('.') {
        Some((i, f)) => (i, f),
        None => (num, ""),
    };
    if !frac.is_empty() && shift == 0 {
        return Err(bad());
    }
    let int: u64 = int.parse().map_err(|_| bad())?;
    let whole = int.checked_mul(1u64 << shift).ok_or_else(bad)?;
    let mut extra = 0u64;
    if !frac.is_empty() {
        // Exact: frac_digits / 10^n * 2^shift must be a whole number.
        if frac.len() > 18 {
            return Err(bad());
        }
        let f: u128 = frac.parse().map_err(|_| bad())?;
        let den = 10u128.pow(frac.len() as u32);
        let num = f * (1u128 << shift);
        if num % den != 0 {
            return Err(bad());
        }
        extra = u64::try_from(num / den).map_err(|_| bad())?;
    }
    let v = whole.checked_add(extra).ok_or_else(bad)?;
    if v > i64::MAX as u64 {
        return Err(bad());
    }
    Ok(v)
}

/// QEMU's `size_to_str`: three significant digits and a binary unit ("388 KiB").
pub fn size_to_str(val: u64) -> String {
    const SUFFIXES: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    // Switch to the larger unit once the integer part reaches 1000.
    let mut i = 0usize;
    let mut v = val as f64;
    while i + 1 < SUFFIXES.len() && v >= 1000.0 {
        v /= 1024.0;
        i += 1;
    }
    format!("{} {}", fmt_g3(v), SUFFIXES[i])
}

/// C's `%0.3g` for values in [0, 1000).
fn fmt_g3(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let decimals = if v >= 100.0 {
        0
    } else if v >= 10.0 {
        1
    } else {
        2
    };
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("64k").unwrap(), 64 << 10);
        assert_eq!(parse_size("1T").unwrap(), 1 << 40);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("1.5k").unwrap(), 1536);
        for bad in ["", "-5", "1.5", "12X", "abc", "1..5G", ".5G", "16E", "0.1k"] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn human_sizes() {
        assert_eq!(size_to_str(397312), "388 KiB");
        assert_eq!(size_to_str(4 << 20), "4 MiB");
        assert_eq!(size_to_str(3 << 29), "1.5 GiB");
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(197120), "192 KiB");
    }
}
