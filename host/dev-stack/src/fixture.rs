//! The signing set-up every benchmark shares: a store on loopback with bucket
//! `bench`, and the signer's environment for it under a fixed token key.

use anyhow::Result;

use crate::store::StoreConfig;

/// The key bench tokens are minted with (`snapsign::token::mint`).
pub const TOKEN_KEY: &str = "bench-token-key-0123456789abcdef01234";

/// The store every bench signs for (bucket `bench`), under `dir`.
pub async fn store(dir: &std::path::Path) -> Result<snapsign_runtime::serve::Server> {
    crate::store::start(&StoreConfig {
        root: dir.join("store"),
        listen: "127.0.0.1:0".parse()?,
        access_key_id: "AKIDBENCH".into(),
        secret_access_key: "bench-secret".into(),
        buckets: vec!["bench".into()],
        faults: Default::default(),
        abort_incomplete_after: crate::store::DEFAULT_ABORT_INCOMPLETE_AFTER,
    })
    .await
}

/// The signer's environment for the bench store.
pub fn env(store_url: &str) -> Vec<(String, String)> {
    [
        ("SNAPSIGN_BUCKET", "bench"),
        ("SNAPSIGN_KEY_PREFIX", "builds"),
        ("SNAPSIGN_S3_ENDPOINT", store_url),
        ("SNAPSIGN_S3_ADDRESSING", "path"),
        ("SNAPSIGN_ACCESS_KEY_ID", "AKIDBENCH"),
        ("SNAPSIGN_SECRET_ACCESS_KEY", "bench-secret"),
        ("SNAPSIGN_TOKEN_KEY", TOKEN_KEY),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}
