//! On-device learning: the student head, its losses and optimizer, the EMA teacher, buffers,
//! augmentations and pseudo-labels. Synchronous and free of tokio: the daemon and replay
//! drive it; it never does I/O.

pub mod augment;
pub mod buffer;
pub mod guard;
pub mod head;
pub mod learner;
pub mod loss;
pub mod optim;
pub mod pseudo;
pub mod rng;

pub use augment::AugmentConfig;
pub use guard::GuardConfig;
pub use head::LinearHead;
pub use learner::{Counters, LearnConfig, LearnError, Learner, StepReport};
pub use loss::{ConsistencyMode, LossParts};
