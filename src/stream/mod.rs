//! Samples from outside: decoding and validating one sample, and reading recordings.
//!
//! Everything that arrives from a file or the network passes `SampleDecoder`, which checks
//! length, finiteness and class range, so nothing malformed reaches the learner.

pub mod layout;
pub mod recording;
pub mod sample;
pub mod window;

pub use layout::Layout;
pub use recording::{Recording, RecordingError, RecordingReader, Rejected};
pub use sample::{DecodeError, Line, Sample, SampleDecoder};
pub use window::WindowAssembler;
