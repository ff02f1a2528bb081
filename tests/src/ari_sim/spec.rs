//! Reader for Asterisk's ARI Swagger 1.2 api-docs and a validator for its model format.
//!
//! The simulator uses it to list the operations it does not simulate; the conformance tests use
//! it to check routes, status codes, response bodies and events against the spec.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// Environment variable naming the folder with Asterisk's ARI Swagger files.
pub const DOCS_ENV: &str = "ARI_API_DOCS";

/// Folder with the ARI Swagger files: `$ARI_API_DOCS`, else `../shared/ari-api-docs` from the repo root.
pub fn docs_dir() -> PathBuf {
    match std::env::var_os(DOCS_ENV) {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/ari-api-docs"),
    }
}

/// Why the spec could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// File that failed.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A file is not valid JSON or not shaped like Swagger 1.2.
    #[error("parsing {path}: {reason}")]
    Format {
        /// File that failed.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
}

/// One parameter of an operation.
#[derive(Debug, Clone)]
pub struct Param {
    /// Parameter name.
    pub name: String,
    /// `path`, `query` or `body`.
    pub param_type: String,
    /// Whether the spec marks it required.
    pub required: bool,
    /// Whether several values may be given (comma separated or JSON array).
    pub allow_multiple: bool,
    /// Swagger data type.
    pub data_type: String,
}

/// One HTTP operation of the spec.
#[derive(Debug, Clone)]
pub struct Operation {
    /// Resource file it comes from (`channels`, `bridges`, ...).
    pub resource: String,
    /// HTTP method in upper case.
    pub method: String,
    /// Path template relative to `/ari`, e.g. `/channels/{channelId}/play`.
    pub path: String,
    /// Swagger nickname, e.g. `originateWithId`.
    pub nickname: String,
    /// Declared parameters.
    pub params: Vec<Param>,
    /// Error status codes the spec lists for it.
    pub error_codes: Vec<u16>,
    /// Swagger response class (`Channel`, `List[Bridge]`, `void`, ...).
    pub response_class: String,
    /// Whether it is a WebSocket upgrade.
    pub websocket: bool,
}

impl Operation {
    /// Names of the path parameters in the template, in order.
    pub fn path_param_names(&self) -> Vec<String> {
        template_params(&self.path)
    }

    /// The parameter named `name`, if declared.
    pub fn param(&self, name: &str) -> Option<&Param> {
        self.params.iter().find(|p| p.name == name)
    }
}

/// Names of `{x}` segments in a path template.
pub fn template_params(path: &str) -> Vec<String> {
    path.split('/')
        .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .map(str::to_string)
        .collect()
}

/// One property of a model.
#[derive(Debug, Clone)]
pub struct Prop {
    /// Property name.
    pub name: String,
    /// Swagger type.
    pub ty: String,
    /// Whether it must be present.
    pub required: bool,
    /// Allowed values when the spec lists them.
    pub allowable: Option<Vec<String>>,
}

/// One model (object type) of the spec.
#[derive(Debug, Clone)]
pub struct Model {
    /// Model id.
    pub id: String,
    /// Declared properties.
    pub props: Vec<Prop>,
    /// Names of models that extend this one.
    pub sub_types: Vec<String>,
    /// Property that names the concrete subtype, if any.
    pub discriminator: Option<String>,
}

/// The whole ARI spec: operations of every resource and every model.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Folder it was read from.
    pub dir: PathBuf,
    /// All operations.
    pub operations: Vec<Operation>,
    /// All models by id.
    pub models: HashMap<String, Model>,
}

fn read_json(path: &Path) -> Result<Value, SpecError> {
    let text = std::fs::read_to_string(path).map_err(|source| SpecError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| SpecError::Format {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn code_of(v: &Value) -> Option<u16> {
    match v {
        Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

impl Spec {
    /// Reads `resources.json` and every resource file it lists from `dir`.
    pub fn load(dir: &Path) -> Result<Spec, SpecError> {
        let resources = read_json(&dir.join("resources.json"))?;
        let format = |reason: &str| SpecError::Format {
            path: dir.join("resources.json"),
            reason: reason.to_string(),
        };
        let apis = resources
            .get("apis")
            .and_then(Value::as_array)
            .ok_or_else(|| format("no apis list"))?;
        let mut spec = Spec {
            dir: dir.to_path_buf(),
            operations: Vec::new(),
            models: HashMap::new(),
        };
        for api in apis {
            let path = api
                .get("path")
                .and_then(Value::as_str)
                .ok_or_else(|| format("api without path"))?;
            let file = path
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .replace("{format}", "json");
            let resource = file.trim_end_matches(".json").to_string();
            spec.add_resource(&resource, &read_json(&dir.join(&file))?, &dir.join(&file))?;
        }
        Ok(spec)
    }

    fn add_resource(&mut self, resource: &str, doc: &Value, file: &Path) -> Result<(), SpecError> {
        let bad = |reason: String| SpecError::Format {
            path: file.to_path_buf(),
            reason,
        };
        for api in doc
            .get("apis")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let path = api
                .get("path")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("api without path".into()))?;
            for op in api
                .get("operations")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let method = op
                    .get("httpMethod")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad(format!("operation on {path} without httpMethod")))?;
                let params = op
                    .get("parameters")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .map(|p| Param {
                        name: p
                            .get("name")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_string(),
                        param_type: p
                            .get("paramType")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_string(),
                        required: p.get("required").and_then(Value::as_bool).unwrap_or(false),
                        allow_multiple: p
                            .get("allowMultiple")
                            .and_then(Value::as_bool)
                            .unwrap_or(false),
                        data_type: p
                            .get("dataType")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_string(),
                    })
                    .collect();
                let error_codes = op
                    .get("errorResponses")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|e| e.get("code").and_then(code_of))
                    .collect();
                self.operations.push(Operation {
                    resource: resource.to_string(),
                    method: method.to_ascii_uppercase(),
                    path: path.to_string(),
                    nickname: op
                        .get("nickname")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                    params,
                    error_codes,
                    response_class: op
                        .get("responseClass")
                        .and_then(Value::as_str)
                        .unwrap_or("void")
                        .to_string(),
                    websocket: op.get("upgrade").and_then(Value::as_str) == Some("websocket"),
                });
            }
        }
        if let Some(models) = doc.get("models").and_then(Value::as_object) {
            for (id, m) in models {
                let props = m
                    .get("properties")
                    .and_then(Value::as_object)
                    .into_iter()
                    .flatten()
                    .map(|(name, p)| Prop {
                        name: name.clone(),
                        ty: p
                            .get("type")
                            .and_then(Value::as_str)
                            .unwrap_or("object")
                            .to_string(),
                        required: p.get("required").and_then(Value::as_bool).unwrap_or(false),
                        allowable: p
                            .get("allowableValues")
                            .filter(|a| a.get("valueType").and_then(Value::as_str) == Some("LIST"))
                            .and_then(|a| a.get("values"))
                            .and_then(Value::as_array)
                            .map(|v| {
                                v.iter()
                                    .filter_map(|s| s.as_str().map(str::to_string))
                                    .collect()
                            }),
                    })
                    .collect();
                let sub_types = m
                    .get("subTypes")
                    .and_then(Value::as_array)
                    .map(|v| {
                        v.iter()
                            .filter_map(|s| s.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default();
                self.models.insert(
                    id.clone(),
                    Model {
                        id: id.clone(),
                        props,
                        sub_types,
                        discriminator: m
                            .get("discriminator")
                            .and_then(Value::as_str)
                            .map(str::to_string),
                    },
                );
            }
        }
        Ok(())
    }

    /// The operation serving `method` on `path` (relative to `/ari`, without query), if any.
    ///
    /// Literal segments win over `{param}` segments, as in Asterisk's handler tree.
    pub fn find_operation(&self, method: &str, path: &str) -> Option<&Operation> {
        let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let mut best: Option<(Vec<bool>, &Operation)> = None;
        for op in self
            .operations
            .iter()
            .filter(|o| o.method.eq_ignore_ascii_case(method))
        {
            let tsegs: Vec<&str> = op.path.trim_start_matches('/').split('/').collect();
            if tsegs.len() != segs.len() {
                continue;
            }
            let mut literal = Vec::with_capacity(segs.len());
            let mut ok = true;
            for (t, s) in tsegs.iter().zip(&segs) {
                if t.starts_with('{') {
                    literal.push(false);
                } else if t == s {
                    literal.push(true);
                } else {
                    ok = false;
                    break;
                }
            }
            if ok && best.as_ref().is_none_or(|(b, _)| literal > *b) {
                best = Some((literal, op));
            }
        }
        best.map(|(_, op)| op)
    }

    /// The operation with this method and path template, if any.
    pub fn operation(&self, method: &str, template: &str) -> Option<&Operation> {
        self.operations
            .iter()
            .find(|o| o.method.eq_ignore_ascii_case(method) && o.path == template)
    }

    /// Models that list `id` among their subtypes, transitively.
    fn ancestors(&self, id: &str) -> Vec<&Model> {
        let mut out = Vec::new();
        let mut current = id.to_string();
        while let Some(parent) = self
            .models
            .values()
            .find(|m| m.sub_types.contains(&current))
        {
            current = parent.id.clone();
            out.push(parent);
            if out.len() > 8 {
                break;
            }
        }
        out
    }

    /// Validates `value` against a Swagger type (`string`, `List[Channel]`, a model id, ...).
    ///
    /// Returns every problem found, each with the JSON path where it was found.
    pub fn validate(&self, ty: &str, value: &Value) -> Result<(), Vec<String>> {
        let mut errors = Vec::new();
        self.check(ty, value, "$", &mut errors);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// Validates an event or other WebSocket message: the `Message` model and the subtype its `type` names.
    pub fn validate_message(&self, value: &Value) -> Result<(), Vec<String>> {
        self.validate("Message", value)
    }

    fn check(&self, ty: &str, v: &Value, at: &str, errors: &mut Vec<String>) {
        if let Some(inner) = ty.strip_prefix("List[").and_then(|t| t.strip_suffix(']')) {
            match v.as_array() {
                Some(items) => {
                    for (i, item) in items.iter().enumerate() {
                        self.check(inner, item, &format!("{at}[{i}]"), errors);
                    }
                }
                None => errors.push(format!("{at}: expected a list of {inner}, got {v}")),
            }
            return;
        }
        let ok = match ty {
            "string" => v.is_string(),
            "int" | "long" => v.is_i64() || v.is_u64(),
            "double" | "float" | "number" => v.is_number(),
            "boolean" => v.is_boolean(),
            "object" | "containers" => v.is_object(),
            "Date" => v.as_str().is_some_and(is_ari_date),
            "void" | "binary" => true,
            model => {
                self.check_model(model, v, at, errors);
                return;
            }
        };
        if !ok {
            errors.push(format!("{at}: expected {ty}, got {v}"));
        }
    }

    fn check_model(&self, id: &str, v: &Value, at: &str, errors: &mut Vec<String>) {
        let Some(model) = self.models.get(id) else {
            errors.push(format!("{at}: unknown type {id}"));
            return;
        };
        let Some(obj) = v.as_object() else {
            errors.push(format!("{at}: expected a {id} object, got {v}"));
            return;
        };
        // A base model with a discriminator is validated as the subtype the value names.
        if let Some(disc) = &model.discriminator {
            match obj.get(disc).and_then(Value::as_str) {
                Some(name) if name != id => {
                    if self.is_descendant(name, id) {
                        self.check_model(name, v, at, errors);
                    } else {
                        errors.push(format!("{at}: {disc} {name:?} is not a subtype of {id}"));
                    }
                    return;
                }
                Some(_) => {}
                None => {
                    errors.push(format!("{at}: {id} without {disc}"));
                    return;
                }
            }
        }
        let mut props: Vec<&Prop> = model.props.iter().collect();
        for parent in self.ancestors(id) {
            props.extend(parent.props.iter());
        }
        for p in &props {
            match obj.get(&p.name) {
                None if p.required => errors.push(format!("{at}: {id} lacks required {}", p.name)),
                None => {}
                Some(val) => {
                    let here = format!("{at}.{}", p.name);
                    self.check(&p.ty, val, &here, errors);
                    if let (Some(allowed), Some(s)) = (&p.allowable, val.as_str()) {
                        if !allowed.iter().any(|a| a == s) {
                            errors.push(format!("{here}: {s:?} is not one of {allowed:?}"));
                        }
                    }
                }
            }
        }
        for key in obj.keys() {
            if !props.iter().any(|p| p.name == *key) {
                errors.push(format!("{at}: {id} has undocumented field {key}"));
            }
        }
    }

    fn is_descendant(&self, name: &str, ancestor: &str) -> bool {
        self.ancestors(name).iter().any(|m| m.id == ancestor)
    }
}

/// Whether `s` is a timestamp in ARI's `Date` format (`2024-01-01T12:00:00.000+0000`).
pub fn is_ari_date(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() != 28 {
        return false;
    }
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && b[19] == b'.'
        && digits(20..23)
        && (b[23] == b'+' || b[23] == b'-')
        && digits(24..28)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ari_dates() {
        assert!(is_ari_date("2024-01-01T12:00:00.000+0000"));
        assert!(is_ari_date("2024-01-01T12:00:00.123-0500"));
        assert!(!is_ari_date("2024-01-01T12:00:00Z"));
        assert!(!is_ari_date("2024-01-01 12:00:00.000+0000"));
    }

    #[test]
    fn literal_segments_win_over_parameters() {
        let op = |method: &str, path: &str| Operation {
            resource: "channels".into(),
            method: method.into(),
            path: path.into(),
            nickname: path.into(),
            params: Vec::new(),
            error_codes: Vec::new(),
            response_class: "void".into(),
            websocket: false,
        };
        let spec = Spec {
            dir: PathBuf::new(),
            operations: vec![
                op("POST", "/channels/{channelId}"),
                op("POST", "/channels/create"),
            ],
            models: HashMap::new(),
        };
        assert_eq!(
            spec.find_operation("POST", "/channels/create")
                .map(|o| o.path.as_str()),
            Some("/channels/create")
        );
        assert_eq!(
            spec.find_operation("POST", "/channels/abc")
                .map(|o| o.path.as_str()),
            Some("/channels/{channelId}")
        );
        assert!(spec.find_operation("GET", "/channels/abc").is_none());
        assert_eq!(
            template_params("/bridges/{bridgeId}/play/{playbackId}"),
            vec!["bridgeId", "playbackId"]
        );
    }
}
