//! The `POST /api/v1/blob/sign` request (wit/protocol.md §4.7, §9) parsed
//! into the wire model ([`SignRequest`]) with errors that name the field, and
//! with the signer's checks: no duplicate keys, no `namespace`, only the two
//! accepted pairs, a hint within S3's limits.

use std::cell::RefCell;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

use super::error::SignError;
use crate::wire::sign::{
    MAX_OBJECT_SIZE, MAX_PART_SIZE, MAX_PARTS, MIN_PART_SIZE, MultipartHint, Op, SignRequest, Target,
};

fn object<'a>(parent: &'a Map<String, Value>, field: &'static str) -> Result<&'a Map<String, Value>, SignError> {
    match parent.get(field) {
        None | Some(Value::Null) => Err(SignError::MissingField(field)),
        Some(Value::Object(o)) => Ok(o),
        Some(_) => Err(SignError::InvalidField { field, problem: "must be a JSON object".into() }),
    }
}

fn string<'a>(parent: &'a Map<String, Value>, name: &str, field: &'static str) -> Result<&'a str, SignError> {
    match parent.get(name) {
        None | Some(Value::Null) => Err(SignError::MissingField(field)),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(SignError::InvalidField { field, problem: "must be a string".into() }),
    }
}

fn number(parent: &Map<String, Value>, name: &str, field: &'static str) -> Result<u64, SignError> {
    match parent.get(name) {
        None | Some(Value::Null) => Err(SignError::MissingField(field)),
        Some(v) => v.as_u64().ok_or_else(|| SignError::InvalidField {
            field,
            problem: format!("must be a non-negative integer, got {v}"),
        }),
    }
}

/// Parses and checks a request body (everything but policy, which needs the caller).
pub fn parse(body: &[u8]) -> Result<SignRequest, SignError> {
    let value = strict_json(body)?;
    let Value::Object(root) = value else {
        return Err(SignError::InvalidField { field: "(body)", problem: "must be a JSON object".into() });
    };
    let target = object(&root, "target")?;
    let op = object(&root, "op")?;
    if root.contains_key("namespace") || target.contains_key("namespace") {
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
        other => return Err(SignError::UnknownKind { field: "op.kind", value: other.to_owned() }),
    };
    match (&target, &op) {
        (Target::Artifact { .. }, Op::PutArtifact { .. }) | (Target::Blob { .. }, Op::GetBlob) => {}
        (Target::Artifact { .. }, Op::GetBlob) => {
            return Err(SignError::UnsupportedCombination { target: "artifact", op: "get_blob" });
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
    let parsed = Strict { path: String::new(), duplicate: &duplicate }
        .deserialize(&mut deserializer)
        .and_then(|value| deserializer.end().map(|()| value));
    match (parsed, duplicate.into_inner()) {
        (_, Some(field)) => Err(SignError::DuplicateKey { field }),
        (Ok(value), None) => Ok(value),
        (Err(e), None) => Err(SignError::MalformedJson(e.to_string())),
    }
}

/// A JSON value at `path`; records the first duplicate key it meets.
struct Strict<'a> {
    path: String,
    duplicate: &'a RefCell<Option<String>>,
}

impl<'de> DeserializeSeed<'de> for Strict<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq
            .next_element_seed(Strict { path: format!("{}[{}]", self.path, items.len()), duplicate: self.duplicate })?
        {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let path = if self.path.is_empty() { key.clone() } else { format!("{}.{key}", self.path) };
            if object.contains_key(&key) {
                *self.duplicate.borrow_mut() = Some(path);
                return Err(de::Error::custom("duplicate key"));
            }
            let value = map.next_value_seed(Strict { path, duplicate: self.duplicate })?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

fn hint(op: &Map<String, Value>) -> Result<Option<MultipartHint>, SignError> {
    let hint = match op.get("multipart_hint") {
        None | Some(Value::Null) => return Ok(None),
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
}
