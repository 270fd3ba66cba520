//! Ids, free text, stored JSON and timestamps: each parsed with the rules its JSON Schema states.

use std::borrow::Cow;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use super::rules;

/// Longest accepted id, in characters.
pub const MAX_ID_CHARS: usize = 255;

/// Longest accepted free text, in characters.
pub const MAX_TEXT_CHARS: usize = 65_536;

/// An agent, session or connection id: 1 to 255 characters, no control characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Ident(String);

impl schemars::JsonSchema for Ident {
    fn schema_name() -> Cow<'static, str> {
        "Ident".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "An agent, session or connection id: 1 to 255 characters, no control characters.",
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_ID_CHARS,
            "pattern": rules::NO_CONTROL
        })
    }
}

impl Ident {
    /// Parses an id, saying what is wrong with it.
    pub fn parse(s: impl Into<String>) -> Result<Self, String> {
        let s = s.into();
        if s.is_empty() {
            return Err("must not be empty".into());
        }
        if s.chars().count() > MAX_ID_CHARS {
            return Err(format!("longer than {MAX_ID_CHARS} characters"));
        }
        if s.chars().any(char::is_control) {
            return Err("contains a control character".into());
        }
        Ok(Self(s))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Ident {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ident::parse(s).map_err(serde::de::Error::custom)
    }
}

/// Free text stored as given (name, description, error message): no NUL, at most 65536 characters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Text(String);

impl schemars::JsonSchema for Text {
    fn schema_name() -> Cow<'static, str> {
        "Text".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "Free text stored as given: no NUL character, at most 65536 characters.",
            "type": "string",
            "maxLength": MAX_TEXT_CHARS,
            "pattern": rules::NO_NUL
        })
    }
}

impl Text {
    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// The text, owned.
    pub fn into_string(self) -> String {
        self.0
    }
}

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.contains('\0') {
            return Err(serde::de::Error::custom("contains a NUL character"));
        }
        if s.chars().count() > MAX_TEXT_CHARS {
            return Err(serde::de::Error::custom(format!("longer than {MAX_TEXT_CHARS} characters")));
        }
        Ok(Text(s))
    }
}

/// Any JSON value stored as given (`payload`, `client_info`, `result`, `instruction_metadata`; with `T` = an object's
/// map, `experimental_parameters`), refused at the edge when PostgreSQL `jsonb` could not store it: a NUL character
/// (`\u0000`) in a string or a key.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(transparent)]
pub struct Json<T = Value>(pub T);

/// Any JSON value with no NUL character in a string or a key.
impl schemars::JsonSchema for Json<Value> {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> Cow<'static, str> {
        "JsonValue".into()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        rules::json_value(generator)
    }
}

/// A JSON object with no NUL character in a string or a key.
impl schemars::JsonSchema for Json<Map<String, Value>> {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> Cow<'static, str> {
        "JsonObject".into()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        rules::json_object(generator)
    }
}

impl<T> Json<T> {
    /// The value.
    pub fn get(&self) -> &T {
        &self.0
    }
}

impl Json<Map<String, Value>> {
    /// The object as a JSON value.
    pub fn to_value(&self) -> Value {
        Value::Object(self.0.clone())
    }
}

/// Whether a JSON value holds a NUL character in a string or a key.
pub fn has_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(has_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}

impl<'de, T: serde::de::DeserializeOwned> Deserialize<'de> for Json<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        if has_nul(&v) {
            return Err(serde::de::Error::custom("contains a NUL character (\\u0000), which jsonb cannot store"));
        }
        T::deserialize(v).map(Json).map_err(serde::de::Error::custom)
    }
}

/// An instant read from RFC 3339 text; one without an offset is taken as UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Timestamp(pub DateTime<Utc>);

impl schemars::JsonSchema for Timestamp {
    fn schema_name() -> Cow<'static, str> {
        "Timestamp".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "An instant in RFC 3339 text; one without an offset is taken as UTC.",
            "type": "string",
            "pattern": rules::TIMESTAMP
        })
    }
}

impl Timestamp {
    /// Parses RFC 3339, or RFC 3339 without its offset (read as UTC): nothing looser, so that the schema's
    /// pattern can state what is accepted.
    pub fn parse(s: &str) -> Result<Self, String> {
        let parsed = DateTime::parse_from_rfc3339(s).or_else(|e| {
            // Without an offset, the text is RFC 3339 once `Z` is added; with one, adding `Z` spoils it.
            DateTime::parse_from_rfc3339(&format!("{s}Z")).map_err(|_| e)
        });
        match parsed {
            Ok(t) => Ok(Self(t.with_timezone(&Utc))),
            Err(_) => Err(format!("`{s}` is not an RFC 3339 timestamp")),
        }
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Timestamp::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Deserializes a field that may be absent (outer `None`), `null` (`Some(None)`) or a value.
pub fn double_option<'de, T, D>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    T: Deserialize<'de>,
    D: Deserializer<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        assert!(Ident::parse("agent-1").is_ok());
        assert!(Ident::parse("").is_err());
        assert!(Ident::parse("a\0b").is_err());
        assert!(Ident::parse("x".repeat(256)).is_err());
    }

    #[test]
    fn timestamps_without_offset_are_utc() {
        let a = Timestamp::parse("2026-01-02T03:04:05").unwrap();
        let b = Timestamp::parse("2026-01-02T03:04:05Z").unwrap();
        let c = Timestamp::parse("2026-01-02T05:04:05+02:00").unwrap();
        assert_eq!(a, b);
        assert_eq!(b, c);
        assert!(Timestamp::parse("yesterday").is_err());
    }
}
