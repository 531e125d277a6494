//! Samples from outside: decoding and validating one sample, and reading recordings.
//!
//! Everything that arrives from a file or the network passes `SampleDecoder`, which checks
//! length, finiteness and class range, so nothing malformed reaches the learner.

pub mod recording;
pub mod sample;
pub mod window;

pub use recording::{Recording, RecordingError};
pub use sample::{DecodeError, Sample, SampleDecoder};
pub use window::WindowAssembler;
