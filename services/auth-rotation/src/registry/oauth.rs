//! OAuth2 client-credentials grants (RFC 6749 §4.4): access tokens fetched
//! for a lease when missing or about to expire, and refreshed in the
//! background before they do.

use std::time::{Duration, SystemTime};

use moltbot_proto::auth::v1::CredentialState;

use super::{Registry, lock};
use crate::{AuthError, crypto::Secret};

/// What a lease needs from an OAuth2 credential whose token must be fetched.
pub(super) struct TokenFetch {
    pub(super) provider: String,
    pub(super) credential_id: String,
    pub(super) token_url: String,
    pub(super) client_id: String,
    pub(super) client_secret: Secret,
    pub(super) scopes: String,
}

impl Registry {
    /// Fetches an OAuth2 access token (RFC 6749 §4.4) and caches it.
    pub(super) async fn fetch_token(&self, f: TokenFetch) -> Result<Secret, AuthError> {
        let mut form = vec![
            ("grant_type", "client_credentials".to_owned()),
            ("client_id", f.client_id.clone()),
            ("client_secret", f.client_secret.expose().to_owned()),
        ];
        if !f.scopes.is_empty() {
            form.push(("scope", f.scopes.clone()));
        }
        let body = ::url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form.iter().map(|(k, v)| (*k, v.as_str())))
            .finish();
        let response = self
            .http
            .post(&f.token_url)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .map_err(|e| AuthError::Unavailable {
                message: format!(
                    "token endpoint of `{}` unreachable: {}",
                    f.provider,
                    moltbot_runtime::tls::explain(&e)
                ),
            })?;
        let status = response.status();
        if !status.is_success() {
            if status.as_u16() == 401 || status.as_u16() == 400 {
                let _ = self
                    .set_state(
                        &f.provider,
                        &f.credential_id,
                        CredentialState::Invalid,
                        "token request rejected",
                    )
                    .await;
            }
            return Err(AuthError::Unavailable {
                message: format!("token endpoint of `{}` answered HTTP {status}", f.provider),
            });
        }
        let json: serde_json::Value =
            response.json().await.map_err(|_| AuthError::Unavailable {
                message: format!(
                    "token endpoint of `{}` sent an unreadable answer",
                    f.provider
                ),
            })?;
        let token = json["access_token"]
            .as_str()
            .ok_or_else(|| AuthError::Unavailable {
                message: format!("token endpoint of `{}` sent no access_token", f.provider),
            })?;
        let expires_in = json["expires_in"].as_u64().unwrap_or(3600);
        let secret = Secret::new(token);
        let expires = SystemTime::now() + Duration::from_secs(expires_in);
        let mut inner = lock(&self.inner);
        if let Some(c) = inner
            .providers
            .get_mut(&f.provider)
            .and_then(|p| p.creds.iter_mut().find(|c| c.id == f.credential_id))
            && let Some(o) = c.oauth.as_mut()
        {
            o.token = Some((secret.clone(), expires));
        }
        tracing::info!(provider = %f.provider, credential_id = %f.credential_id, expires_in, "OAuth2 token refreshed");
        Ok(secret)
    }

    /// OAuth2 credentials whose token expires within the refresh margin (or
    /// has none yet), for the background refresher.
    pub async fn refresh_tokens(&self) {
        let due: Vec<TokenFetch> = {
            let inner = lock(&self.inner);
            let soon = SystemTime::now() + self.settings.token_refresh_margin;
            inner
                .providers
                .values()
                .flat_map(|p| {
                    p.creds.iter().filter_map(move |c| {
                        let o = c.oauth.as_ref()?;
                        if c.state != CredentialState::Active {
                            return None;
                        }
                        let fresh = o.token.as_ref().is_some_and(|(_, exp)| *exp > soon);
                        (!fresh).then(|| TokenFetch {
                            provider: p.row.name.clone(),
                            credential_id: c.id.clone(),
                            token_url: o.token_url.clone(),
                            client_id: o.client_id.clone(),
                            client_secret: c.secret.clone(),
                            scopes: o.scopes.clone(),
                        })
                    })
                })
                .collect()
        };
        for f in due {
            if let Err(e) = self.fetch_token(f).await {
                tracing::warn!(error = %e, "OAuth2 token refresh failed");
            }
        }
    }
}
