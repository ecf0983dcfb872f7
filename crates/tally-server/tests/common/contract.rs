//! Every answer a black-box test receives is checked against the OpenAPI document the
//! server publishes: the response schema documented for that path, method, status and
//! content type. An undocumented path or field, a missing required field or a wrong
//! type fails the test, so the document cannot drift from what the server really sends.
//! (Optional fields, `Option` in the schema types, may be absent: the check cannot tell
//! a forgotten nullable field from one an answer leaves out on purpose.)

use serde_json::Value;
use std::sync::OnceLock;

fn document() -> &'static Value {
    static DOCUMENT: OnceLock<Value> = OnceLock::new();
    DOCUMENT.get_or_init(|| serde_json::to_value(tally_server::openapi()).expect("the document serializes"))
}

/// The documented path template that `path` (without its query) matches, preferring
/// the template with the most literal segments (`/v1/usage/batch` over `/v1/usage/{id}`).
pub fn template_of(path: &str) -> Option<String> {
    let path = path.split('?').next().unwrap_or(path);
    let parts: Vec<&str> = path.split('/').collect();
    let mut best: Option<(usize, &String)> = None;
    for template in document()["paths"].as_object()?.keys() {
        let pattern: Vec<&str> = template.split('/').collect();
        if pattern.len() != parts.len() {
            continue;
        }
        let mut literal = 0;
        let matches = pattern.iter().zip(&parts).all(|(p, s)| {
            if p.starts_with('{') {
                !s.is_empty()
            } else {
                literal += 1;
                p == s
            }
        });
        if matches && best.is_none_or(|(count, _)| literal > count) {
            best = Some((literal, template));
        }
    }
    best.map(|(_, template)| template.clone())
}

/// The documented schema of an answer with this status and content type (`media`, for
/// example `application/problem+json`): the exact status first, then its class
/// (`4XX`), then `default`.
pub fn response_schema(method: &str, template: &str, status: u16, media: &str) -> Option<&'static Value> {
    let responses = &document()["paths"][template][method.to_lowercase()]["responses"];
    [status.to_string(), format!("{}XX", status / 100), "default".to_string()]
        .iter()
        .filter_map(|key| responses[key.as_str()]["content"].as_object())
        .find_map(|content| content.get(media))
        .map(|found| &found["schema"])
}

/// Panics with the offending place when `body` is not what the document promises.
/// `content_type` is the answer's header (parameters after `;` are ignored).
pub fn check(method: &str, path: &str, status: u16, content_type: &str, body: &Value) {
    if matches!(body, Value::String(_)) {
        return; // not JSON: an empty 204, CSV, HTML or plain text
    }
    if path.starts_with("/openapi.json") {
        return;
    }
    let Some(template) = template_of(path) else {
        panic!("{method} {path} answered {status} with JSON but the document has no such path: {body}");
    };
    let media = content_type.split(';').next().unwrap_or("").trim();
    let Some(schema) = response_schema(method, &template, status, media) else {
        panic!("{method} {template} answered {status} with {media} but documents no schema for it: {body}");
    };
    if let Err(problem) = validate(schema, body, "$") {
        panic!("{method} {path} ({status}) does not match its documented schema: {problem}\nbody: {body}");
    }
}

fn resolve(schema: &Value) -> &Value {
    match schema["$ref"].as_str() {
        Some(reference) => {
            let name = reference.trim_start_matches("#/components/schemas/");
            let target = &document()["components"]["schemas"][name];
            assert!(target.is_object(), "dangling reference {reference}");
            resolve(target)
        }
        None => schema,
    }
}

fn type_matches(kind: &str, value: &Value) -> bool {
    match kind {
        "null" => value.is_null(),
        "boolean" => value.is_boolean(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "string" => value.is_string(),
        "array" => value.is_array(),
        "object" => value.is_object(),
        other => panic!("unknown schema type {other}"),
    }
}

/// A validator for the part of JSON Schema the document uses: references, types
/// (nullable as a type list), enums, oneOf/anyOf/allOf, properties, required and items.
/// Objects are closed: a field the schema does not name is an error unless the schema
/// allows additional properties (or names none at all: a free-form object).
pub fn validate(schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    let schema = resolve(schema);
    if let Some(options) = schema["oneOf"].as_array().or(schema["anyOf"].as_array()) {
        let errors: Vec<String> = options.iter().filter_map(|option| validate(option, value, at).err()).collect();
        if errors.len() == options.len() {
            return Err(format!("{at}: matches none of the alternatives ({})", errors.join("; ")));
        }
    }
    if let Some(all) = schema["allOf"].as_array() {
        for part in all {
            validate(part, value, at)?;
        }
    }
    match &schema["type"] {
        Value::String(kind) if !type_matches(kind, value) => return Err(format!("{at}: expected {kind}, got {value}")),
        Value::Array(kinds) if !kinds.iter().any(|k| type_matches(k.as_str().unwrap_or(""), value)) => {
            return Err(format!("{at}: expected one of {kinds:?}, got {value}"))
        }
        _ => {}
    }
    if let Some(allowed) = schema["enum"].as_array() {
        if !allowed.contains(value) {
            return Err(format!("{at}: {value} is not one of {allowed:?}"));
        }
    }
    if let Value::Object(object) = value {
        let properties = schema["properties"].as_object();
        if let Some(required) = schema["required"].as_array() {
            for name in required.iter().filter_map(Value::as_str) {
                if !object.contains_key(name) {
                    return Err(format!("{at}: required field `{name}` is missing"));
                }
            }
        }
        for (name, field) in object {
            let place = format!("{at}.{name}");
            match (properties.and_then(|p| p.get(name)), &schema["additionalProperties"]) {
                (Some(field_schema), _) => validate(field_schema, field, &place)?,
                (None, Value::Object(extra)) => validate(&Value::Object(extra.clone()), field, &place)?,
                (None, Value::Bool(true)) => {}
                // A free-form object, or one whose alternatives (checked above) name its fields.
                (None, Value::Null) if properties.is_none() => {}
                (None, _) => return Err(format!("{place}: the schema does not document this field")),
            }
        }
    }
    if let (Value::Array(items), Some(item_schema)) = (value, schema.get("items")) {
        for (index, item) in items.iter().enumerate() {
            validate(item_schema, item, &format!("{at}[{index}]"))?;
        }
    }
    Ok(())
}
