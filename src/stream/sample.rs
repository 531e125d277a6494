//! One sample and its decoding from JSON.

use serde_json::Value;

/// A validated model input with its optional supervision and ground truth.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The model input for one sample, flat, row-major in the model's input shape.
    pub x: Vec<f32>,
    /// Supervision given to the learner.
    pub label: Option<usize>,
    /// Ground truth used only for scoring.
    pub truth: Option<usize>,
    /// Seconds, if the source gave a time.
    pub ts: Option<f64>,
    /// Identifier given by the source, if any.
    pub id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("not JSON: {0}")]
    NotJson(String),
    #[error("expected a JSON object with an \"x\" field")]
    NotAnObject,
    #[error("missing field \"x\"")]
    MissingX,
    #[error("\"x\" holds {got} values, expected {expected} (input shape {shape:?})")]
    WrongLength {
        got: usize,
        expected: usize,
        shape: Vec<usize>,
    },
    #[error("\"x\" has a non-numeric entry at position {0}")]
    NotANumber(usize),
    #[error("\"x\" has a non-finite value at position {0}")]
    NonFinite(usize),
    #[error("\"x\" has {value:e} at position {position}, beyond the limit of ±{max_abs:e} ([input] max_abs)")]
    TooLarge {
        position: usize,
        value: f32,
        max_abs: f32,
    },
    #[error("nested \"x\" does not have the input shape {0:?}")]
    WrongShape(Vec<usize>),
    #[error("\"{field}\" is {value}, expected a class index in 0..{classes}")]
    ClassOutOfRange {
        field: &'static str,
        value: String,
        classes: usize,
    },
    #[error("\"ts\" is not a finite number")]
    BadTimestamp,
    #[error("\"id\" is {0} bytes long, more than the {MAX_ID_BYTES} allowed")]
    IdTooLong(usize),
    #[error("\"id\" must be a string or a number")]
    BadId,
    #[error("label feedback needs \"id\" and \"label\"")]
    IncompleteFeedback,
    #[error("unknown field \"{field}\"{hint} (a line has x, label, truth, ts, id; put extra data under \"meta\", or replay with --allow-unknown-fields)")]
    UnknownField { field: String, hint: String },
}

/// The fields a sample or feedback line may carry; `meta` is free-form and never read, the
/// place for a source's own data.
pub const FIELDS: [&str; 6] = ["x", "label", "truth", "ts", "id", "meta"];

/// Longest sample id accepted: ids are kept for feedback, so their size must be bounded.
pub const MAX_ID_BYTES: usize = 256;

/// One line of a recording (or one message): a sample, or a label for an earlier sample.
#[derive(Debug, Clone, PartialEq)]
pub enum Line {
    Sample(Sample),
    /// `{"id": "s17", "label": 3}`: the sample with this id turned out to be class `label`.
    Feedback {
        id: String,
        label: usize,
    },
}

/// Validates samples against a model's input shape and class count.
#[derive(Debug, Clone)]
pub struct SampleDecoder {
    pub shape: Vec<usize>,
    pub classes: usize,
    /// Inputs beyond ±this are rejected (`[input] max_abs`).
    pub max_abs: f32,
    /// Fields other than [`FIELDS`] are ignored instead of refused. Off by default: a typo
    /// such as `"lable"` would otherwise make a labeled sample an unlabeled one, silently.
    pub allow_unknown_fields: bool,
}

impl SampleDecoder {
    pub fn new(shape: &[usize], classes: usize) -> Self {
        SampleDecoder {
            shape: shape.to_vec(),
            classes,
            max_abs: f32::MAX,
            allow_unknown_fields: false,
        }
    }

    /// The same decoder, ignoring fields it does not know instead of refusing them.
    pub fn allowing_unknown_fields(mut self) -> Self {
        self.allow_unknown_fields = true;
        self
    }

    /// The same decoder, rejecting inputs beyond ±`max_abs`.
    pub fn with_max_abs(mut self, max_abs: f32) -> Self {
        self.max_abs = max_abs;
        self
    }

    pub fn sample_len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Decodes `{"x": [...], "label": k, "truth": k, "ts": s, "id": "..."}`; only `x` is
    /// required. `x` is flat or nested in the input shape.
    pub fn decode_json(&self, text: &str) -> Result<Sample, DecodeError> {
        match self.decode_line(text)? {
            Line::Sample(s) => Ok(s),
            Line::Feedback { .. } => Err(DecodeError::MissingX),
        }
    }

    /// Decodes a sample line, or a feedback line `{"id": ..., "label": k}` (no `"x"`).
    pub fn decode_line(&self, text: &str) -> Result<Line, DecodeError> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| DecodeError::NotJson(e.to_string()))?;
        let Value::Object(obj) = value else {
            return Err(DecodeError::NotAnObject);
        };
        // A line with neither "x" nor feedback's fields is told it misses "x", whatever else
        // it has.
        let feedback_or_sample = ["x", "id", "label"].iter().any(|k| obj.contains_key(*k));
        if !self.allow_unknown_fields && feedback_or_sample {
            if let Some(field) = obj.keys().find(|k| !FIELDS.contains(&k.as_str())) {
                return Err(DecodeError::UnknownField {
                    field: field.chars().take(64).collect(),
                    hint: closest_field(field)
                        .map(|f| format!(", did you mean \"{f}\"?"))
                        .unwrap_or_default(),
                });
            }
        }
        let Some(x) = obj.get("x") else {
            return self.feedback(&obj);
        };
        let mut flat = Vec::with_capacity(self.sample_len());
        match x {
            Value::Array(items) if items.iter().all(Value::is_number) => {
                for (i, v) in items.iter().enumerate() {
                    flat.push(number(v, i)?);
                }
            }
            Value::Array(_) => flatten_nested(x, &self.shape, &mut flat)?,
            _ => return Err(DecodeError::NotANumber(0)),
        }
        if flat.len() != self.sample_len() {
            return Err(DecodeError::WrongLength {
                got: flat.len(),
                expected: self.sample_len(),
                shape: self.shape.clone(),
            });
        }
        self.check_magnitude(&flat)?;
        let label = self.class(obj.get("label"), "label")?;
        let truth = self.class(obj.get("truth"), "truth")?;
        let ts = match obj.get("ts") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                v.as_f64()
                    .filter(|t| t.is_finite())
                    .ok_or(DecodeError::BadTimestamp)?,
            ),
        };
        let id = id_of(obj.get("id"))?;
        Ok(Line::Sample(Sample {
            x: flat,
            label,
            truth,
            ts,
            id,
        }))
    }

    /// A feedback line: an object without `x` that has an id or a label.
    fn feedback(&self, obj: &serde_json::Map<String, Value>) -> Result<Line, DecodeError> {
        if !obj.contains_key("id") && !obj.contains_key("label") {
            return Err(DecodeError::MissingX);
        }
        let (id, label) = self.decode_feedback(obj)?;
        Ok(Line::Feedback { id, label })
    }

    /// A label for an earlier sample, `{"id": ..., "label": k}`: what a recording's feedback
    /// line and the daemon's labels topic both carry, read by this one function.
    pub fn decode_feedback(
        &self,
        obj: &serde_json::Map<String, Value>,
    ) -> Result<(String, usize), DecodeError> {
        let id = id_of(obj.get("id"))?;
        let label = self.class(obj.get("label"), "label")?;
        match (id, label) {
            (Some(id), Some(label)) => Ok((id, label)),
            _ => Err(DecodeError::IncompleteFeedback),
        }
    }

    /// Checks a raw input (e.g. decoded from f32le) for length and finiteness.
    pub fn check_values(&self, x: &[f32]) -> Result<(), DecodeError> {
        if x.len() != self.sample_len() {
            return Err(DecodeError::WrongLength {
                got: x.len(),
                expected: self.sample_len(),
                shape: self.shape.clone(),
            });
        }
        match x.iter().position(|v| !v.is_finite()) {
            Some(i) => Err(DecodeError::NonFinite(i)),
            None => self.check_magnitude(x),
        }
    }

    /// Checks finite values against `max_abs`.
    pub fn check_magnitude(&self, x: &[f32]) -> Result<(), DecodeError> {
        match x.iter().position(|v| v.abs() > self.max_abs) {
            Some(position) => Err(DecodeError::TooLarge {
                position,
                value: x[position],
                max_abs: self.max_abs,
            }),
            None => Ok(()),
        }
    }

    /// A class index in range, or an error naming the field.
    pub fn class(
        &self,
        v: Option<&Value>,
        field: &'static str,
    ) -> Result<Option<usize>, DecodeError> {
        match v {
            None | Some(Value::Null) => Ok(None),
            // try_from, not `as`: on a 32-bit board `4294967297 as usize` would be class 1.
            Some(v) => match v.as_u64().and_then(|k| usize::try_from(k).ok()) {
                Some(k) if k < self.classes => Ok(Some(k)),
                _ => Err(DecodeError::ClassOutOfRange {
                    field,
                    value: v.to_string(),
                    classes: self.classes,
                }),
            },
        }
    }
}

/// An id from a string or a number, bounded in length.
pub fn id_of(v: Option<&Value>) -> Result<Option<String>, DecodeError> {
    let id = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(_) => return Err(DecodeError::BadId),
    };
    if id.len() > MAX_ID_BYTES {
        return Err(DecodeError::IdTooLong(id.len()));
    }
    Ok(Some(id))
}

fn number(v: &Value, i: usize) -> Result<f32, DecodeError> {
    let f = v.as_f64().ok_or(DecodeError::NotANumber(i))? as f32;
    if f.is_finite() {
        Ok(f)
    } else {
        Err(DecodeError::NonFinite(i))
    }
}

fn flatten_nested(v: &Value, shape: &[usize], out: &mut Vec<f32>) -> Result<(), DecodeError> {
    match (v, shape.split_first()) {
        (Value::Array(items), Some((&n, rest))) if items.len() == n => {
            for item in items {
                flatten_nested(item, rest, out)?;
            }
            Ok(())
        }
        (Value::Number(_), None) => {
            let i = out.len();
            out.push(number(v, i)?);
            Ok(())
        }
        (Value::Array(_), None) | (Value::Number(_), Some(_)) | (Value::Array(_), Some(_)) => {
            Err(DecodeError::WrongShape(shape.to_vec()))
        }
        _ => Err(DecodeError::NotANumber(out.len())),
    }
}

/// The known field one or two edits from `field` (a typo: `lable`, `Label`, `truht`), if any.
fn closest_field(field: &str) -> Option<&'static str> {
    let field = field.to_ascii_lowercase();
    FIELDS
        .iter()
        .copied()
        .filter(|f| *f != "x" && field.len() < 16)
        .map(|f| (strsim::osa_distance(&field, f), f))
        // Two edits make any two short names alike ("y" and "ts"): one for short fields.
        .filter(|&(d, f)| d <= if f.len() <= 3 { 1 } else { 2 })
        .min_by_key(|&(d, _)| d)
        .map(|(_, f)| f)
}
