//! Sliding windows from raw sensor rows, as IMU firmware publishes them.
//!
//! A row holds one reading of every channel. The assembler keeps the last `window` rows in a
//! ring and emits a window every `hop` rows once it is full, laid out in the model's input
//! order (time-major `[T, C]` or channel-major `[C, T]`, per [`Layout`]).

use super::layout::Layout;
use super::sample::DecodeError;

#[derive(Debug, Clone)]
pub struct WindowAssembler {
    layout: Layout,
    hop: usize,
    ring: Vec<f32>,
    /// Next row slot to write.
    next: usize,
    rows_seen: u64,
    since_emit: usize,
}

impl WindowAssembler {
    /// `layout.steps` is the window length in rows; `hop` rows separate window starts.
    pub fn new(layout: Layout, hop: usize) -> Self {
        WindowAssembler {
            layout,
            hop: hop.max(1),
            ring: vec![0.0; layout.steps * layout.channels],
            next: 0,
            rows_seen: 0,
            since_emit: 0,
        }
    }

    pub fn channels(&self) -> usize {
        self.layout.channels
    }

    /// Adds one row; returns a full window in the model's layout when one is due.
    pub fn push_row(&mut self, row: &[f32]) -> Option<Vec<f32>> {
        let (steps, channels) = (self.layout.steps, self.layout.channels);
        debug_assert_eq!(row.len(), channels);
        self.ring[self.next * channels..(self.next + 1) * channels].copy_from_slice(row);
        self.next = (self.next + 1) % steps;
        self.rows_seen += 1;
        self.since_emit += 1;
        if self.rows_seen < steps as u64 {
            return None;
        }
        if self.rows_seen > steps as u64 && self.since_emit < self.hop {
            return None;
        }
        self.since_emit = 0;
        let mut out = vec![0.0; steps * channels];
        for t in 0..steps {
            let slot = (self.next + t) % steps;
            for c in 0..channels {
                out[t * self.layout.step_stride + c * self.layout.channel_stride] =
                    self.ring[slot * channels + c];
            }
        }
        Some(out)
    }
}

/// Rows from a JSON payload: `[[c0, c1, ...], ...]`, a single row `[c0, c1, ...]`, or
/// `{"rows": [[...], ...]}`. Every row must have `channels` finite numbers.
pub fn rows_from_json(
    text: &str,
    channels: usize,
    out: &mut Vec<f32>,
) -> Result<usize, DecodeError> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| DecodeError::NotJson(e.to_string()))?;
    let rows = match &value {
        serde_json::Value::Object(o) => o.get("rows").ok_or(DecodeError::MissingX)?,
        v => v,
    };
    let serde_json::Value::Array(items) = rows else {
        return Err(DecodeError::NotAnObject);
    };
    out.clear();
    let single = items.iter().all(serde_json::Value::is_number);
    let rows: Vec<&serde_json::Value> = if single {
        vec![rows]
    } else {
        items.iter().collect()
    };
    for row in &rows {
        let serde_json::Value::Array(vals) = row else {
            return Err(DecodeError::WrongShape(vec![channels]));
        };
        if vals.len() != channels {
            return Err(DecodeError::WrongLength {
                got: vals.len(),
                expected: channels,
                shape: vec![channels],
            });
        }
        for v in vals {
            let i = out.len();
            let f = v.as_f64().ok_or(DecodeError::NotANumber(i))? as f32;
            if !f.is_finite() {
                return Err(DecodeError::NonFinite(i));
            }
            out.push(f);
        }
    }
    Ok(rows.len())
}

/// Rows from little-endian f32 bytes: a whole number of rows of `channels` values.
pub fn rows_from_f32le(
    bytes: &[u8],
    channels: usize,
    out: &mut Vec<f32>,
) -> Result<usize, DecodeError> {
    out.clear();
    decode_f32le(bytes, out)?;
    if out.is_empty() || out.len() % channels != 0 {
        return Err(DecodeError::WrongLength {
            got: out.len(),
            expected: channels,
            shape: vec![channels],
        });
    }
    Ok(out.len() / channels)
}

/// Appends little-endian f32 values; rejects a ragged length or a non-finite value.
pub fn decode_f32le(bytes: &[u8], out: &mut Vec<f32>) -> Result<(), DecodeError> {
    if bytes.len() % 4 != 0 {
        return Err(DecodeError::WrongLength {
            got: bytes.len(),
            expected: bytes.len() / 4 * 4,
            shape: vec![],
        });
    }
    let start = out.len();
    for (i, chunk) in bytes.chunks_exact(4).enumerate() {
        let v = f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        if !v.is_finite() {
            out.truncate(start);
            return Err(DecodeError::NonFinite(i));
        }
        out.push(v);
    }
    Ok(())
}
