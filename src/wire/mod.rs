//! The one wire model (wit/protocol.md): serde types for what the components,
//! the dev stack and the reference builder exchange, named by protocol step.
//! Formats stay byte-compatible with what the public client reads; each file's
//! tests round-trip the protocol document's literal JSON.

pub mod metadata;
pub mod prepare;
pub mod sign;
pub mod spec;

pub use metadata::Metadata;
pub use prepare::{Builder, Parent, Prepared, PreparedError};
pub use sign::{
    Download, MultipartHint, Op, PartUrl, S3Multipart, SignRequest, SingleGet, SinglePut, Target, Upload, UploadHead,
    object_uri,
};
pub use spec::Spec;
