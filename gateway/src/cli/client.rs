//! The operator CLI's client for a running gateway's HTTP API.

use std::time::Duration;

use serde_json::Value;

/// An API path from its segments, each percent-encoded: an id such as `arr1?oops` or `a/b`
/// stays one segment instead of starting a query or another path level.
pub fn path(segments: &[&str]) -> String {
    let mut out = String::new();
    for segment in segments {
        out.push('/');
        for &b in segment.as_bytes() {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                out.push(char::from(b));
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
    }
    out
}

/// Talks to `/api/v1` of one gateway with one bearer token.
#[derive(Debug, Clone)]
pub struct ApiClient {
    base: String,
    token: String,
    agent: ureq::Agent,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The gateway answered with an error; `message` is its explanation.
    #[error("{status}: {message}")]
    Api { status: u16, message: String },
    #[error("cannot reach the gateway at {url}: {source}")]
    Unreachable { url: String, source: ureq::Error },
    #[error("unexpected answer from the gateway: {0}")]
    BadAnswer(String),
}

impl ApiClient {
    /// `base` is the gateway's HTTP address, e.g. `http://127.0.0.1:8080`.
    pub fn new(base: &str, token: &str) -> ApiClient {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        ApiClient {
            base: base.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
            agent,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.base)
    }

    fn finish(
        &self,
        url: String,
        sent: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<Value, ClientError> {
        let response = sent.map_err(|source| ClientError::Unreachable { url, source })?;
        let status = response.status().as_u16();
        let text = response
            .into_body()
            .read_to_string()
            .map_err(|e| ClientError::BadAnswer(e.to_string()))?;
        let body: Value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)
                .map_err(|e| ClientError::BadAnswer(format!("{e}: {text}")))?
        };
        if status >= 400 {
            let message = body["error"].as_str().unwrap_or("(no message)").to_owned();
            return Err(ClientError::Api { status, message });
        }
        Ok(body)
    }

    pub fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.get_query(path, &[])
    }

    /// GET with query parameters (encoded here, so any value is safe to pass).
    pub fn get_query(&self, path: &str, query: &[(&str, &str)]) -> Result<Value, ClientError> {
        let url = self.url(path);
        let sent = self
            .agent
            .get(&url)
            .query_pairs(query.iter().copied())
            .header("Authorization", &self.bearer())
            .call();
        self.finish(url, sent)
    }

    pub fn post(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        let url = self.url(path);
        let sent = self
            .agent
            .post(&url)
            .header("Authorization", &self.bearer())
            .send_json(body);
        self.finish(url, sent)
    }

    pub fn put(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        let url = self.url(path);
        let sent = self
            .agent
            .put(&url)
            .header("Authorization", &self.bearer())
            .send_json(body);
        self.finish(url, sent)
    }

    /// POSTs raw bytes (a bundle upload).
    pub fn post_bytes(&self, path: &str, body: &[u8]) -> Result<Value, ClientError> {
        let url = self.url(path);
        let sent = self
            .agent
            .post(&url)
            .header("Authorization", &self.bearer())
            .header("Content-Type", "application/octet-stream")
            .send(body);
        self.finish(url, sent)
    }

    pub fn delete(&self, path: &str) -> Result<Value, ClientError> {
        let url = self.url(path);
        let sent = self
            .agent
            .delete(&url)
            .header("Authorization", &self.bearer())
            .call();
        self.finish(url, sent)
    }

    fn bearer(&self) -> String {
        format!("Bearer {}", self.token)
    }
}

#[cfg(test)]
mod tests {
    use super::path;

    #[test]
    fn path_segments_are_percent_encoded() {
        assert_eq!(path(&["devices", "arr1?oops"]), "/devices/arr1%3Foops");
        assert_eq!(
            path(&["devices", "a/b", "credential"]),
            "/devices/a%2Fb/credential"
        );
        assert_eq!(
            path(&["drift", "kws", "2.0.0+build 1"]),
            "/drift/kws/2.0.0%2Bbuild%201"
        );
        assert_eq!(path(&["tokens", "x#y%z"]), "/tokens/x%23y%25z");
        assert_eq!(path(&["devices", "pump-1_a.b~"]), "/devices/pump-1_a.b~");
        assert_eq!(path(&["devices", "ü"]), "/devices/%C3%BC");
    }
}
