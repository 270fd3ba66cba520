//! Domain values parsed once at the edge: a value of these types is valid by construction.
//!
//! Each type's JSON Schema (in [`rules`]) states every rule its parser applies, so that `schema/` accepts exactly
//! what the worker accepts; lengths are counted in characters, as JSON Schema counts them.

pub mod rules;

use std::borrow::Cow;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

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

/// Declares a Rust enum that is also a PostgreSQL enum type: serde, JSON Schema and `ToSql`/`FromSql` read the same
/// labels, and `as_str` gives the label for logs.
macro_rules! pg_enum {
    ($(#[$meta:meta])* $name:ident = $pg:literal { $($(#[$vmeta:meta])* $variant:ident = $label:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema,
            postgres_types::ToSql,
        )]
        #[postgres(name = $pg)]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $label)] #[postgres(name = $label)] $variant),+
        }

        impl $name {
            /// The label, as in JSON and in the database.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $label),+
                }
            }
        }

        /// Read from the enum type or from `text`: the worker's statements return enum columns cast to `text`, so
        /// that tokio-postgres never looks an enum type up (it would with a named statement that it keeps, which
        /// behind PgBouncer in transaction pooling mode may not exist on the next server connection).
        impl<'a> postgres_types::FromSql<'a> for $name {
            fn from_sql(
                _: &postgres_types::Type,
                raw: &'a [u8],
            ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
                match std::str::from_utf8(raw)? {
                    $($label => Ok($name::$variant),)+
                    other => Err(format!("{}: unknown label {other:?}", $pg).into()),
                }
            }

            fn accepts(ty: &postgres_types::Type) -> bool {
                ty.name() == $pg || matches!(*ty, postgres_types::Type::TEXT | postgres_types::Type::VARCHAR)
            }
        }

        /// Sent as its label, its type inferred by the server from the statement.
        impl crate::db::Param for $name {
            fn value(&self) -> &(dyn postgres_types::ToSql + Sync) {
                match self {
                    $($name::$variant => crate::db::enum_label(&$label)),+
                }
            }

            fn pg_type(&self) -> postgres_types::Type {
                postgres_types::Type::UNKNOWN
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

pg_enum! {
    /// A session's state: `active` ⇄ `inactive` → `ended`.
    SessionStatus = "session_status" {
        /// Its agent was heard from within `session_inactive_after_secs`.
        Active = "active",
        /// No agent activity for `session_inactive_after_secs`; agent activity makes it active again.
        Inactive = "inactive",
        /// Closed (final).
        Ended = "ended",
    }
}

pg_enum! {
    /// A connection's state: `active` → `closed`.
    ConnectionStatus = "connection_status" {
        /// Open.
        Active = "active",
        /// Closed, with a [`CloseReason`].
        Closed = "closed",
    }
}

pg_enum! {
    /// Why a connection was closed.
    #[derive(Default)]
    CloseReason = "close_reason" {
        /// The agent closed it (`connection.close`).
        #[default]
        ClientDisconnect = "client_disconnect",
        /// Its session was closed.
        SessionClosed = "session_closed",
        /// No heartbeat within `connection_stale_after_secs`; undone by the next heartbeat.
        StaleConnection = "stale_connection",
    }
}

/// The reasons a client may give in `connection.close`. `session_closed` and `stale_connection` are the worker's
/// own (a session's close, the sweeper) and are not accepted from a message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum ClientCloseReason {
    /// The client closed the connection.
    #[default]
    #[serde(rename = "client_disconnect")]
    ClientDisconnect,
}

/// Why `agent.connection.closed` says a connection closed; a connection closed as stale has its own event,
/// `agent.connection.stale`, so `stale_connection` is not among these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum ClosedReason {
    /// The client closed it (`connection.close`).
    #[serde(rename = "client_disconnect")]
    ClientDisconnect,
    /// Its session was closed (`session.close`).
    #[serde(rename = "session_closed")]
    SessionClosed,
}

impl From<ClientCloseReason> for ClosedReason {
    fn from(r: ClientCloseReason) -> Self {
        match r {
            ClientCloseReason::ClientDisconnect => ClosedReason::ClientDisconnect,
        }
    }
}

impl From<ClosedReason> for CloseReason {
    fn from(r: ClosedReason) -> Self {
        match r {
            ClosedReason::ClientDisconnect => CloseReason::ClientDisconnect,
            ClosedReason::SessionClosed => CloseReason::SessionClosed,
        }
    }
}

impl From<ClientCloseReason> for CloseReason {
    fn from(r: ClientCloseReason) -> Self {
        match r {
            ClientCloseReason::ClientDisconnect => CloseReason::ClientDisconnect,
        }
    }
}

pg_enum! {
    /// An instruction's state: `pending` → `sent` → `acknowledged`; `expired` and `cancelled` are final too.
    InstructionStatus = "instruction_status" {
        /// Created (or given another try), not yet delivered.
        Pending = "pending",
        /// Delivered to the agent, not yet acknowledged.
        Sent = "sent",
        /// Acknowledged by its agent (final).
        Acknowledged = "acknowledged",
        /// Past its deadline with no retries left (final).
        Expired = "expired",
        /// Its session was closed while it was open (final).
        Cancelled = "cancelled",
    }
}

impl InstructionStatus {
    /// Whether the instruction can still be acknowledged, retried or expired.
    pub fn is_open(self) -> bool {
        matches!(self, InstructionStatus::Pending | InstructionStatus::Sent)
    }
}

pg_enum! {
    /// Instruction priority, ordered `low` < `normal` < `high` < `critical`.
    ///
    /// ```
    /// use agent_connection_manager::domain::Priority;
    /// let p: Priority = serde_json::from_str("\"critical\"").unwrap();
    /// assert!(p > Priority::High && Priority::Low < Priority::default());
    /// assert_eq!(p.as_str(), "critical");
    /// ```
    #[derive(Default)]
    Priority = "instruction_priority" {
        /// Lowest.
        Low = "low",
        /// The default.
        #[default]
        Normal = "normal",
        /// Above normal.
        High = "high",
        /// Highest.
        Critical = "critical",
    }
}

impl PartialOrd for Priority {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Priority {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (*self as u8).cmp(&(*other as u8))
    }
}

pg_enum! {
    /// What an agent says of an instruction it acknowledges.
    AckStatus = "ack_status" {
        /// Received, not yet processed.
        Received = "received",
        /// Processed successfully.
        Processed = "processed",
        /// Processing failed.
        Failed = "failed",
        /// The agent declined it.
        Declined = "declined",
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

    #[test]
    fn priority_is_ordered() {
        assert!(Priority::Low < Priority::Normal);
        assert!(Priority::Normal < Priority::High);
        assert!(Priority::High < Priority::Critical);
    }
}
