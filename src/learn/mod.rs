//! On-device learning: the student's losses and optimizer, the EMA teacher, buffers,
//! augmentations, pseudo-labels, the rollback guard, the serving gate and label trust. Synchronous and free of tokio: the
//! session drives it; it never does I/O. It trains an [`crate::nn::Mlp`] and reaches the
//! frozen backbone only through the [`Embed`] trait, so it does not depend on `model/`.

pub mod augment;
pub mod buffer;
pub mod gate;
pub mod guard;
pub mod learner;
pub mod loss;
pub mod optim;
pub mod pseudo;
pub mod reference;
pub mod requests;
pub mod rng;
pub mod trust;

pub use augment::AugmentConfig;
pub use gate::{GateConfig, Serving};
pub use guard::GuardConfig;
pub use learner::{
    Counters, Embed, EmbedError, LearnConfig, LearnError, Learner, LearnerState, StepReport,
};
pub use loss::{ConsistencyMode, LossParts};
pub use reference::EmbeddingReference;
pub use requests::{RequestConfig, Requests};
pub use trust::TrustConfig;
