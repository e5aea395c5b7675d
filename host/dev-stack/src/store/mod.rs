//! The embedded S3-compatible store: s3s over s3s-fs, with the rules S3
//! applies that they lack added as layers (see docs/dev-stack.md, "Store rules").

mod config;
mod keys;
mod layout;
mod multipart;
mod presigned;
mod reaper;
mod s3;
mod start;

pub use config::{StoreConfig, StoreFaults};
pub use keys::{S3_MAX_KEY_BYTES, max_key_bytes};
pub use multipart::recorded_digest;
pub use reaper::DEFAULT_ABORT_INCOMPLETE_AFTER;
pub use start::{ensure_bucket, start};
