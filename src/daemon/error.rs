//! The daemon's error: what stops it from starting, in words that say what to fix. Its own
//! module so that every part of the daemon can return it without importing the module that
//! orchestrates them.

use crate::config::ConfigError;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("setting up the daemon: {0}")]
    Setup(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Another daemon holds the state directory.
    #[error(transparent)]
    Instance(#[from] crate::checkpoint::lock::InstanceError),
}
