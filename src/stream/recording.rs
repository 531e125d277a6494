//! Recordings: JSON Lines files of samples, read with per-line error reporting.
//!
//! Blank lines are skipped; a bad line is reported with its line number, counted and
//! skipped, so one corrupt line never costs the rest of a recording.

use std::path::{Path, PathBuf};

use super::sample::{DecodeError, Sample, SampleDecoder};

#[derive(Debug, thiserror::Error)]
pub enum RecordingError {
    #[error("cannot read recording {path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A bad line: where, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    pub line: usize,
    pub error: DecodeError,
}

/// A whole recording, decoded: the valid samples in order and the rejected lines.
#[derive(Debug, Clone)]
pub struct Recording {
    pub path: PathBuf,
    pub samples: Vec<Sample>,
    pub rejected: Vec<Rejected>,
}

impl Recording {
    pub fn read(path: &Path, decoder: &SampleDecoder) -> Result<Recording, RecordingError> {
        let text = std::fs::read_to_string(path).map_err(|source| RecordingError::Io {
            path: path.to_owned(),
            source,
        })?;
        let mut rec = Recording::parse(&text, decoder);
        rec.path = path.to_owned();
        Ok(rec)
    }

    pub fn parse(text: &str, decoder: &SampleDecoder) -> Recording {
        let mut samples = Vec::new();
        let mut rejected = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            match decoder.decode_json(line) {
                Ok(s) => samples.push(s),
                Err(error) => rejected.push(Rejected { line: i + 1, error }),
            }
        }
        Recording {
            path: PathBuf::new(),
            samples,
            rejected,
        }
    }
}
