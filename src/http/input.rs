//! Reading client input the way the old FastAPI server did, and failing in its shape.
//!
//! Old clients parse `422 {"detail": [{"type", "loc", "msg", "input"}]}` (pydantic's error
//! list, `loc` like `["body", "chat_id"]`), so every problem with a body, a path or a query
//! parameter is reported here, all of them at once, in that shape. A body with no
//! `Content-Type` is read as JSON, as FastAPI did (Python `requests` with `data=` sends none).
//! Domain outcomes (`sandbox_conflict`, …) are not validation and keep their string details.

use axum::body::Bytes;
use axum::http::{header, HeaderMap};
use serde::Serialize;
use serde_json::{json, Map, Value};

use super::ApiError;
use crate::domain::request::InvalidInput;
use crate::domain::ChatId;

/// One entry of the pydantic-style error list.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FieldError {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub loc: Vec<Value>,
    pub msg: String,
    pub input: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ctx: Option<Value>,
}

/// Where a value came from: the first element of `loc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Body,
    Path,
    Query,
    Header,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Source::Body => "body",
            Source::Path => "path",
            Source::Query => "query",
            Source::Header => "header",
        }
    }
}

/// Collects every problem of one request; [`Problems::finish`] turns them into a 422.
#[derive(Debug, Default)]
pub struct Problems(Vec<FieldError>);

impl Problems {
    pub fn push(
        &mut self,
        kind: &'static str,
        source: Source,
        field: &str,
        msg: String,
        input: Value,
    ) {
        self.0.push(FieldError {
            kind,
            loc: vec![json!(source.as_str()), json!(field)],
            msg,
            input,
            ctx: None,
        });
    }

    /// A value of the right type that a rule refused (pydantic's `value_error`).
    pub fn value_error(&mut self, source: Source, field: &str, input: Value, e: &InvalidInput) {
        self.push(
            "value_error",
            source,
            field,
            format!("Value error, {e}"),
            input,
        );
    }

    /// Adds another collection's problems after these.
    pub fn extend(&mut self, other: Problems) {
        self.0.extend(other.0);
    }

    /// `Ok(())` when nothing was wrong, else the 422 with every problem.
    pub fn finish(self) -> Result<(), ApiError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ApiError::Validation(self.0))
        }
    }
}

/// One problem, answered at once (a path or query value that makes the rest moot).
pub fn reject(
    kind: &'static str,
    source: Source,
    field: &str,
    msg: String,
    input: Value,
) -> ApiError {
    let mut p = Problems::default();
    p.push(kind, source, field, msg, input);
    ApiError::Validation(p.0)
}

/// A chat id from the path or a body field, any UUID spelling.
pub fn chat_id(source: Source, field: &str, raw: &str) -> Result<ChatId, Box<FieldError>> {
    raw.parse::<ChatId>().map_err(|e| {
        Box::new(FieldError {
            kind: "uuid_parsing",
            loc: vec![json!(source.as_str()), json!(field)],
            msg: format!("Input should be a valid UUID, {e}"),
            input: json!(raw),
            ctx: Some(json!({ "error": e.to_string() })),
        })
    })
}

/// `chat_id` in the path.
pub fn path_chat_id(raw: &str) -> Result<ChatId, ApiError> {
    chat_id(Source::Path, "chat_id", raw).map_err(|e| ApiError::Validation(vec![*e]))
}

fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    match essence.split_once('/') {
        Some(("application", sub)) => sub == "json" || sub.ends_with("+json"),
        _ => false,
    }
}

/// The body as JSON: `application/json`, `application/*+json` or no `Content-Type` at all.
/// `Ok(None)` for an empty body when `optional`.
pub fn json_body(
    headers: &HeaderMap,
    body: &Bytes,
    optional: bool,
) -> Result<Option<Value>, ApiError> {
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        let ct = String::from_utf8_lossy(ct.as_bytes()).into_owned();
        if !is_json(&ct) {
            return Err(ApiError::Validation(vec![FieldError {
                kind: "content_type",
                loc: vec![json!("body")],
                msg: format!("Unsupported Content-Type `{ct}`: send application/json"),
                input: json!(ct),
                ctx: None,
            }]));
        }
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        if optional {
            return Ok(None);
        }
        // FastAPI: a required body that is absent.
        return Err(ApiError::Validation(vec![FieldError {
            kind: "missing",
            loc: vec![json!("body")],
            msg: "Field required".into(),
            input: Value::Null,
            ctx: None,
        }]));
    }
    serde_json::from_slice::<Value>(body)
        .map(Some)
        .map_err(|e| {
            // pydantic's `loc` for a decode error is the character position (the end of the
            // input for a truncated document).
            let line_start: usize = body
                .split(|b| *b == b'\n')
                .take(e.line().saturating_sub(1))
                .map(|l| l.len() + 1)
                .sum();
            let at = if e.is_eof() {
                body.len()
            } else {
                line_start + e.column().saturating_sub(1)
            };
            ApiError::Validation(vec![FieldError {
                kind: "json_invalid",
                loc: vec![json!("body"), json!(at)],
                msg: "JSON decode error".into(),
                input: json!({}),
                ctx: Some(json!({ "error": e.to_string() })),
            }])
        })
}

/// A required JSON body that must be an object (create, PUT).
pub fn json_object(headers: &HeaderMap, body: &Bytes) -> Result<Map<String, Value>, ApiError> {
    object(json_body(headers, body, false)?.unwrap_or_default())
}

/// A JSON object body, or the 422 an array / scalar gets.
pub fn object(value: Value) -> Result<Map<String, Value>, ApiError> {
    match value {
        Value::Object(m) => Ok(m),
        other => Err(ApiError::Validation(vec![FieldError {
            kind: "model_attributes_type",
            loc: vec![json!("body")],
            msg: "Input should be a valid dictionary or object to extract fields from".into(),
            input: other,
            ctx: None,
        }])),
    }
}

/// Field-by-field reading of a body object, recording problems instead of stopping.
pub struct Fields<'a> {
    obj: &'a Map<String, Value>,
    pub problems: Problems,
}

impl<'a> Fields<'a> {
    pub fn new(obj: &'a Map<String, Value>) -> Self {
        Self {
            obj,
            problems: Problems::default(),
        }
    }

    fn missing(&mut self, name: &str) {
        let whole = Value::Object(self.obj.clone());
        self.problems.push(
            "missing",
            Source::Body,
            name,
            "Field required".into(),
            whole,
        );
    }

    /// A required string (`null` is a wrong type, as in pydantic).
    pub fn string(&mut self, name: &str) -> Option<&'a str> {
        match self.obj.get(name) {
            None => {
                self.missing(name);
                None
            }
            Some(v) => self.string_value(name, v),
        }
    }

    /// An optional string (`null` = absent).
    pub fn optional_string(&mut self, name: &str) -> Option<&'a str> {
        match self.obj.get(name) {
            None | Some(Value::Null) => None,
            Some(v) => self.string_value(name, v),
        }
    }

    fn string_value(&mut self, name: &str, v: &'a Value) -> Option<&'a str> {
        if let Value::String(s) = v {
            return Some(s);
        }
        self.problems.push(
            "string_type",
            Source::Body,
            name,
            "Input should be a valid string".into(),
            v.clone(),
        );
        None
    }

    /// A required UUID.
    pub fn uuid(&mut self, name: &str) -> Option<ChatId> {
        match self.obj.get(name) {
            None => {
                self.missing(name);
                None
            }
            Some(Value::String(s)) => match chat_id(Source::Body, name, s) {
                Ok(id) => Some(id),
                Err(e) => {
                    self.problems.0.push(*e);
                    None
                }
            },
            Some(other) => {
                self.problems.push(
                    "uuid_type",
                    Source::Body,
                    name,
                    "UUID input should be a string, bytes or UUID object".into(),
                    other.clone(),
                );
                None
            }
        }
    }

    /// An optional integer in `min..=max` (`null` = absent). `Err(())` when it was invalid.
    #[allow(clippy::result_unit_err)]
    pub fn optional_int(&mut self, name: &str, min: u64, max: u64) -> Result<Option<u64>, ()> {
        match self.obj.get(name) {
            None | Some(Value::Null) => Ok(None),
            // A whole float (`60.0`) is an integer, as in JSON Schema and pydantic's lax mode.
            Some(v) => match whole(v).filter(|n| (min..=max).contains(n)) {
                Some(n) => Ok(Some(n)),
                None if v.is_i64() || v.is_u64() || whole_f64(v).is_some() => {
                    let msg = format!("Input should be between {min} and {max}");
                    let below = whole_f64(v).is_some_and(|n| n < min as f64);
                    let kind = if below {
                        "greater_than_equal"
                    } else {
                        "less_than_equal"
                    };
                    self.problems.push(kind, Source::Body, name, msg, v.clone());
                    Err(())
                }
                None => {
                    self.problems.push(
                        "int_type",
                        Source::Body,
                        name,
                        "Input should be a valid integer".into(),
                        v.clone(),
                    );
                    Err(())
                }
            },
        }
    }

    /// Every key not in `known` is an error, as with the old `extra='forbid'` models.
    pub fn forbid_others(&mut self, known: &[&str]) {
        for (k, v) in self.obj {
            if !known.contains(&k.as_str()) {
                self.problems.push(
                    "extra_forbidden",
                    Source::Body,
                    k,
                    "Extra inputs are not permitted".into(),
                    v.clone(),
                );
            }
        }
    }
}

/// A JSON number with no fractional part, as a float.
fn whole_f64(v: &Value) -> Option<f64> {
    v.as_f64().filter(|f| f.is_finite() && f.fract() == 0.0)
}

/// A non-negative whole JSON number (`60` or `60.0`) that fits a `u64`.
fn whole(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| {
        whole_f64(v)
            .filter(|f| *f >= 0.0 && *f <= u64::MAX as f64)
            .map(|f| f as u64)
    })
}

/// Query parameters as given; unknown ones are ignored, as FastAPI did.
pub struct QueryParams(Vec<(String, String)>);

impl QueryParams {
    pub fn parse(raw: Option<&str>) -> Result<Self, ApiError> {
        let raw = raw.unwrap_or_default();
        serde_urlencoded::from_str::<Vec<(String, String)>>(raw)
            .map(Self)
            .map_err(|e| {
                ApiError::Validation(vec![FieldError {
                    kind: "query_invalid",
                    loc: vec![json!("query")],
                    msg: format!("Unreadable query string: {e}"),
                    input: json!(raw),
                    ctx: None,
                }])
            })
    }

    /// The last value of `name` (FastAPI takes the last of repeated scalars).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// An optional integer parameter in `min..=max`.
    /// A boolean flag (`true`/`1`/`yes`/`on` or `false`/`0`/`no`/`off`/empty); absent is false.
    pub fn flag(&self, name: &str, problems: &mut Problems) -> bool {
        match self.get(name).map(str::to_ascii_lowercase).as_deref() {
            None | Some("false" | "0" | "no" | "off" | "") => false,
            Some("true" | "1" | "yes" | "on") => true,
            Some(other) => {
                problems.push(
                    "bool_parsing",
                    Source::Query,
                    name,
                    "Input should be a valid boolean, unable to interpret input".into(),
                    json!(other),
                );
                false
            }
        }
    }

    pub fn int(&self, name: &str, min: u64, max: u64, problems: &mut Problems) -> Option<u64> {
        let raw = self.get(name)?;
        match raw.trim().parse::<i128>() {
            Ok(n) if (i128::from(min)..=i128::from(max)).contains(&n) => u64::try_from(n).ok(),
            Ok(n) => {
                let kind = if n < i128::from(min) {
                    "greater_than_equal"
                } else {
                    "less_than_equal"
                };
                problems.push(
                    kind,
                    Source::Query,
                    name,
                    format!("Input should be between {min} and {max}"),
                    json!(raw),
                );
                None
            }
            Err(_) => {
                problems.push(
                    "int_parsing",
                    Source::Query,
                    name,
                    "Input should be a valid integer, unable to parse string as an integer".into(),
                    json!(raw),
                );
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detail(e: ApiError) -> Vec<FieldError> {
        match e {
            ApiError::Validation(v) => v,
            other => panic!("not a validation error: {other}"),
        }
    }

    #[test]
    fn content_types_read_as_json() {
        let body = Bytes::from_static(b"{}");
        for ct in [
            None,
            Some("application/json"),
            Some("application/json; charset=utf-8"),
            Some("application/vnd.x+json"),
        ] {
            let mut h = HeaderMap::new();
            if let Some(ct) = ct {
                h.insert(header::CONTENT_TYPE, ct.parse().unwrap());
            }
            assert_eq!(
                json_body(&h, &body, false).unwrap(),
                Some(json!({})),
                "{ct:?}"
            );
        }
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, "text/plain".parse().unwrap());
        let e = detail(json_body(&h, &body, false).unwrap_err());
        assert_eq!(e[0].kind, "content_type");
        assert!(e[0].msg.contains("text/plain"));
    }

    #[test]
    fn decode_errors_point_at_the_character() {
        let e = detail(
            json_body(
                &HeaderMap::new(),
                &Bytes::from_static(b"{\n \"a\": }"),
                false,
            )
            .unwrap_err(),
        );
        assert_eq!(e[0].kind, "json_invalid");
        assert_eq!(e[0].loc, vec![json!("body"), json!(8)]);
    }

    #[test]
    fn every_field_problem_is_reported_at_once() {
        let obj = object(json!({"chat_id": "x", "agent_id": 5, "extra": true})).unwrap();
        let mut f = Fields::new(&obj);
        assert!(f.uuid("chat_id").is_none());
        assert!(f.string("agent_id").is_none());
        assert!(f.string("volume_host_path").is_none());
        f.forbid_others(&["chat_id", "agent_id", "volume_host_path"]);
        let kinds: Vec<_> = f.problems.0.iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            ["uuid_parsing", "string_type", "missing", "extra_forbidden"]
        );
        assert_eq!(
            f.problems.0[2].loc,
            vec![json!("body"), json!("volume_host_path")]
        );
    }

    #[test]
    fn arrays_are_not_objects() {
        let e = detail(object(json!([1, 2])).unwrap_err());
        assert_eq!(e[0].kind, "model_attributes_type");
        assert_eq!(e[0].loc, vec![json!("body")]);
    }

    #[test]
    fn integers_are_bounded() {
        let obj = object(json!({"a": 0, "b": 5, "c": "x", "d": null, "e": 99, "f": 7.0, "g": 1.5}))
            .unwrap();
        let mut f = Fields::new(&obj);
        assert!(f.optional_int("a", 1, 10).is_err());
        assert_eq!(f.optional_int("b", 1, 10), Ok(Some(5)));
        assert!(f.optional_int("c", 1, 10).is_err());
        assert_eq!(f.optional_int("d", 1, 10), Ok(None));
        assert!(f.optional_int("e", 1, 10).is_err());
        assert_eq!(f.optional_int("f", 1, 10), Ok(Some(7)));
        assert!(f.optional_int("g", 1, 10).is_err());
        let kinds: Vec<_> = f.problems.0.iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            [
                "greater_than_equal",
                "int_type",
                "less_than_equal",
                "int_type"
            ]
        );
    }
}
