//! Kubernetes resource quantities (`10Gi`, `500M`, `1.5Gi`, `100m`, `1e3`),
//! validated with the grammar and error texts of apimachinery's
//! `resource.ParseQuantity`.

use std::{fmt, str::FromStr};

/// Why a string is not a Kubernetes quantity. Display matches apimachinery.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    /// The text is not `<signed number><suffix>`.
    #[error(
        "quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'"
    )]
    Format,
    /// Shaped like a suffix but not a known one (e.g. `mi`, `e`).
    #[error("unable to parse quantity's suffix")]
    Suffix,
}

/// A validated Kubernetes quantity.
///
/// The original spelling is kept: the API server canonicalises quantities
/// itself, and handing it the operator's text keeps logs and diffs readable.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Quantity(String);

impl Quantity {
    /// Validates `s` as a quantity.
    ///
    /// One deliberate difference from apimachinery: a number part with no
    /// digits at all (`Gi`, `-`, `.`) is rejected here, where Go reads it as
    /// zero; nobody means "zero" by writing `workspace_size_limit: Gi`.
    pub fn parse(s: &str) -> Result<Self, QuantityError> {
        let bytes = s.as_bytes();
        let mut pos = usize::from(matches!(bytes.first(), Some(b'+' | b'-')));
        let integer_digits = count_digits(&bytes[pos..]);
        pos += integer_digits;
        let mut fraction_digits = 0;
        if bytes.get(pos) == Some(&b'.') {
            pos += 1;
            fraction_digits = count_digits(&bytes[pos..]);
            pos += fraction_digits;
        }
        if integer_digits + fraction_digits == 0 {
            return Err(QuantityError::Format);
        }

        // The number part is ASCII, so `pos` is a char boundary.
        let suffix = &s[pos..];
        let letters = suffix
            .bytes()
            .take_while(|b| b"eEinumkKMGTP".contains(b))
            .count();
        let tail = suffix[letters..]
            .strip_prefix(['+', '-'])
            .unwrap_or(&suffix[letters..]);
        if !tail.bytes().all(|b| b.is_ascii_digit()) {
            return Err(QuantityError::Format);
        }
        if !is_known_suffix(suffix) {
            return Err(QuantityError::Suffix);
        }
        Ok(Self(s.to_owned()))
    }

    /// The quantity as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Quantity {
    type Err = QuantityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn count_digits(bytes: &[u8]) -> usize {
    bytes.iter().take_while(|b| b.is_ascii_digit()).count()
}

fn is_known_suffix(suffix: &str) -> bool {
    match suffix {
        // Decimal SI, then binary SI.
        "" | "n" | "u" | "m" | "k" | "M" | "G" | "T" | "P" | "E" => true,
        "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" => true,
        // Decimal exponent: `e`/`E` followed by a base-10 int32.
        _ => suffix
            .strip_prefix(['e', 'E'])
            .is_some_and(|exp| exp.parse::<i32>().is_ok()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_quantities() {
        for s in [
            "10Gi", "8Gi", "500M", "1.5Gi", "100m", "1", "0", "1e3", "1E3", "1e-3", "1E+3", "+1Ki",
            "-1Gi", ".5Gi", "5.", "1E", "12n", "3u", "2k", "1T", "1P", "1Ti", "1Pi", "1Ei",
        ] {
            let q = Quantity::parse(s).unwrap_or_else(|e| panic!("{s:?}: {e}"));
            assert_eq!(q.as_str(), s);
            assert_eq!(q.to_string(), s);
        }
    }

    #[test]
    fn rejects_garbage() {
        use QuantityError::{Format, Suffix};
        for (s, want) in [
            ("", Format),
            ("abc", Format),
            ("Gi", Format),
            ("-", Format),
            (".", Format),
            ("10 Gi", Format),
            (" 10Gi", Format),
            ("10GB", Format),
            ("10Gix", Format),
            ("1.2.3", Format),
            ("1e", Suffix),
            ("1mi", Suffix),
            ("1Ki5", Suffix),
            ("1e99999999999", Suffix),
            ("1e+", Suffix),
        ] {
            assert_eq!(Quantity::parse(s), Err(want), "{s:?}");
        }
    }

    #[test]
    fn error_texts_match_apimachinery() {
        assert_eq!(
            QuantityError::Format.to_string(),
            "quantities must match the regular expression \
             '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'"
        );
        assert_eq!(
            QuantityError::Suffix.to_string(),
            "unable to parse quantity's suffix"
        );
        assert_eq!("8Gi".parse::<Quantity>().unwrap().as_str(), "8Gi");
    }
}
