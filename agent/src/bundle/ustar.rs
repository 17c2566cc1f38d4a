//! Strict parsing of the 512-byte ustar headers of a bundle.
//!
//! Hand-written instead of `tar::Archive` because a bundle reader must refuse, not interpret:
//! pax and GNU extension headers (which could rename entries or change sizes), links,
//! directories, prefixes, and any header whose checksum or numeric fields are not exact. With
//! the checksum, zero padding and strict numbers, no single flipped bit in a header goes
//! unnoticed. Names are compared byte for byte and never used as paths.

use super::BundleError;

/// Size of a tar block (header or data unit).
pub(super) const BLOCK: usize = 512;

/// Bytes of padding that follow `size` content bytes to reach a block boundary.
pub(super) fn padding(size: u64) -> u64 {
    (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64
}

/// Checks a header block for entry number `index`, which must be a regular file named
/// `expected`, and returns its size. `max` caps the size before anything of the content is read.
pub(super) fn parse_header(
    block: &[u8; BLOCK],
    index: usize,
    expected: &'static str,
    max: Option<u64>,
) -> Result<u64, BundleError> {
    let invalid = |reason: String| BundleError::TarHeader {
        index,
        expected,
        reason,
    };
    if block.iter().all(|&b| b == 0) {
        return Err(invalid("end-of-archive block instead of an entry".into()));
    }

    let stored = parse_checksum(&block[148..156])
        .ok_or_else(|| invalid("checksum field is not an octal number".into()))?;
    let computed: u64 = block
        .iter()
        .enumerate()
        .map(|(i, &b)| if (148..156).contains(&i) { 32 } else { u64::from(b) })
        .sum();
    if stored != computed {
        return Err(invalid(format!(
            "checksum mismatch (header says {stored}, computed {computed})"
        )));
    }

    match (&block[257..263], &block[263..265]) {
        (b"ustar\0", b"00") => {}
        (b"ustar ", b" \0") => {
            return Err(invalid("GNU tar header; only ustar is accepted".into()));
        }
        _ => return Err(invalid("not a ustar header".into())),
    }

    let typeflag = block[156];
    if typeflag != b'0' && typeflag != 0 {
        return Err(invalid(format!(
            "entry type {:?} is not a regular file (pax/GNU extension headers, links and directories are refused)",
            char::from(typeflag)
        )));
    }

    let name = &block[0..100];
    let name_ok = name.starts_with(expected.as_bytes())
        && name[expected.len()..].iter().all(|&b| b == 0)
        && block[345..500].iter().all(|&b| b == 0);
    if !name_ok {
        let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        let mut found = String::from_utf8_lossy(&name[..end]).into_owned();
        if block[345] != 0 {
            found.insert_str(0, "<prefix>/");
        }
        return Err(BundleError::EntryName {
            index,
            expected,
            found,
        });
    }
    if block[157..257].iter().any(|&b| b != 0) {
        return Err(invalid("link name set on a regular file".into()));
    }
    if block[500..].iter().any(|&b| b != 0) {
        return Err(invalid("non-zero bytes in the unused header tail".into()));
    }

    let size =
        parse_size(&block[124..136]).ok_or_else(|| invalid("size field is not a valid number".into()))?;
    if let Some(max) = max
        && size > max
    {
        return Err(BundleError::EntryTooLarge {
            entry: expected,
            size,
            max,
        });
    }
    Ok(size)
}

/// The checksum field in one of its two canonical forms: seven digits and NUL (`tar` crate,
/// POSIX) or six digits, NUL and space (GNU tar). The field is outside its own sum, so any other
/// leniency would let a flipped terminator bit pass unnoticed.
fn parse_checksum(field: &[u8]) -> Option<u64> {
    let canonical = matches!(&field[6..], [d, 0] if (b'0'..=b'7').contains(d)) || &field[6..] == b"\0 ";
    if canonical { parse_octal(field) } else { None }
}

/// Strict octal: at least one digit first (no leading spaces), then only NUL or space.
fn parse_octal(field: &[u8]) -> Option<u64> {
    let digits = field.iter().take_while(|b| (b'0'..=b'7').contains(b)).count();
    if digits == 0 || field[digits..].iter().any(|&b| b != 0 && b != b' ') {
        return None;
    }
    field[..digits].iter().try_fold(0u64, |acc, &b| {
        acc.checked_mul(8)?.checked_add(u64::from(b - b'0'))
    })
}

/// Size field: octal, or GNU base-256 (high bit set) for sizes of 8 GiB and more, as written by
/// the `tar` crate and GNU tar. Negative or over-wide base-256 values are refused.
fn parse_size(field: &[u8]) -> Option<u64> {
    if field[0] & 0x80 == 0 {
        return parse_octal(field);
    }
    if field[0] != 0x80 || field[1..field.len() - 8].iter().any(|&b| b != 0) {
        return None;
    }
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&field[field.len() - 8..]);
    Some(u64::from_be_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(name: &str, size: u64) -> [u8; BLOCK] {
        let mut h = tar::Header::new_ustar();
        h.set_path(name).unwrap();
        h.set_size(size);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        *h.as_bytes()
    }

    #[test]
    fn parses_tar_crate_headers_including_base256_sizes() {
        assert_eq!(
            parse_header(&header("image", 1234), 2, "image", None).unwrap(),
            1234
        );
        let big = 20 * 1024 * 1024 * 1024;
        assert_eq!(
            parse_header(&header("image", big), 2, "image", None).unwrap(),
            big
        );
    }

    #[test]
    fn refuses_leading_space_in_checksum_and_any_single_bit_flip() {
        let good = header("manifest.json", 100);
        for byte in 0..BLOCK {
            for bit in 0..8 {
                let mut h = good;
                h[byte] ^= 1 << bit;
                assert!(
                    parse_header(&h, 0, "manifest.json", None).is_err(),
                    "flip at {byte}:{bit} accepted"
                );
            }
        }
    }

    #[test]
    fn refuses_names_that_merely_start_right_and_pax_headers() {
        let err = parse_header(&header("manifest.jsonx", 1), 0, "manifest.json", None);
        assert!(matches!(err, Err(BundleError::EntryName { .. })));
        let mut pax = header("manifest.json", 1);
        pax[156] = b'x';
        let mut h = tar::Header::from_byte_slice(&pax).clone();
        h.set_cksum();
        let err = parse_header(h.as_bytes(), 0, "manifest.json", None);
        assert!(matches!(err, Err(BundleError::TarHeader { .. })), "{err:?}");
    }
}
