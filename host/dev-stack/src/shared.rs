//! What the emulator's handlers share: the state, the signer's settings,
//! the fault switches, the stack's URL and an HTTP client. Each API's own
//! state is its handler's.

use std::sync::{Arc, Mutex, OnceLock};

use snapsign::presign::Presigner;
use snapsign::signer::SignerConfig;
use snapsign::wire::SingleGet;

use super::faults::Faults;
use super::http::ApiError;
use super::state::State;
use crate::store::StoreFaults;

/// What every handler reads: the state, the signer's settings, the fault
/// switches and the stack's URL. Each API's own state is its handler's.
pub struct Shared {
    /// Templates, builds, sandboxes and uploads (SQLite).
    pub(crate) state: State,
    /// The signer's configuration (its keys, bucket and URL lifetime).
    pub(crate) signer: SignerConfig,
    /// The client the handlers reach the store and the signer with.
    pub(crate) http: reqwest::Client,
    faults: Mutex<Faults>,
    store_faults: Arc<StoreFaults>,
    base_url: OnceLock<String>,
}

impl Shared {
    pub(crate) fn new(state: State, signer: SignerConfig, faults: Faults, store_faults: Arc<StoreFaults>) -> Self {
        store_faults.fail_upload_part(faults.store_fail_part);
        Shared {
            state,
            signer,
            http: reqwest::Client::new(),
            faults: Mutex::new(faults),
            store_faults,
            base_url: OnceLock::new(),
        }
    }

    /// Sets the emulator's own URL once it listens.
    pub(crate) fn set_base_url(&self, url: String) {
        let _ = self.base_url.set(url);
    }
    /// The current fault switches.
    pub(crate) fn faults(&self) -> Faults {
        self.faults.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn set_faults(&self, faults: Faults) {
        self.store_faults.fail_upload_part(faults.store_fail_part);
        *self.faults.lock().unwrap_or_else(|p| p.into_inner()) = faults;
    }

    /// The emulator's own URL (also every sandbox's `sandbox_url`).
    pub(crate) fn base_url(&self) -> &str {
        self.base_url.get().map(String::as_str).unwrap_or("http://127.0.0.1")
    }

    pub(crate) fn presigner(&self) -> Presigner {
        self.signer.presigner(jiff::Timestamp::now())
    }

    pub(crate) fn expires_at(&self) -> String {
        jiff::Timestamp::from_second(jiff::Timestamp::now().as_second() + i64::from(self.signer.url_ttl_secs))
            .expect("valid timestamp")
            .to_string()
    }

    /// A `single_get` block for an object of the signer's bucket (what the legacy platform presigned).
    pub(crate) fn presigned_get(&self, uri: &str) -> Result<SingleGet, ApiError> {
        let parsed = snapsign::signer::validate::s3_uri(uri)
            .map_err(|why| ApiError::bad_request("invalid_uri", format!("uri {uri:?} {why}")))?;
        if parsed.bucket != self.signer.bucket {
            return Err(ApiError::bad_request(
                "foreign_bucket",
                format!("uri {uri:?} is not in bucket {}", self.signer.bucket),
            ));
        }
        let object = self.signer.endpoint.object(&self.signer.bucket, parsed.key);
        let method = snapsign::presign::Method::Get;
        Ok(SingleGet {
            uri: Some(uri.to_owned()),
            method: method.as_str().into(),
            url: self.presigner().presign(method, &object, &[]),
            headers: Default::default(),
            expires_at: Some(self.expires_at()),
        })
    }
}
