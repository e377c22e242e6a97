//! Go's two string-quoting flavours, so error messages read exactly like the
//! reference worker's (operators grep logs for them, and the spec pins them).

use std::fmt::Write as _;

/// `strconv.Quote` (what Go's `%q` prints): printable text is kept, including
/// non-ASCII; quotes, backslashes and control characters are escaped.
pub(crate) fn strconv_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{07}' => out.push_str("\\a"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{0b}' => out.push_str("\\v"),
            c if (c as u32) < 0x80 && c.is_control() => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The `time` package's private `quote`: every byte of a non-ASCII or control
/// character becomes `\xHH`, so `ParseDuration` errors differ from `%q`.
pub(crate) fn time_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if !c.is_ascii() || c < ' ' {
            let mut buf = [0u8; 4];
            for byte in c.encode_utf8(&mut buf).bytes() {
                let _ = write!(out, "\\x{byte:02x}");
            }
        } else {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strconv_quote_matches_go() {
        assert_eq!(strconv_quote("FOO=bar"), r#""FOO=bar""#);
        assert_eq!(strconv_quote(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(strconv_quote("a\tb\n"), r#""a\tb\n""#);
        assert_eq!(strconv_quote("\u{1b}"), r#""\x1b""#);
        assert_eq!(strconv_quote("héllo"), "\"héllo\"");
    }

    #[test]
    fn time_quote_matches_go() {
        assert_eq!(time_quote("1x"), r#""1x""#);
        assert_eq!(time_quote("µ"), r#""\xc2\xb5""#);
        assert_eq!(time_quote("a\"b"), r#""a\"b""#);
        assert_eq!(time_quote("\t"), r#""\x09""#);
    }
}
