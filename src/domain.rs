//! Domain values parsed once at the edge: a value of these types is valid by construction.

use std::fmt;

use chrono::{DateTime, NaiveDateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};

/// Longest accepted id, in bytes.
pub const MAX_ID_BYTES: usize = 255;

/// An agent, session or connection id: 1 to 255 bytes, no control characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, schemars::JsonSchema)]
#[serde(transparent)]
pub struct Ident(#[schemars(length(min = 1, max = 255))] String);

impl Ident {
    /// Parses an id, saying what is wrong with it.
    pub fn parse(s: impl Into<String>) -> Result<Self, String> {
        let s = s.into();
        if s.is_empty() {
            return Err("must not be empty".into());
        }
        if s.len() > MAX_ID_BYTES {
            return Err(format!("longer than {MAX_ID_BYTES} bytes"));
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

/// Free text stored as given (name, description, error message): no NUL, at most 64 KiB.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, schemars::JsonSchema)]
#[serde(transparent)]
pub struct Text(#[schemars(length(max = 65536))] String);

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
        if s.len() > 65_536 {
            return Err(serde::de::Error::custom("longer than 65536 bytes"));
        }
        Ok(Text(s))
    }
}

/// An instant read from RFC 3339 text; one without an offset is taken as UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, schemars::JsonSchema)]
#[serde(transparent)]
pub struct Timestamp(#[schemars(with = "String")] pub DateTime<Utc>);

impl Timestamp {
    /// Parses RFC 3339, or an ISO 8601 date-time without offset (read as UTC).
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Ok(t) = DateTime::parse_from_rfc3339(s) {
            return Ok(Self(t.with_timezone(&Utc)));
        }
        for fmt in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"] {
            if let Ok(n) = NaiveDateTime::parse_from_str(s, fmt) {
                return Ok(Self(n.and_utc()));
            }
        }
        Err(format!("`{s}` is not an RFC 3339 timestamp"))
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Timestamp::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Instruction priority, ordered `low` < `normal` < `high` < `critical`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Default, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// Lowest.
    Low,
    /// The default.
    #[default]
    Normal,
    /// Above normal.
    High,
    /// Highest.
    Critical,
}

impl Priority {
    /// The database enum label.
    ///
    /// ```
    /// use agent_connection_manager::domain::Priority;
    /// let p: Priority = serde_json::from_str("\"critical\"").unwrap();
    /// assert!(p > Priority::High && Priority::Low < Priority::default());
    /// assert_eq!(p.as_str(), "critical");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
            Priority::Critical => "critical",
        }
    }
}

/// What an agent says of an instruction it acknowledges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AckStatus {
    /// Received, not yet processed.
    Received,
    /// Processed successfully.
    Processed,
    /// Processing failed.
    Failed,
    /// The agent declined it.
    Declined,
}

impl AckStatus {
    /// The database enum label.
    pub fn as_str(self) -> &'static str {
        match self {
            AckStatus::Received => "received",
            AckStatus::Processed => "processed",
            AckStatus::Failed => "failed",
            AckStatus::Declined => "declined",
        }
    }
}

/// Why a connection was closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CloseReason {
    /// The agent (or backend) closed it.
    #[default]
    ClientDisconnect,
    /// Its session was closed.
    SessionClosed,
    /// No heartbeat within `connection_stale_after_secs`; undone by the next heartbeat.
    StaleConnection,
}

impl CloseReason {
    /// The database enum label.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::ClientDisconnect => "client_disconnect",
            CloseReason::SessionClosed => "session_closed",
            CloseReason::StaleConnection => "stale_connection",
        }
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
