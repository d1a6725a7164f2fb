//! Sizes with binary suffixes: `512`, `64K`, `2M`, `16T`, parsed and printed; and the
//! other counts the commands parse.

use dirty_bitmap::migration::MAX_VCPUS;

/// C's `isspace` in the C locale, the whitespace `strtoull` and `strtod` skip: space, `\t`,
/// `\n`, `\v`, `\f` and `\r`; no other Unicode space (`qemu-img` refuses `"\u{a0}1K"`).
fn c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// The power of two of size suffix `c` (either case): `B` 0, then `K`, `M`, `G`, `T`, `P`
/// and `E`.
fn suffix_shift(c: u8) -> Option<u32> {
    Some(match c.to_ascii_uppercase() {
        b'B' => 0,
        b'K' => 10,
        b'M' => 20,
        b'G' => 30,
        b'T' => 40,
        b'P' => 50,
        b'E' => 60,
        _ => return None,
    })
}

/// Parses a byte count exactly as `qemu-img` does (`qemu_strtosz`, QEMU's `do_strtosz` in
/// util/cutils.c since 8.1): C-locale leading whitespace and one `+` allowed; a decimal
/// integer with an optional fraction (`1.5`, `1.`, `.5`) and an optional one-letter suffix
/// `B` (bytes), `K`, `M`, `G`, `T`, `P` or `E` (powers of 1024, either case; no `KiB` or
/// `kB`); or `0x` and hexadecimal digits, without fraction or suffix. Nothing may follow,
/// not even whitespace. A negative value is refused with its own message.
///
/// The fraction is QEMU's fixed point, not the exact decimal: its digits (any number of
/// them) read as a double, correctly rounded as glibc's `strtod` rounds; a double that
/// rounded to 1 adds one to the integer (`0.99999999999999999` is 1 byte); any other is
/// truncated to 64 binary places (at least 2^-64 if a digit is not zero), multiplied by the
/// unit, and the bytes rounded to the nearest, a half up. A fraction with a digit not zero
/// needs a suffix above bytes (`1.5G`; `1.0` is 1). The result must fit in 64 bits.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let b = s.as_bytes();
    let at = |j: usize| b.get(j).copied();
    let digits_from = |j: usize| b[j..].iter().take_while(|c| c.is_ascii_digit()).count();
    let bad = || format!("{s:?} is not a size (examples: 512, 64K, 1.5G, 16T, 0x1000)");
    let too_big = || format!("size {s:?} does not fit in 64 bits");
    // strtoull's (and strtod's) prefix: whitespace, then one optional sign.
    let mut i = b.iter().take_while(|&&c| c_space(c)).count();
    let sign = at(i);
    if matches!(sign, Some(b'+' | b'-')) {
        i += 1;
    }
    let n_int = digits_from(i);
    let mut end = i + n_int;
    if sign == Some(b'-') {
        // QEMU: ERANGE for a number after the minus (`-1`, `-0`, `-.5K`), else EINVAL.
        let number =
            n_int > 0 || (at(i) == Some(b'.') && at(i + 1).is_some_and(|c| c.is_ascii_digit()));
        return Err(if number {
            format!("size {s:?} is negative; sizes are 0 or more bytes")
        } else {
            bad()
        });
    }
    let int = &s[i..end];
    if n_int > 0 && int.bytes().all(|c| c == b'0') && matches!(at(end), Some(b'x' | b'X')) {
        // Hexadecimal bytes: strtoull base 16 takes `0x` only after a single `0` and only
        // with a hex digit after it (else it stops at the `x`); a fraction, a suffix or
        // anything else after the digits is refused.
        let hex = &s[end + 1..];
        if int.len() != 1 || hex.is_empty() || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad());
        }
        return u64::from_str_radix(hex, 16).map_err(|_| too_big());
    }
    let mut whole: u64 = if n_int == 0 {
        0
    } else {
        int.parse().map_err(|_| too_big())?
    };
    // The fraction as QEMU's 0.64 fixed point.
    let mut valf: u64 = 0;
    if at(end) == Some(b'.') {
        let n_frac = digits_from(end + 1);
        if n_frac == 0 {
            // `1.` and `1.K`: the point alone, after digits (`.` and `.K` are no number).
            if n_int == 0 {
                return Err(bad());
            }
            end += 1;
        } else {
            let frac = &s[end + 1..end + 1 + n_frac];
            end += 1 + n_frac;
            if frac.bytes().any(|c| c != b'0') {
                // Rust's float parser is correctly rounded (ties to even), as glibc's strtod.
                let f: f64 = format!("0.{frac}").parse().map_err(|_| bad())?;
                if f == 1.0 {
                    whole = whole.checked_add(1).ok_or_else(too_big)?;
                } else {
                    // f < 1, so f × 2^64 < 2^64 (exact: a power of two); truncated as C's
                    // cast; a fraction too small for 64 places (or that underflowed to 0,
                    // strtod's ERANGE) still counts as one that is not zero.
                    valf = ((f * 18_446_744_073_709_551_616.0) as u64).max(1);
                }
            }
        }
    } else if n_int == 0 {
        return Err(bad());
    }
    let shift = match at(end).and_then(suffix_shift) {
        Some(sh) => {
            end += 1;
            sh
        }
        None => 0,
    };
    if end != b.len() {
        let rest = &s[end..];
        return Err(match rest.chars().next() {
            Some(c) if c.is_ascii_alphabetic() && rest.len() == 1 => {
                format!("unknown size suffix {c:?} in {s:?} (B, K, M, G, T, P, E)")
            }
            _ => bad(),
        });
    }
    if shift == 0 {
        if valf != 0 {
            return Err(format!("{s:?}: a fraction needs a unit (K, M, G, T, P, E)"));
        }
        return Ok(whole);
    }
    // 64.64 × unit, exact in 128 bits (both parts < 2^124), rounded on the fraction's
    // first binary place, as QEMU's `mulu64` pair and `valf >> 63`.
    let frac_bytes = u128::from(valf) << shift;
    let total =
        (u128::from(whole) << shift) + (frac_bytes >> 64) + u128::from((frac_bytes as u64) >> 63);
    u64::try_from(total).map_err(|_| too_big())
}

/// A vCPU count for `--vcpus`: 1 to [`MAX_VCPUS`], refused at parsing (before any image
/// is opened) where a huge count would fail the workload's start after the activation.
pub fn vcpus(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=MAX_VCPUS).contains(&n) => Ok(n),
        _ => Err(format!("{s}: a vCPU count from 1 to {MAX_VCPUS}")),
    }
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

    /// The fraction is read as QEMU reads it, a double and a 64-bit fixed point. Read as an
    /// exact decimal of at most 18 digits, some sizes would be a byte off `qemu-img`'s
    /// (`0.15598P` would make an image 512 bytes smaller once rounded up to a sector), long
    /// fractions would be refused, and Unicode spaces skipped. The values are what QEMU
    /// 10.0.2 reads (`qemu-io --image-opts driver=null-co,size=4611686018427387904 -c 'read
    /// SIZE 0'` prints them as the offset), and the cases of QEMU's
    /// tests/unit/test-cutils.c.
    #[test]
    fn fractions_are_read_as_qemu_reads_them() {
        for (s, qemu) in [
            ("0.15598P", 175_617_867_469_313),
            ("0.27P", 303_992_974_847_509),
            ("1.512518T", 1_663_031_128_221),
            ("0.1E", 115_292_150_460_684_704),
            ("0.7T", 769_658_139_443),
            ("0.1K", 102),
            ("0.3333333333333333333333333K", 341),
            ("12.345M", 12_944_671),
            ("1.0000000000000000000", 1),
            ("0.99999999999999999", 1),
            ("1.5000000000000000000K", 1536),
            ("0.9999999999999999999999K", 1024),
            (
                "1.9999999999999999999999999999999999999999999999999999k",
                2048,
            ),
            ("0.000488281249999999999K", 1),
            ("0.0004882812500000001K", 1),
            ("2.000000000000000000000000001E", 1 << 61),
            ("3.99999999999999999999E", 1 << 62),
            ("0.5E", 1 << 59),
            ("1e", 1 << 60),
            ("1.e", 1 << 60),
            ("1.5e", 3 << 59),
            ("+.5K", 512),
            (" .5k", 512),
            ("\t\n\x0b\x0c\r 1K", 1024),
            ("18446744073709551615", u64::MAX),
        ] {
            assert_eq!(parse_size(s), Ok(qemu), "{s:?}");
        }
        let underflow = format!("1.{}1", "0".repeat(350));
        assert_eq!(parse_size(&format!("{underflow}k")), Ok(1024));
        for refused in [
            "15.99999999999999999E",
            "15.9999999999999999999999999999999999999999999999999999E",
            "16E",
            "18446744073709551616",
            "\u{a0}1K",
            "\u{2003}1K",
            "1.00000000000000000001B",
            "1.1",
            " .",
            " .k",
            "inf",
            "NaN",
            "0.NaN",
            "0b1000",
            "0x1.8k",
            "0x18M",
            "0x1p1",
            "1.1.k",
            "1.5e1k",
            "1.5E+0k",
            " -0",
            " -.0",
            "-.1k",
            "123-45",
            "1k ",
        ] {
            assert!(parse_size(refused).is_err(), "{refused:?}");
        }
        assert!(parse_size(&format!("{underflow}B")).is_err());
    }
}
