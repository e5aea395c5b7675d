//! The one wire model (wit/protocol.md): serde types for what the components,
//! the dev stack and the reference builder exchange, named by protocol step.
//! Formats stay byte-compatible with what the public client reads; each file's
//! tests round-trip the protocol document's literal JSON.

pub mod complete;
pub mod metadata;
pub mod prepare;
pub mod sign;
pub mod spec;

pub use complete::CompleteRequest;
pub use metadata::Metadata;
pub use prepare::{
    Ancestor, Builder, LocalImage, Parent, PrepareRequest, Prepared, PreparedError, TemplateFound, TemplateRef,
};
pub use sign::{
    Download, MultipartHint, Op, PartUrl, S3Multipart, SignRequest, SingleGet, SinglePut, Target, Upload, UploadHead,
    object_uri,
};
pub use spec::{ClientFields, Spec};

/// The start of a peer's body on one line (whitespace runs folded, at most
/// 300 characters), for error messages and logs: the signer's store errors
/// and the reference builder's upload errors alike.
pub fn excerpt(body: &str) -> String {
    let flat: String = body.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.is_empty() {
        return "(empty body)".into();
    }
    match flat.char_indices().nth(300) {
        Some((cut, _)) => format!("{}…", &flat[..cut]),
        None => flat,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    const PROTOCOL: &str = include_str!("../../wit/protocol.md");

    /// The JSON values of the first ```json block under `heading` in wit/protocol.md.
    fn examples(heading: &str) -> Vec<Value> {
        let section = PROTOCOL.split_once(heading).unwrap_or_else(|| panic!("protocol.md has no '{heading}'")).1;
        let block = section.split_once("```json\n").expect("a json block").1.split_once("```").unwrap().0;
        serde_json::Deserializer::from_str(block)
            .into_iter::<Value>()
            .collect::<Result<_, _>>()
            .unwrap_or_else(|e| panic!("the json block under '{heading}' does not parse: {e}"))
    }

    #[test]
    fn the_documented_sign_requests_read_and_write_back_unchanged() {
        let requests = examples("### 4.7 Blob signing");
        assert_eq!(requests.len(), 2);
        for example in requests {
            let text = example.to_string();
            let parsed = crate::signer::request::parse(text.as_bytes()).unwrap();
            assert_eq!(serde_json::to_value(&parsed).unwrap(), example);
        }
    }

    #[test]
    fn the_documented_complete_request_reads_and_writes_back_unchanged() {
        let [example] = examples("### 2.6 Complete request").try_into().unwrap();
        let request: CompleteRequest = serde_json::from_value(example.clone()).unwrap();
        assert_eq!(serde_json::to_value(&request).unwrap(), example);
    }

    #[test]
    fn the_documented_prepare_request_reads_and_writes_back_unchanged() {
        let [example] = examples("### 2.3 Prepare request").try_into().unwrap();
        let request: PrepareRequest = serde_json::from_value(example.clone()).unwrap();
        assert_eq!(request.parent_template.as_ref().and_then(|p| p.template_id.as_deref()), Some("tpl-1"));
        assert_eq!(serde_json::to_value(&request).unwrap(), example);
    }

    #[test]
    fn the_documented_prepare_answer_reads_and_writes_back_unchanged() {
        let [example] = examples("### 2.4 Prepare response").try_into().unwrap();
        let prepared = Prepared::parse(&example).unwrap();
        assert_eq!(prepared.snapshot_rel_path.as_deref(), Some("sandbox-template-builds/build-7/snap-7.tlsnap"));
        assert_eq!(serde_json::to_value(&prepared).unwrap(), example);
    }
}
