//! Sizes with binary suffixes: `512`, `64K`, `2M`, `16T`, parsed and printed.

/// Parses a byte count as `qemu-img` does (`qemu_strtosz`): leading whitespace and one
/// `+` allowed; a decimal number with an optional fraction (`1.5`, `1.`, `.5`) and an
/// optional one-letter suffix `B` (bytes), `K`, `M`, `G`, `T`, `P` or `E` (powers of 1024,
/// either case; no `KiB` or `kB`); or `0x` and hexadecimal digits, without fraction or
/// suffix. A fraction that is not zero needs a suffix above bytes (`1.5G`; `1.0` is 1);
/// its bytes round to the nearest, a half up. Nothing may follow, not even whitespace. A
/// negative value is refused with its own message.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim_start();
    if t.starts_with('-') {
        return Err(format!("size {s:?} is negative; sizes are 0 or more bytes"));
    }
    let t = t.strip_prefix('+').unwrap_or(t);
    let bad = || format!("{s:?} is not a size (examples: 512, 64K, 1.5G, 16T, 0x1000)");
    let too_big = || format!("size {s:?} does not fit in 64 bits");
    if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        // QEMU reads `0x…` as hexadecimal bytes only: a fraction or suffix is refused.
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        return u64::from_str_radix(hex, 16).map_err(|_| too_big());
    }
    let (number, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'B' => 0,
                u => unit_shift(u).ok_or_else(|| {
                    format!("unknown size suffix {c:?} in {s:?} (B, K, M, G, T, P, E)")
                })?,
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let digits = |d: &str| d.bytes().all(|b| b.is_ascii_digit());
    let (int, frac) = match number.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (number, None),
    };
    // Digits on at least one side of the point: `1.`, `.5` and `1.5`, not `.`.
    let frac = frac.filter(|f| !f.is_empty());
    if !digits(int) || (int.is_empty() && frac.is_none()) {
        return Err(bad());
    }
    let whole: u64 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| too_big())?
    };
    let unit = 1u64 << shift;
    let mut n = whole.checked_mul(unit).ok_or_else(too_big)?;
    if let Some(f) = frac {
        if !digits(f) || f.len() > 18 {
            return Err(bad());
        }
        if shift == 0 {
            if f.bytes().all(|b| b == b'0') {
                return Ok(n);
            }
            return Err(format!("{s:?}: a fraction needs a unit (K, M, G, T, P, E)"));
        }
        // unit × 0.f rounded to the nearest byte, a half up, as QEMU's `do_strtosz`
        // rounds it (`0.5005K`, 512.512 bytes, is 513 to `qemu-img`), in integers:
        // (unit × f + 10^len / 2) / 10^len.
        let den = 10u128.pow(f.len() as u32);
        let part = (u128::from(unit) * f.parse::<u128>().map_err(|_| bad())? + den / 2) / den;
        n = n
            .checked_add(u64::try_from(part).map_err(|_| bad())?)
            .ok_or_else(too_big)?;
    }
    Ok(n)
}

/// The power of two of unit letter `u` (upper case): K, M, G, T, P, E.
fn unit_shift(u: char) -> Option<u32> {
    Some(match u {
        'K' => 10,
        'M' => 20,
        'G' => 30,
        'T' => 40,
        'P' => 50,
        'E' => 60,
        _ => return None,
    })
}

/// `1.5 GiB`-style size, for output.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn suffixes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("2M"), Ok(2 << 20));
        assert_eq!(parse_size("16T"), Ok(16 << 40));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("0.5k"), Ok(512));
        // The fraction's bytes round to the nearest, a half up, as qemu-img's.
        assert_eq!(parse_size("1.9999K"), Ok(2048));
        assert_eq!(parse_size("0.5005K"), Ok(513));
        assert_eq!(parse_size("0.5004K"), Ok(512));
        assert_eq!(parse_size("0.00048828125K"), Ok(1));
        assert_eq!(parse_size("0.00048828124K"), Ok(0));
        assert_eq!(parse_size("1b"), Ok(1));
        assert_eq!(parse_size("1B"), Ok(1));
        assert!(parse_size("1.5").is_err());
        assert!(parse_size("-1").unwrap_err().contains("negative"));
        // As qemu-img: digits on one side of the point suffice, a zero fraction needs no
        // unit, hexadecimal is bytes only, and no `KiB`, `kB` or trailing whitespace.
        assert_eq!(parse_size(".5K"), Ok(512));
        assert_eq!(parse_size("1.K"), Ok(1024));
        assert_eq!(parse_size("1."), Ok(1));
        assert_eq!(parse_size("1.0"), Ok(1));
        assert_eq!(parse_size("1.0b"), Ok(1));
        assert_eq!(parse_size(" +64K"), Ok(64 << 10));
        assert_eq!(parse_size("0x1000"), Ok(4096));
        assert_eq!(parse_size("0X1e"), Ok(30));
        for refused in [
            "1GiB", "4kB", "64K ", ".", "0x", "0x10K", "0x1.0", "00x10", "1e3",
        ] {
            assert!(parse_size(refused).is_err(), "{refused}");
        }
        assert!(parse_size("16E").is_err());
        assert!(parse_size("16X").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("K").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("17E").is_err());
    }
}
