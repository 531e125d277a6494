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
}

/// Validates samples against a model's input shape and class count.
#[derive(Debug, Clone)]
pub struct SampleDecoder {
    pub shape: Vec<usize>,
    pub classes: usize,
}

impl SampleDecoder {
    pub fn new(shape: &[usize], classes: usize) -> Self {
        SampleDecoder {
            shape: shape.to_vec(),
            classes,
        }
    }

    pub fn sample_len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Decodes `{"x": [...], "label": k, "truth": k, "ts": s, "id": "..."}`; only `x` is
    /// required. `x` is flat or nested in the input shape.
    pub fn decode_json(&self, text: &str) -> Result<Sample, DecodeError> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| DecodeError::NotJson(e.to_string()))?;
        let Value::Object(obj) = value else {
            return Err(DecodeError::NotAnObject);
        };
        let x = obj.get("x").ok_or(DecodeError::MissingX)?;
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
        let id = match obj.get("id") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        };
        Ok(Sample {
            x: flat,
            label,
            truth,
            ts,
            id,
        })
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
            Some(v) => match v.as_u64() {
                Some(k) if (k as usize) < self.classes => Ok(Some(k as usize)),
                _ => Err(DecodeError::ClassOutOfRange {
                    field,
                    value: v.to_string(),
                    classes: self.classes,
                }),
            },
        }
    }
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
