//! Recordings: JSON Lines files of samples and feedback, read one line at a time.
//!
//! [`RecordingReader`] streams a file (memory does not grow with its length): blank lines are
//! skipped, a bad line is reported with its line number and skipped, so one corrupt line
//! never costs the rest of a recording. [`Recording`] reads a whole (small) file at once.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use super::sample::{DecodeError, Line, Sample, SampleDecoder};

#[derive(Debug, thiserror::Error)]
pub enum RecordingError {
    #[error("cannot read recording {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A bad line: where, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    pub line: usize,
    pub error: DecodeError,
}

/// Reads a recording line by line.
pub struct RecordingReader<R> {
    path: PathBuf,
    input: R,
    decoder: SampleDecoder,
    line: usize,
    bytes: u64,
    text: String,
}

impl RecordingReader<std::io::BufReader<std::fs::File>> {
    pub fn open(path: &Path, decoder: &SampleDecoder) -> Result<Self, RecordingError> {
        let file = std::fs::File::open(path).map_err(|source| RecordingError::Io {
            path: path.to_owned(),
            source,
        })?;
        Ok(RecordingReader::new(
            path,
            std::io::BufReader::with_capacity(1 << 16, file),
            decoder,
        ))
    }
}

impl<R: BufRead> RecordingReader<R> {
    pub fn new(path: &Path, input: R, decoder: &SampleDecoder) -> Self {
        RecordingReader {
            path: path.to_owned(),
            input,
            decoder: decoder.clone(),
            line: 0,
            bytes: 0,
            text: String::new(),
        }
    }

    /// Bytes read so far (for progress).
    pub fn bytes_read(&self) -> u64 {
        self.bytes
    }

    /// The next line: `None` at the end, `Some(Err(..))` for an I/O failure,
    /// `Some(Ok(Err(rejected)))` for a line that does not decode.
    pub fn next_line(&mut self) -> Option<Result<Result<Line, Rejected>, RecordingError>> {
        loop {
            self.text.clear();
            match self.input.read_line(&mut self.text) {
                Ok(0) => return None,
                Ok(n) => self.bytes += n as u64,
                Err(source) => {
                    return Some(Err(RecordingError::Io {
                        path: self.path.clone(),
                        source,
                    }))
                }
            }
            self.line += 1;
            let line = self.text.trim();
            if line.is_empty() {
                continue;
            }
            return Some(Ok(self.decoder.decode_line(line).map_err(|error| {
                Rejected {
                    line: self.line,
                    error,
                }
            })));
        }
    }
}

/// A whole recording, decoded: the valid samples in order and the rejected lines.
#[derive(Debug, Clone)]
pub struct Recording {
    pub path: PathBuf,
    pub samples: Vec<Sample>,
    pub feedback: Vec<(String, usize)>,
    pub rejected: Vec<Rejected>,
}

impl Recording {
    pub fn read(path: &Path, decoder: &SampleDecoder) -> Result<Recording, RecordingError> {
        let mut reader = RecordingReader::open(path, decoder)?;
        Recording::collect(path, &mut reader)
    }

    pub fn parse(text: &str, decoder: &SampleDecoder) -> Recording {
        let mut reader = RecordingReader::new(Path::new(""), text.as_bytes(), decoder);
        Recording::collect(Path::new(""), &mut reader).expect("reading from memory cannot fail")
    }

    fn collect<R: BufRead>(
        path: &Path,
        reader: &mut RecordingReader<R>,
    ) -> Result<Recording, RecordingError> {
        let mut rec = Recording {
            path: path.to_owned(),
            samples: Vec::new(),
            feedback: Vec::new(),
            rejected: Vec::new(),
        };
        while let Some(line) = reader.next_line() {
            match line? {
                Ok(Line::Sample(s)) => rec.samples.push(s),
                Ok(Line::Feedback { id, label }) => rec.feedback.push((id, label)),
                Err(r) => rec.rejected.push(r),
            }
        }
        Ok(rec)
    }
}
