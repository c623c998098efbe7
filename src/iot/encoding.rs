//! Percent-encoding as the Azure SDKs do it: everything but `A-Z a-z 0-9 - _ . ~` becomes `%XX`
//! with upper-case hex. Decoding is strict (a bad escape is an error) and treats `+` literally,
//! because SAS signatures contain `+` and form-decoding would corrupt them.

use std::fmt::Write;

/// Why a percent-encoded string could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("bad percent escape at byte {0}")]
    BadEscape(usize),
    #[error("decoded bytes are not UTF-8")]
    NotUtf8,
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~')
}

/// Encodes every byte outside the unreserved set as `%XX` (upper-case hex).
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for &b in s.as_bytes() {
        if is_unreserved(b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Decodes `%XX` escapes (either hex case); `+` stays `+`.
pub fn url_decode(s: &str) -> Result<String, DecodeError> {
    if !s.contains('%') {
        return Ok(s.to_owned());
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or(DecodeError::BadEscape(i))?;
            let hi = hex_val(hex[0]).ok_or(DecodeError::BadEscape(i))?;
            let lo = hex_val(hex[1]).ok_or(DecodeError::BadEscape(i))?;
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| DecodeError::NotUtf8)
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_like_the_sdks() {
        assert_eq!(url_encode("myhub.azure-devices.net/devices/d~1"), "myhub.azure-devices.net%2Fdevices%2Fd~1");
        assert_eq!(url_encode("a+b=c/ $"), "a%2Bb%3Dc%2F%20%24");
        assert_eq!(url_encode("dtmi:com:example:Thermostat;1"), "dtmi%3Acom%3Aexample%3AThermostat%3B1");
    }

    #[test]
    fn decodes_both_cases_and_keeps_plus() {
        assert_eq!(url_decode("a%2fb%2Fc+d").unwrap(), "a/b/c+d");
        assert_eq!(url_decode("%24.mid").unwrap(), "$.mid");
        assert_eq!(url_decode("%2").unwrap_err(), DecodeError::BadEscape(0));
        assert_eq!(url_decode("x%zz").unwrap_err(), DecodeError::BadEscape(1));
        assert_eq!(url_decode("%FF").unwrap_err(), DecodeError::NotUtf8);
    }

    #[test]
    fn round_trips_arbitrary_text() {
        for s in ["", "héllo wörld", "a&b=c%d", "\u{1F600}/x"] {
            assert_eq!(url_decode(&url_encode(s)).unwrap(), s);
        }
    }
}
