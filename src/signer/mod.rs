//! The dataplane signer (`POST /api/v1/blob/sign`) as a pure core.

pub mod config;
pub mod error;
pub mod handle;
pub mod memo;
pub mod request;
pub mod validate;

pub use config::{ConfigError, SignerConfig};
pub use error::SignError;
pub use handle::{Answer, Incoming, MAX_BODY_BYTES, PendingUpload, SIGN_PATH, Step, handle};
pub use memo::Memo;
