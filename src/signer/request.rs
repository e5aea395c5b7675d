//! The `POST /api/v1/blob/sign` request (wit/protocol.md §4.7, §9) parsed
//! into the wire model ([`SignRequest`]) with errors that name the field, and
//! with the signer's checks: no duplicate keys, no `namespace`, only the two
//! accepted pairs, a hint within S3's limits.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::BTreeSet;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

use super::error::SignError;
use crate::wire::sign::{
    MAX_OBJECT_SIZE, MAX_PART_SIZE, MAX_PARTS, MIN_PART_SIZE, MultipartHint, Op, SignRequest, Target,
};

/// A JSON value read from a request body: strings and keys without escapes
/// are borrowed from the body, and an object keeps its members in order.
/// Reading one costs an allocation per object and array, none per key.
#[derive(Debug, Clone, PartialEq)]
enum Json<'de> {
    Null,
    Bool(bool),
    Number(Number),
    String(Cow<'de, str>),
    Array(Vec<Json<'de>>),
    Object(Vec<(Cow<'de, str>, Json<'de>)>),
}

/// The members of a JSON object, in order, each key once.
type Members<'de> = [(Cow<'de, str>, Json<'de>)];

impl Json<'_> {
    /// The same value as `serde_json` holds it (for error messages and tests).
    fn to_value(&self) -> Value {
        match self {
            Json::Null => Value::Null,
            Json::Bool(b) => Value::Bool(*b),
            Json::Number(n) => Value::Number(n.clone()),
            Json::String(s) => Value::String(s.clone().into_owned()),
            Json::Array(items) => Value::Array(items.iter().map(Json::to_value).collect()),
            Json::Object(members) => Value::Object(
                members.iter().map(|(k, v)| (k.clone().into_owned(), v.to_value())).collect::<Map<_, _>>(),
            ),
        }
    }
}

/// Member `name` of `members`, when present.
fn member<'a, 'de>(members: &'a Members<'de>, name: &str) -> Option<&'a Json<'de>> {
    members.iter().find(|(key, _)| key == name).map(|(_, value)| value)
}

fn object<'a, 'de>(parent: &'a Members<'de>, field: &'static str) -> Result<&'a Members<'de>, SignError> {
    match member(parent, field) {
        None | Some(Json::Null) => Err(SignError::MissingField(field)),
        Some(Json::Object(o)) => Ok(o),
        Some(_) => Err(SignError::InvalidField { field, problem: "must be a JSON object".into() }),
    }
}

fn string<'a>(parent: &'a Members<'_>, name: &str, field: &'static str) -> Result<&'a str, SignError> {
    match member(parent, name) {
        None | Some(Json::Null) => Err(SignError::MissingField(field)),
        Some(Json::String(s)) => Ok(s),
        Some(_) => Err(SignError::InvalidField { field, problem: "must be a string".into() }),
    }
}

fn number(parent: &Members<'_>, name: &str, field: &'static str) -> Result<u64, SignError> {
    match member(parent, name) {
        None | Some(Json::Null) => Err(SignError::MissingField(field)),
        Some(v) => match v {
            Json::Number(n) => n.as_u64(),
            _ => None,
        }
        .ok_or_else(|| SignError::InvalidField {
            field,
            problem: format!("must be a non-negative integer, got {}", v.to_value()),
        }),
    }
}

/// Longest `op.upload_id` accepted (S3's are about 100 bytes).
pub const MAX_UPLOAD_ID_BYTES: usize = 1024;

/// Parses and checks a request body (everything but policy, which needs the caller).
pub fn parse(body: &[u8]) -> Result<SignRequest, SignError> {
    let duplicate = RefCell::new(None);
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let root = strict(&mut deserializer, &duplicate)?;
    let Json::Object(root) = root else {
        return Err(SignError::InvalidField { field: "(body)", problem: "must be a JSON object".into() });
    };
    let target = object(&root, "target")?;
    let op = object(&root, "op")?;
    if member(&root, "namespace").is_some() || member(target, "namespace").is_some() {
        return Err(SignError::NamespaceField);
    }
    let target = match string(target, "kind", "target.kind")? {
        "artifact" => Target::Artifact { rel_path: string(target, "rel_path", "target.rel_path")?.to_owned() },
        "blob" => Target::Blob { uri: string(target, "uri", "target.uri")?.to_owned() },
        other => return Err(SignError::UnknownKind { field: "target.kind", value: other.to_owned() }),
    };
    let op = match string(op, "kind", "op.kind")? {
        "put_artifact" => Op::PutArtifact { multipart_hint: hint(op)? },
        "get_blob" => Op::GetBlob,
        "refresh_upload" => {
            let upload_id = string(op, "upload_id", "op.upload_id")?;
            if upload_id.is_empty()
                || upload_id.len() > MAX_UPLOAD_ID_BYTES
                || !upload_id.bytes().all(|b| b.is_ascii_graphic() && b != b'%')
            {
                return Err(SignError::InvalidField {
                    field: "op.upload_id",
                    problem: format!(
                        "must be the UploadId the store gave (1 to {MAX_UPLOAD_ID_BYTES} printable ASCII characters, \
                         no '%' or space)"
                    ),
                });
            }
            let multipart_hint = hint(op)?.ok_or(SignError::MissingField("op.multipart_hint"))?;
            Op::RefreshUpload { upload_id: upload_id.to_owned(), multipart_hint }
        }
        other => return Err(SignError::UnknownKind { field: "op.kind", value: other.to_owned() }),
    };
    match (&target, &op) {
        (Target::Artifact { .. }, Op::PutArtifact { .. })
        | (Target::Blob { .. }, Op::GetBlob)
        | (Target::Blob { .. }, Op::RefreshUpload { .. }) => {}
        (Target::Artifact { .. }, Op::GetBlob) => {
            return Err(SignError::UnsupportedCombination { target: "artifact", op: "get_blob" });
        }
        (Target::Artifact { .. }, Op::RefreshUpload { .. }) => {
            return Err(SignError::UnsupportedCombination { target: "artifact", op: "refresh_upload" });
        }
        (Target::Blob { .. }, Op::PutArtifact { .. }) => {
            return Err(SignError::UnsupportedCombination { target: "blob", op: "put_artifact" });
        }
    }
    Ok(SignRequest { target, op })
}

/// Parses JSON as `serde_json` does, but refuses an object that names a key
/// twice: parsers disagree on which one wins (serde keeps the last, others
/// the first), so a request a proxy reads one way must not mean another here.
pub fn strict_json(body: &[u8]) -> Result<Value, SignError> {
    let duplicate = RefCell::new(None);
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    strict(&mut deserializer, &duplicate).map(|json| json.to_value())
}

/// The whole document in `deserializer`, with a duplicate key anywhere
/// reported by its path (it wins over the parse error it causes).
fn strict<'de>(
    deserializer: &mut serde_json::Deserializer<serde_json::de::SliceRead<'de>>,
    duplicate: &RefCell<Option<String>>,
) -> Result<Json<'de>, SignError> {
    let parsed = Strict { path: Path::Root, duplicate }
        .deserialize(&mut *deserializer)
        .and_then(|json| deserializer.end().map(|()| json));
    match (parsed, duplicate.take()) {
        (_, Some(field)) => Err(SignError::DuplicateKey { field }),
        (Ok(json), None) => Ok(json),
        (Err(e), None) => Err(SignError::MalformedJson(e.to_string())),
    }
}

/// Where a value sits in the document, written out only when an error names it.
#[derive(Clone, Copy)]
enum Path<'p> {
    Root,
    Key(&'p Path<'p>, &'p str),
    Index(&'p Path<'p>, usize),
}

impl fmt::Display for Path<'_> {
    /// `target.rel_path`, `pad[0].a`: keys joined by dots, indexes in brackets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Path::Root => Ok(()),
            Path::Key(Path::Root, key) => f.write_str(key),
            Path::Key(parent, key) => write!(f, "{parent}.{key}"),
            Path::Index(parent, index) => write!(f, "{parent}[{index}]"),
        }
    }
}

/// Objects up to this many members are checked for duplicates by a scan;
/// larger ones (a hostile body may hold thousands) through a set.
const SCANNED_MEMBERS: usize = 8;

/// A JSON value at `path`; records the first duplicate key it meets.
struct Strict<'p> {
    path: Path<'p>,
    duplicate: &'p RefCell<Option<String>>,
}

impl<'de> DeserializeSeed<'de> for Strict<'_> {
    type Value = Json<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Json<'de>, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict<'_> {
    type Value = Json<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Json<'de>, E> {
        Ok(Json::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Json<'de>, E> {
        Ok(Json::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Json<'de>, E> {
        Ok(Json::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Json<'de>, E> {
        Ok(Number::from_f64(v).map_or(Json::Null, Json::Number))
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Json<'de>, E> {
        Ok(Json::String(Cow::Borrowed(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Json<'de>, E> {
        Ok(Json::String(Cow::Owned(v.to_owned())))
    }

    fn visit_string<E>(self, v: String) -> Result<Json<'de>, E> {
        Ok(Json::String(Cow::Owned(v)))
    }

    fn visit_unit<E>(self) -> Result<Json<'de>, E> {
        Ok(Json::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json<'de>, A::Error> {
        let mut items = Vec::new();
        while let Some(item) =
            seq.next_element_seed(Strict { path: Path::Index(&self.path, items.len()), duplicate: self.duplicate })?
        {
            items.push(item);
        }
        Ok(Json::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json<'de>, A::Error> {
        let mut members: Vec<(Cow<'de, str>, Json<'de>)> = Vec::new();
        let mut index: Option<BTreeSet<Cow<'de, str>>> = None;
        while let Some(key) = map.next_key_seed(Key)? {
            let repeated = match index.as_mut() {
                Some(index) => !index.insert(key.clone()),
                None => {
                    let repeated = members.iter().any(|(seen, _)| *seen == key);
                    if !repeated && members.len() >= SCANNED_MEMBERS {
                        index = Some(members.iter().map(|(seen, _)| seen.clone()).chain([key.clone()]).collect());
                    }
                    repeated
                }
            };
            let path = Path::Key(&self.path, &key);
            if repeated {
                *self.duplicate.borrow_mut() = Some(path.to_string());
                return Err(de::Error::custom("duplicate key"));
            }
            let value = map.next_value_seed(Strict { path, duplicate: self.duplicate })?;
            members.push((key, value));
        }
        Ok(Json::Object(members))
    }
}

/// An object key, borrowed from the body when it has no escapes.
struct Key;

impl<'de> DeserializeSeed<'de> for Key {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Cow<'de, str>, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Borrowed(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Owned(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Owned(v))
    }
}

fn hint(op: &Members<'_>) -> Result<Option<MultipartHint>, SignError> {
    let hint = match member(op, "multipart_hint") {
        None | Some(Json::Null) => return Ok(None),
        Some(_) => object(op, "multipart_hint")?,
    };
    let max_parts = number(hint, "max_parts", "op.multipart_hint.max_parts")?;
    if !(1..=u64::from(MAX_PARTS)).contains(&max_parts) {
        return Err(SignError::InvalidField {
            field: "op.multipart_hint.max_parts",
            problem: format!("is {max_parts}; S3 allows 1..={MAX_PARTS} parts"),
        });
    }
    let part_size_bytes = number(hint, "part_size_bytes", "op.multipart_hint.part_size_bytes")?;
    if !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&part_size_bytes) {
        return Err(SignError::InvalidField {
            field: "op.multipart_hint.part_size_bytes",
            problem: format!("is {part_size_bytes}; S3 parts are {MIN_PART_SIZE}..={MAX_PART_SIZE} bytes"),
        });
    }
    if max_parts * part_size_bytes > MAX_OBJECT_SIZE {
        return Err(SignError::InvalidField {
            field: "op.multipart_hint",
            problem: format!(
                "asks for {max_parts} x {part_size_bytes} bytes, over S3's {MAX_OBJECT_SIZE}-byte object limit"
            ),
        });
    }
    Ok(Some(MultipartHint { max_parts: max_parts as u32, part_size_bytes }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<SignRequest, SignError> {
        super::parse(s.as_bytes())
    }

    #[test]
    fn parses_both_protocol_examples() {
        let put = parse(
            r#"{"target":{"kind":"artifact","rel_path":"projects/p/sandbox-template-builds/b/s.tlsnap"},
                "op":{"kind":"put_artifact","multipart_hint":{"max_parts":160,"part_size_bytes":67108864}}}"#,
        )
        .unwrap();
        assert_eq!(
            put.op,
            Op::PutArtifact { multipart_hint: Some(MultipartHint { max_parts: 160, part_size_bytes: 67108864 }) }
        );
        let get = parse(
            r#"{"target":{"kind":"blob","uri":"gs://bucket/path/parent-manifest.json"},"op":{"kind":"get_blob"}}"#,
        )
        .unwrap();
        assert_eq!(get.target, Target::Blob { uri: "gs://bucket/path/parent-manifest.json".into() });
        let single = parse(
            r#"{"target":{"kind":"artifact","rel_path":"a"},"op":{"kind":"put_artifact","multipart_hint":null}}"#,
        );
        assert_eq!(single.unwrap().op, Op::PutArtifact { multipart_hint: None });
    }

    #[test]
    fn reads_back_every_request_the_wire_model_writes() {
        for request in [
            SignRequest::put_artifact("sandbox-template-builds/build-7/snap-7.tlsnap", None),
            SignRequest::put_artifact("a/b", Some(MultipartHint { max_parts: 160, part_size_bytes: 67108864 })),
            SignRequest::get_blob("s3://snapshots/builds/default/sandbox-template-builds/build-3/snap-3.tlsnap"),
        ] {
            assert_eq!(parse(&serde_json::to_string(&request).unwrap()), Ok(request));
        }
    }

    #[test]
    fn names_what_is_wrong() {
        let code = |s: &str| parse(s).unwrap_err().code();
        assert_eq!(code("{not json"), "malformed_json");
        assert_eq!(code(r#"{"target":{"kind":"blob","uri":"x"},"op":{"kind":"get_blob"}} trailing"#), "malformed_json");
        assert_eq!(code("[1]"), "invalid_field");
        assert_eq!(code(r#"{"op":{"kind":"get_blob"}}"#), "missing_field");
        assert_eq!(code(r#"{"target":{"kind":"artifact"},"op":{"kind":"put_artifact"}}"#), "missing_field");
        assert_eq!(code(r#"{"target":{"kind":"bucket","uri":"x"},"op":{"kind":"get_blob"}}"#), "unknown_kind");
        assert_eq!(code(r#"{"target":{"kind":"blob","uri":"x"},"op":{"kind":"delete"}}"#), "unknown_kind");
        assert_eq!(
            code(r#"{"target":{"kind":"blob","uri":"x"},"op":{"kind":"put_artifact"}}"#),
            "unsupported_combination"
        );
        assert_eq!(code(r#"{"target":{"kind":"blob","uri":7},"op":{"kind":"get_blob"}}"#), "invalid_field");
        assert_eq!(
            code(r#"{"namespace":"other","target":{"kind":"blob","uri":"x"},"op":{"kind":"get_blob"}}"#),
            "namespace_not_allowed"
        );
        let hint = |h: &str| {
            parse(&format!(
                r#"{{"target":{{"kind":"artifact","rel_path":"a"}},"op":{{"kind":"put_artifact","multipart_hint":{h}}}}}"#
            ))
        };
        assert!(hint(r#"{"max_parts":0,"part_size_bytes":67108864}"#).unwrap_err().to_string().contains("is 0"));
        assert!(hint(r#"{"max_parts":10001,"part_size_bytes":67108864}"#).unwrap_err().to_string().contains("10001"));
        assert!(hint(r#"{"max_parts":10000,"part_size_bytes":67108864}"#).is_ok());
        assert!(hint(r#"{"max_parts":1,"part_size_bytes":5242879}"#).is_err());
        assert!(hint(r#"{"max_parts":1,"part_size_bytes":5368709121}"#).is_err());
        assert!(hint(r#"{"max_parts":-1,"part_size_bytes":67108864}"#).is_err());
        assert!(
            hint(r#"{"max_parts":10000,"part_size_bytes":5368709120}"#)
                .unwrap_err()
                .to_string()
                .contains("object limit")
        );
    }

    #[test]
    fn duplicate_keys_are_refused_at_any_depth_naming_the_field() {
        for (body, field) in [
            (
                r#"{"target":{"kind":"artifact","rel_path":"mine","rel_path":"../b/x"},"op":{"kind":"put_artifact"}}"#,
                "target.rel_path",
            ),
            (
                r#"{"target":{"kind":"blob","uri":"x"},"target":{"kind":"blob","uri":"y"},"op":{"kind":"get_blob"}}"#,
                "target",
            ),
            (r#"{"target":{"kind":"blob","kind":"artifact","uri":"x"},"op":{"kind":"get_blob"}}"#, "target.kind"),
            // The same key spelled with an escape is still the same key.
            (r#"{"target":{"kind":"blob","uri":"x","\u0075ri":"y"},"op":{"kind":"get_blob"}}"#, "target.uri"),
            (r#"{"target":{"kind":"blob","uri":"x"},"op":{"kind":"get_blob"},"pad":[{"a":1,"a":2}]}"#, "pad[0].a"),
        ] {
            let e = parse(body).unwrap_err();
            assert_eq!(e, SignError::DuplicateKey { field: field.into() }, "{body}");
            assert_eq!((e.status(), e.code()), (400, "duplicate_key"));
        }
        // Past the scanned size, an object's keys are checked through a set.
        let many: String = (0..40).map(|i| format!(r#","k{i}":{i}"#)).collect();
        let body = |extra: &str| {
            format!(r#"{{"target":{{"kind":"blob","uri":"x"{many}{extra}}},"op":{{"kind":"get_blob"}}}}"#)
        };
        assert!(parse(&body("")).is_ok());
        for (extra, field) in
            [(r#","k3":0"#, "target.k3"), (r#","k39":0"#, "target.k39"), (r#","kind":"b""#, "target.kind")]
        {
            assert_eq!(parse(&body(extra)), Err(SignError::DuplicateKey { field: field.into() }), "{extra}");
        }
        // Equal values at different places are not duplicates.
        assert!(parse(r#"{"target":{"kind":"blob","uri":"x"},"op":{"kind":"get_blob"},"x":{"kind":1}}"#).is_ok());
    }

    #[test]
    fn strict_json_reads_what_serde_json_reads() {
        for text in
            ["null", "true", "-1", "18446744073709551615", "1e400", "1.5", r#""a\u00e9""#, r#"[1,[2,{"a":[]}]]"#]
        {
            let ours = strict_json(text.as_bytes());
            let theirs: Result<Value, _> = serde_json::from_str(text);
            match (ours, theirs) {
                (Ok(a), Ok(b)) => assert_eq!(a, b, "{text}"),
                (Err(_), Err(_)) => {}
                (a, b) => panic!("{text}: ours {a:?}, serde_json {b:?}"),
            }
        }
    }

    mod properties {
        use proptest::prelude::*;
        use serde_json::Value;

        /// Any JSON document without a repeated key: scalars, escapes in
        /// keys and strings, objects below and above the scanned size.
        fn document() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(Value::from),
                any::<u64>().prop_map(Value::from),
                any::<f64>().prop_filter("JSON has no NaN or infinity", |f| f.is_finite()).prop_map(Value::from),
                r#"[a-z"\\\né😀]{0,6}"#.prop_map(Value::String),
            ];
            leaf.prop_recursive(4, 48, 12, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                    prop::collection::btree_map(r#"[a-z"\\é]{0,3}"#, inner, 0..12)
                        .prop_map(|members| Value::Object(members.into_iter().collect())),
                ]
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

            #[test]
            fn strict_json_reads_every_document_as_serde_json_does(value in document()) {
                let text = serde_json::to_string(&value).unwrap();
                let theirs: Value = serde_json::from_str(&text).unwrap();
                prop_assert_eq!(super::super::strict_json(text.as_bytes()), Ok(theirs));
            }
        }
    }
}
