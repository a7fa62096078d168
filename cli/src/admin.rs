//! The gateway's operator endpoints (`/admin/…`, `gateway/src/http/`) as
//! the CLI calls them: where the gateway is, the admin token, and one way
//! to send a request and read its answer.

use serde_json::Value;

use crate::CliError;

/// How to reach the gateway's operator endpoints.
#[derive(Debug, Clone, clap::Args)]
pub struct AdminArgs {
    /// The gateway.
    #[arg(
        long,
        env = "MOLTBOT_GATEWAY_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub gateway_url: String,
    /// Where `moltbot up` keeps its dev-mode admin token (read when
    /// MOLTBOT_ADMIN_TOKEN is unset).
    #[arg(long, env = "MOLTBOT_DATA_DIR", default_value = "var/data")]
    pub data_dir: std::path::PathBuf,
}

impl AdminArgs {
    /// `{gateway_url}{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.gateway_url.trim_end_matches('/'))
    }
}

/// Sends `request` with the admin token found in `data_dir` (or
/// MOLTBOT_ADMIN_TOKEN) and reads the JSON answer. Errors with
/// [`CliError::Setup`] when the gateway cannot be reached, answers an
/// error (its message, prefixed with `what`), or answers something that is
/// not JSON.
pub async fn call(
    request: reqwest::RequestBuilder,
    data_dir: &std::path::Path,
    what: &str,
) -> Result<Value, CliError> {
    let token = crate::mesh::require_admin_token(data_dir)?;
    let response = request
        .bearer_auth(token)
        .send()
        .await
        .map_err(|e| CliError::Setup(format!("{what}: cannot reach the gateway: {e}")))?;
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    if !status.is_success() {
        let message = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
            .unwrap_or(body);
        return Err(CliError::Setup(format!(
            "{what}: the gateway answered {status}: {message}"
        )));
    }
    serde_json::from_str(&body)
        .map_err(|e| CliError::Setup(format!("{what}: the gateway's answer is not JSON: {e}")))
}
