//! The platform's templates API from the client's side, for
//! `snapsign templates ls | describe | rm` (routes in `wit/protocol.md` §2.7):
//! list pages through `nextCursor`, describe reads the by-name lookup the
//! build client uses, remove resolves the name to its id and deletes it.

use anyhow::{Context, Result, bail};
use serde_json::Value;
use snapsign::image_build::call::Scope;
use snapsign::image_build::routes;

/// A client of one platform, with one bearer token (its namespace).
pub struct Templates {
    http: reqwest::Client,
    /// [`routes::platform_base`].
    platform: String,
    token: String,
    scope: Option<Scope>,
}

impl Templates {
    /// For the platform at `api_url` (`http(s)://host[:port]`); `scope`: PAT mode.
    pub fn new(api_url: &str, token: &str, scope: Option<Scope>) -> Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .context("make the HTTP client")?;
        let platform = routes::platform_base(api_url, scope.as_ref());
        Ok(Templates { http, platform, token: token.to_owned(), scope })
    }

    /// Every template of the token's namespace, by name.
    pub async fn list(&self) -> Result<Vec<Value>> {
        let mut all = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut request = self.http.get(routes::templates_url(&self.platform));
            if let Some(cursor) = &cursor {
                request = request.query(&[("cursor", cursor)]);
            }
            let page = self.send("list templates", request).await?;
            let items = page["items"].as_array().context("list templates: the answer has no items array")?;
            all.extend(items.iter().cloned());
            match page["nextCursor"].as_str() {
                // A cursor that does not move would loop for ever.
                Some(next) if Some(next) != cursor.as_deref() && !items.is_empty() => cursor = Some(next.to_owned()),
                _ => return Ok(all),
            }
        }
    }

    /// The template `reference` (`name`, or `namespace/name` for another
    /// namespace's public one), as the build client's lookup reads it.
    pub async fn describe(&self, reference: &str) -> Result<Value> {
        let what = format!("describe template '{reference}'");
        self.send(&what, self.http.get(routes::lookup_url(&self.platform, reference))).await
    }

    /// Removes the template `name` of the token's namespace; answers what was removed.
    pub async fn remove(&self, name: &str) -> Result<Value> {
        let template = self.describe(name).await?;
        let id = template["id"].as_str().with_context(|| format!("template '{name}': the lookup answer has no id"))?;
        let what = format!("remove template '{name}' ({id})");
        self.send(&what, self.http.delete(routes::template_url(&self.platform, id))).await
    }

    async fn send(&self, what: &str, mut request: reqwest::RequestBuilder) -> Result<Value> {
        for (name, value) in self.scope.iter().flat_map(Scope::headers) {
            request = request.header(name, value);
        }
        let response = request
            .bearer_auth(&self.token)
            .header("accept", "application/json")
            .send()
            .await
            .with_context(|| format!("{what}: the platform did not answer"))?;
        let status = response.status();
        let body = response.bytes().await.with_context(|| format!("{what}: read the answer"))?;
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body);
            bail!("{what}: HTTP {}: {}", status.as_u16(), text.trim());
        }
        serde_json::from_slice(&body).with_context(|| format!("{what}: the answer is not JSON"))
    }
}
