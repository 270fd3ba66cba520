//! The rules of the domain types in the words of JSON Schema: the patterns and schemas that `schema/` publishes, so
//! that a client validating against it accepts exactly what the parsers in [`super`] accept.
//!
//! JSON Schema counts a string's length in characters (Unicode code points), and validators do not enforce
//! `format` unless asked, so every rule is stated with `minLength`/`maxLength` (the parsers count characters too)
//! and a `pattern`. A timestamp has no `format: date-time`: RFC 3339 requires an offset, the worker does not.

use schemars::{json_schema, Schema, SchemaGenerator};
use serde::{Deserialize, Deserializer};

/// No control character (Unicode category Cc, what `char::is_control` tests).
pub const NO_CONTROL: &str = r"^[^\u0000-\u001F\u007F-\u009F]*$";

/// No NUL character (PostgreSQL `text` and `jsonb` cannot store one).
pub const NO_NUL: &str = r"^[^\u0000]*$";

/// RFC 3339 date-time, the offset optional (without one the time is UTC), as `Timestamp::parse` reads it: the
/// days of each month (29 February in leap years only), hours to 23, a leap second `60`, `T`, `t` or a space.
pub const TIMESTAMP: &str = concat!(
    r"^([0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])|[0-9]{4}-(0[13-9]|1[0-2])-(29|30)",
    r"|[0-9]{4}-(0[13578]|1[02])-31|([0-9]{2}(0[48]|[2468][048]|[13579][26])|([02468][048]|[13579][26])00)-02-29)",
    r"[Tt ]([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])?$"
);

/// A UUID in any form the `uuid` crate parses: hyphenated, simple (32 hex digits), braced or URN.
pub const UUID: &str = concat!(
    r"^([0-9A-Fa-f]{32}|[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}",
    r"|\{[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}\}",
    r"|[Uu][Rr][Nn]:[Uu][Uu][Ii][Dd]:[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12})$"
);

/// The name of the definition of a JSON value without a NUL character.
const JSON_VALUE: &str = "JsonValue";

/// A reference to the definition of any JSON value without a NUL character in a string or a key, adding it to the
/// generator's definitions.
pub fn json_value(generator: &mut SchemaGenerator) -> Schema {
    let def = json_schema!({
        "description": "Any JSON value without a NUL character (\\u0000) in a string or a key (jsonb cannot store one).",
        "anyOf": [
            { "type": ["null", "boolean", "number"] },
            { "type": "string", "pattern": NO_NUL },
            { "type": "array", "items": { "$ref": format!("#/$defs/{JSON_VALUE}") } },
            {
                "type": "object",
                "propertyNames": { "pattern": NO_NUL },
                "additionalProperties": { "$ref": format!("#/$defs/{JSON_VALUE}") }
            }
        ]
    });
    generator.definitions_mut().insert(JSON_VALUE.into(), def.to_value());
    json_schema!({ "$ref": format!("#/$defs/{JSON_VALUE}") })
}

/// A JSON object whose keys and values hold no NUL character.
pub fn json_object(generator: &mut SchemaGenerator) -> Schema {
    let value = json_value(generator);
    json_schema!({ "type": "object", "propertyNames": { "pattern": NO_NUL }, "additionalProperties": value })
}

/// A UUID string, in any form the parser reads.
pub fn uuid(_: &mut SchemaGenerator) -> Schema {
    json_schema!({ "type": "string", "format": "uuid", "pattern": UUID })
}

/// Deserializes an optional integer the way JSON Schema's `integer` reads one: any number without a fractional part
/// (`3` or `3.0`), refused when out of `T`'s range.
pub fn optional_integer<'de, T, D>(d: D) -> Result<Option<T>, D::Error>
where
    T: TryFrom<i128>,
    D: Deserializer<'de>,
{
    let Some(n) = Option::<serde_json::Number>::deserialize(d)? else {
        return Ok(None);
    };
    let whole = match (n.as_i64(), n.as_u64(), n.as_f64()) {
        (Some(i), _, _) => Some(i128::from(i)),
        (_, Some(u), _) => Some(i128::from(u)),
        (_, _, Some(f)) if f.fract() == 0.0 && f.abs() < 1e30 => Some(f as i128),
        _ => None,
    };
    let whole = whole.ok_or_else(|| serde::de::Error::custom(format!("`{n}` is not an integer")))?;
    T::try_from(whole).map(Some).map_err(|_| serde::de::Error::custom(format!("`{n}` is out of range")))
}
