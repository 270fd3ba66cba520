//! `telemetry.*`: where spans are exported (OTLP/HTTP). Its own file so that the section stays self-contained; the
//! exporter's fixed bounds are in `telemetry::otlp`.

use serde::{Deserialize, Serialize};

/// The OTLP/HTTP path of spans, appended to an endpoint that does not already end with it.
pub const TRACES_PATH: &str = "/v1/traces";

/// `telemetry.*`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetrySettings {
    /// An OpenTelemetry collector's OTLP/HTTP endpoint (`http://collector:4318`): spans are posted, batched, as
    /// protobuf to `<endpoint>/v1/traces` (or to the endpoint itself when it ends with `/v1/traces`). Empty: no
    /// export.
    pub otlp_endpoint: String,
}

impl TelemetrySettings {
    /// The URL spans are posted to, or `None` when export is off.
    pub fn traces_url(&self) -> Result<Option<url::Url>, super::ConfigError> {
        let endpoint = self.otlp_endpoint.trim();
        if endpoint.is_empty() {
            return Ok(None);
        }
        let bad = |why: String| super::ConfigError(format!("telemetry.otlp_endpoint: {why}"));
        let mut url = url::Url::parse(endpoint).map_err(|e| bad(format!("not a URL ({e})")))?;
        match url.scheme() {
            "http" => {}
            "https" => {
                return Err(bad("https is not supported: export over http to a collector next to the worker (a \
                                sidecar or the node's agent, port 4318), which forwards with TLS"
                    .into()))
            }
            other => return Err(bad(format!("scheme `{other}` is not OTLP/HTTP; use http://host:4318"))),
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(bad("has no host".into()));
        }
        if !url.username().is_empty() || url.password().is_some() || url.query().is_some() || url.fragment().is_some() {
            return Err(bad("takes no credentials, query or fragment: a scheme, host, port and path".into()));
        }
        if !url.path().ends_with(TRACES_PATH) {
            let path = format!("{}{TRACES_PATH}", url.path().trim_end_matches('/'));
            url.set_path(&path);
        }
        Ok(Some(url))
    }

    /// Checks the values; the error names the key.
    pub fn validate(&self) -> Result<(), super::ConfigError> {
        self.traces_url().map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(endpoint: &str) -> Result<Option<String>, String> {
        let s = TelemetrySettings { otlp_endpoint: endpoint.into() };
        s.traces_url().map(|u| u.map(String::from)).map_err(|e| e.to_string())
    }

    #[test]
    fn the_traces_path_is_added_once() {
        assert_eq!(url(""), Ok(None));
        assert_eq!(url("  "), Ok(None));
        assert_eq!(url("http://collector:4318").unwrap().as_deref(), Some("http://collector:4318/v1/traces"));
        assert_eq!(url("http://collector:4318/").unwrap().as_deref(), Some("http://collector:4318/v1/traces"));
        assert_eq!(url("http://c:4318/otlp").unwrap().as_deref(), Some("http://c:4318/otlp/v1/traces"));
        assert_eq!(url("http://c:4318/v1/traces").unwrap().as_deref(), Some("http://c:4318/v1/traces"));
    }

    #[test]
    fn what_cannot_be_exported_to_is_refused_naming_the_key() {
        for bad in ["collector:4318", "https://c:4318", "grpc://c:4317", "http://u:p@c:4318", "http://c/?a=b", "x"] {
            let e = url(bad).expect_err(bad);
            assert!(e.contains("telemetry.otlp_endpoint"), "{bad}: {e}");
        }
    }
}
