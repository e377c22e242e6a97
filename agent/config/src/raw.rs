//! The raw Kubernetes subtrees of the config (`pod_template`,
//! `preflight_resources`). The reference converts them YAML → JSON and
//! decodes them into Kubernetes types, ignoring unknown fields. ozfleet has no
//! Kubernetes type definitions here, so it converts to JSON the same way and
//! checks the shape it can check without them.

use serde_json::{Map, Number, Value as Json};
use serde_yaml::Value as Yaml;

use crate::quantity::Quantity;

/// Converts YAML to JSON as sigs.k8s.io/yaml does: tags are dropped and
/// scalar mapping keys become strings. Fails for values JSON cannot hold
/// (non-finite floats, sequences or mappings as keys).
pub(crate) fn yaml_to_json(value: &Yaml) -> Result<Json, String> {
    Ok(match value {
        Yaml::Null => Json::Null,
        Yaml::Bool(b) => Json::Bool(*b),
        Yaml::Number(n) => Json::Number(json_number(n)?),
        Yaml::String(s) => Json::String(s.clone()),
        Yaml::Sequence(items) => {
            Json::Array(items.iter().map(yaml_to_json).collect::<Result<_, _>>()?)
        }
        Yaml::Mapping(mapping) => {
            let mut object = Map::with_capacity(mapping.len());
            for (key, value) in mapping {
                object.insert(json_key(key)?, yaml_to_json(value)?);
            }
            Json::Object(object)
        }
        Yaml::Tagged(tagged) => yaml_to_json(&tagged.value)?,
    })
}

fn json_number(n: &serde_yaml::Number) -> Result<Number, String> {
    if let Some(i) = n.as_i64() {
        Ok(i.into())
    } else if let Some(u) = n.as_u64() {
        Ok(u.into())
    } else {
        n.as_f64()
            .and_then(Number::from_f64)
            .ok_or_else(|| format!("unsupported number {n} (JSON has no NaN or infinity)"))
    }
}

fn json_key(key: &Yaml) -> Result<String, String> {
    match key {
        Yaml::String(s) => Ok(s.clone()),
        Yaml::Number(n) => Ok(n.to_string()),
        Yaml::Bool(b) => Ok(b.to_string()),
        Yaml::Null => Ok("null".to_owned()),
        Yaml::Tagged(tagged) => json_key(&tagged.value),
        Yaml::Sequence(_) | Yaml::Mapping(_) => Err("mapping keys must be scalars".to_owned()),
    }
}

/// `pod_template` must be a PodSpec object.
pub(crate) fn pod_template(value: &Yaml) -> Result<Json, String> {
    let json = yaml_to_json(value)?;
    expect_object(&json, "PodSpec")?;
    Ok(json)
}

/// `preflight_resources` must be a ResourceRequirements object whose
/// `limits` and `requests` map resource names to valid quantities, which is
/// what the Kubernetes decoder would reject otherwise.
pub(crate) fn preflight_resources(value: &Yaml) -> Result<Json, String> {
    let json = yaml_to_json(value)?;
    let object = expect_object(&json, "ResourceRequirements")?;
    for field in ["limits", "requests"] {
        match object.get(field) {
            None | Some(Json::Null) => {}
            Some(Json::Object(resources)) => {
                for (name, quantity) in resources {
                    check_quantity(field, name, quantity)?;
                }
            }
            Some(other) => {
                return Err(format!(
                    "{field}: expected a mapping of resource names to quantities, got {}",
                    kind(other)
                ));
            }
        }
    }
    match object.get("claims") {
        None | Some(Json::Null | Json::Array(_)) => Ok(json),
        Some(other) => Err(format!("claims: expected a list, got {}", kind(other))),
    }
}

fn check_quantity(field: &str, name: &str, quantity: &Json) -> Result<(), String> {
    // Kubernetes quantities decode from JSON strings and from bare numbers.
    let text = match quantity {
        Json::String(s) => s.clone(),
        Json::Number(n) => n.to_string(),
        Json::Null => return Ok(()),
        other => {
            return Err(format!(
                "{field}.{name}: expected a quantity, got {}",
                kind(other)
            ));
        }
    };
    Quantity::parse(&text)
        .map(drop)
        .map_err(|e| format!("{field}.{name} {}: {e}", crate::quote::strconv_quote(&text)))
}

fn expect_object<'a>(json: &'a Json, type_name: &str) -> Result<&'a Map<String, Json>, String> {
    json.as_object().ok_or_else(|| {
        format!(
            "expected a mapping (Kubernetes {type_name}), got {}",
            kind(json)
        )
    })
}

fn kind(json: &Json) -> &'static str {
    match json {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "a list",
        Json::Object(_) => "a mapping",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(text: &str) -> Yaml {
        serde_yaml::from_str(text).unwrap()
    }

    #[test]
    fn converts_like_sigs_yaml() {
        let json = yaml_to_json(&yaml(
            "a: 1\nb: [true, 1.5, ~, text]\n1: int key\ntrue: bool key\nc: !custom 7\nd: 18446744073709551615\n",
        ))
        .unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "a": 1,
                "b": [true, 1.5, null, "text"],
                "1": "int key",
                "true": "bool key",
                "c": 7,
                "d": 18_446_744_073_709_551_615_u64,
            })
        );
    }

    #[test]
    fn rejects_what_json_cannot_hold() {
        assert!(
            yaml_to_json(&yaml("a: .inf"))
                .unwrap_err()
                .contains("infinity")
        );
        assert_eq!(
            yaml_to_json(&yaml("? [a]\n: b\n")).unwrap_err(),
            "mapping keys must be scalars"
        );
    }

    #[test]
    fn pod_template_must_be_a_mapping() {
        assert_eq!(
            pod_template(&yaml("[a]")).unwrap_err(),
            "expected a mapping (Kubernetes PodSpec), got a list"
        );
        assert!(pod_template(&yaml("serviceAccountName: oz")).is_ok());
    }

    #[test]
    fn preflight_resources_checks_quantities() {
        let ok = preflight_resources(&yaml(
            "requests: {cpu: 10m, memory: 16Mi}\nlimits: {cpu: 1, memory: 0.5Gi}\nunknownField: kept\n",
        ))
        .unwrap();
        assert_eq!(ok["limits"]["cpu"], 1);
        assert_eq!(ok["unknownField"], "kept");

        assert_eq!(
            preflight_resources(&yaml("limits: {cpu: 1mi}")).unwrap_err(),
            "limits.cpu \"1mi\": unable to parse quantity's suffix"
        );
        assert_eq!(
            preflight_resources(&yaml("requests: [cpu]")).unwrap_err(),
            "requests: expected a mapping of resource names to quantities, got a list"
        );
        assert_eq!(
            preflight_resources(&yaml("requests: {cpu: [1]}")).unwrap_err(),
            "requests.cpu: expected a quantity, got a list"
        );
        assert_eq!(
            preflight_resources(&yaml("claims: x")).unwrap_err(),
            "claims: expected a list, got a string"
        );
        assert_eq!(
            preflight_resources(&yaml("10m")).unwrap_err(),
            "expected a mapping (Kubernetes ResourceRequirements), got a string"
        );
    }
}
