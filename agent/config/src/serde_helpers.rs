//! Deserializers that make serde_yaml read scalars the way the reference's
//! yaml.v3 does, so configs that load there load here too.

use std::fmt;

use serde::{
    Deserialize, Deserializer,
    de::{self, Visitor},
};

/// yaml.v3 decodes `key:` / `key: ~` into a non-pointer Go field as the zero
/// value; serde_yaml would reject `null` for a `String`, `Vec` or map.
pub(crate) fn nullable<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Option::<T>::deserialize(deserializer).map(Option::unwrap_or_default)
}

/// A bool that also accepts YAML 1.1 spellings (`yes`, `off`, ...), which
/// yaml.v3 honours when the target field is a bool.
struct Yaml11Bool(bool);

impl<'de> Deserialize<'de> for Yaml11Bool {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(Yaml11BoolVisitor)
    }
}

struct Yaml11BoolVisitor;

impl Visitor<'_> for Yaml11BoolVisitor {
    type Value = Yaml11Bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a boolean")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Yaml11Bool, E> {
        Ok(Yaml11Bool(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Yaml11Bool, E> {
        match v {
            "y" | "Y" | "yes" | "Yes" | "YES" | "on" | "On" | "ON" => Ok(Yaml11Bool(true)),
            "n" | "N" | "no" | "No" | "NO" | "off" | "Off" | "OFF" => Ok(Yaml11Bool(false)),
            _ => Err(E::invalid_value(de::Unexpected::Str(v), &self)),
        }
    }
}

/// `bool` field: YAML 1.1 spellings accepted, null/absent is `false`.
pub(crate) fn yaml11_bool<'de, D: Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    Ok(Option::<Yaml11Bool>::deserialize(deserializer)?.is_some_and(|b| b.0))
}

/// `Option<bool>` field: YAML 1.1 spellings accepted, null/absent is `None`.
pub(crate) fn optional_yaml11_bool<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<bool>, D::Error> {
    Ok(Option::<Yaml11Bool>::deserialize(deserializer)?.map(|b| b.0))
}
