//! All integration tests, compiled into one binary (one link of tract instead of many).
//! Helpers live in `util`; fixtures in tests/data, the shipped model in models/ and the
//! shipped recordings in data/.

mod util;

mod adaptation;
mod broker_abuse;
mod calibration;
mod caps;
mod check_cli;
mod checkpoints;
mod config_file;
mod daemon;
mod export;
mod gate;
mod harness;
mod home_assistant;
mod hostile;
mod input_values;
mod label_requests;
mod layering;
mod learning;
mod model_loading;
mod packaging;
mod plot;
mod queues;
mod recordings;
mod reference;
mod refusals;
mod replay_cli;
mod requests;
mod rollback;
mod security;
mod session;
mod signals;
mod storage;
mod telemetry;
mod trust;
