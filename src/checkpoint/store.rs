//! A checkpoint directory: atomic saves, keep-last-K, and restoring the newest valid one.
//!
//! Each file is written to a temporary file in the same directory, fsynced and renamed
//! (`tempfile`'s persist), the manifest last, then the directory is fsynced: a crash at any
//! moment leaves either the old or the new checkpoint, never a torn one. Temporary files and
//! tensor files without a manifest (a crash between the two renames) are removed on open.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::codec::{self, Expected};
use super::manifest::{hex, Manifest, OptimizerMeta, FORMAT};
use super::{CheckpointError, Identity, Saved};
use crate::learn::{Learner, LearnerState};

pub struct CheckpointStore {
    dir: PathBuf,
    keep: usize,
    identity: Identity,
    next_sequence: u64,
}

/// A checkpoint that was restored.
#[derive(Debug, Clone)]
pub struct Restored {
    pub name: String,
    pub manifest: Manifest,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_owned(),
        source,
    }
}

impl CheckpointStore {
    /// Opens (creating) `dir`, removing what a crash left behind: temporary files, and tensor
    /// files whose manifest was never written.
    pub fn open(dir: &Path, keep: usize, identity: Identity) -> Result<Self, CheckpointError> {
        fs::create_dir_all(dir).map_err(io(dir))?;
        let mut max_seq = 0;
        for entry in fs::read_dir(dir).map_err(io(dir))?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if name.starts_with("ckpt-") && name.ends_with(".tmp") {
                let _ = fs::remove_file(&path);
            } else if name.ends_with(".safetensors")
                && sequence_of(&name).is_some()
                && !path.with_extension("json").exists()
            {
                tracing::info!(
                    "removing {}: its manifest was never written",
                    path.display()
                );
                let _ = fs::remove_file(&path);
            } else if let Some(seq) = sequence_of(&name) {
                max_seq = max_seq.max(seq);
            }
        }
        Ok(CheckpointStore {
            dir: dir.to_owned(),
            keep: keep.max(1),
            identity,
            next_sequence: max_seq + 1,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Manifests present, newest first.
    pub fn manifests(&self) -> Vec<PathBuf> {
        manifests_in(&self.dir)
    }

    /// Writes `state` atomically as the next checkpoint and prunes old ones. A state with a
    /// non-finite value is refused, so a poisoned learner never replaces a good checkpoint.
    pub fn save(&mut self, saved: &Saved) -> Result<Manifest, CheckpointError> {
        let state = &saved.learner;
        let bytes = codec::encode(state).map_err(CheckpointError::Unwritable)?;
        let seq = self.next_sequence;
        self.next_sequence += 1;
        let stem = format!("ckpt-{seq:010}");
        let tensors_name = format!("{stem}.safetensors");
        write_atomically(&self.dir, &tensors_name, &bytes)?;
        let id = &self.identity;
        let manifest = Manifest {
            format: FORMAT.into(),
            sequence: seq,
            created_unix_s: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            model_fingerprint: format!("{:016x}", id.model_fingerprint),
            model_path: id.model_path.clone(),
            config_hash: id.config_hash.clone(),
            tensors: tensors_name,
            tensors_bytes: bytes.len() as u64,
            tensors_sha256: hex(&Sha256::digest(&bytes)),
            classes: id.classes,
            embedding_dim: id.embedding_dim,
            sample_len: id.sample_len,
            layers: id.params.len() / 2,
            counters: state.counters,
            optimizer: OptimizerMeta::of(&state.optimizer),
            mounting: saved.mounting.clone(),
        };
        let json = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
        write_atomically(&self.dir, &format!("{stem}.json"), &json)?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))?;
        self.prune();
        Ok(manifest)
    }

    fn prune(&self) {
        for old in self.manifests().into_iter().skip(self.keep) {
            // Manifest first: without it the tensor file is never considered.
            let _ = fs::remove_file(&old);
            let _ = fs::remove_file(old.with_extension("safetensors"));
        }
    }

    /// Loads and checks one checkpoint.
    pub fn load(&self, manifest_path: &Path) -> Result<(Manifest, LearnerState), CheckpointError> {
        let name = manifest_path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let refuse = |reason: String| CheckpointError::Refused {
            name: name.clone(),
            reason,
        };
        let text =
            fs::read(manifest_path).map_err(|e| refuse(format!("cannot read manifest: {e}")))?;
        let m: Manifest = serde_json::from_slice(&text)
            .map_err(|e| refuse(format!("manifest is not valid: {e}")))?;
        if m.format != FORMAT {
            return Err(refuse(format!(
                "format {:?}, expected {FORMAT:?}",
                m.format
            )));
        }
        let id = &self.identity;
        let fingerprint = format!("{:016x}", id.model_fingerprint);
        if m.model_fingerprint != fingerprint {
            return Err(refuse(format!(
                "made for another model (fingerprint {} from {}, this model is {fingerprint})",
                m.model_fingerprint,
                m.model_path.display()
            )));
        }
        if (m.classes, m.embedding_dim, m.sample_len)
            != (id.classes, id.embedding_dim, id.sample_len)
        {
            return Err(refuse(format!(
                "shapes (classes {}, embedding {}, input {}) do not match the model's ({}, {}, {})",
                m.classes,
                m.embedding_dim,
                m.sample_len,
                id.classes,
                id.embedding_dim,
                id.sample_len
            )));
        }
        let bytes = fs::read(self.dir.join(&m.tensors))
            .map_err(|e| refuse(format!("tensor file {}: {e}", m.tensors)))?;
        if bytes.len() as u64 != m.tensors_bytes {
            return Err(refuse(format!(
                "tensor file is {} bytes, manifest says {} (truncated?)",
                bytes.len(),
                m.tensors_bytes
            )));
        }
        if hex(&Sha256::digest(&bytes)) != m.tensors_sha256 {
            return Err(refuse(
                "tensor file checksum does not match the manifest (corrupted)".into(),
            ));
        }
        if m.config_hash != id.config_hash {
            tracing::info!(
                "checkpoint {name} was made with other [learn] settings; restoring it anyway"
            );
        }
        let want = Expected {
            params: &id.params,
            classes: id.classes,
            sample_len: id.sample_len,
            optimizer: m.optimizer,
            counters: m.counters,
        };
        let state =
            codec::decode(&bytes, &want).map_err(|e| refuse(format!("tensor file: {e}")))?;
        Ok((m, state))
    }

    /// The newest checkpoint that passes every check, logging each refusal.
    pub fn latest_valid(&self) -> Option<(Manifest, LearnerState)> {
        self.manifests().iter().find_map(|p| {
            self.load(p)
                .map_err(|e| tracing::warn!("{}; trying an older one", crate::report(&e)))
                .ok()
        })
    }

    /// The model file and trainable layer count recorded by the newest manifest that parses
    /// (for `export` without a config).
    pub fn recorded_model(dir: &Path) -> Option<(PathBuf, usize)> {
        manifests_in(dir).iter().find_map(|p| {
            let m: Manifest = serde_json::from_slice(&fs::read(p).ok()?).ok()?;
            Some((m.model_path, m.layers))
        })
    }

    /// Restores the newest valid checkpoint into `learner`, logging every refusal; `None`
    /// when there is none (the learner keeps the pretrained state).
    pub fn restore_latest(&self, learner: &mut Learner) -> Option<Restored> {
        for path in self.manifests() {
            let loaded = self.load(&path).and_then(|(manifest, state)| {
                learner
                    .restore(state)
                    .map(|()| manifest)
                    .map_err(|e| CheckpointError::Refused {
                        name: path.display().to_string(),
                        reason: e.to_string(),
                    })
            });
            match loaded {
                Ok(manifest) => {
                    let name = path
                        .file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    tracing::info!(
                        "restored checkpoint {name} (teacher_version {}, train_steps {})",
                        manifest.counters.teacher_version,
                        manifest.counters.train_steps
                    );
                    return Some(Restored { name, manifest });
                }
                Err(e) => tracing::warn!("{}; trying an older one", crate::report(&e)),
            }
        }
        tracing::info!(
            "no usable checkpoint in {}; starting from the pretrained model",
            self.dir.display()
        );
        None
    }
}

fn manifests_in(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<(u64, PathBuf)> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name.ends_with(".json"))
                .then(|| sequence_of(&name).map(|s| (s, e.path())))
                .flatten()
        })
        .collect();
    found.sort_by_key(|f| std::cmp::Reverse(f.0));
    found.into_iter().map(|(_, p)| p).collect()
}

fn sequence_of(name: &str) -> Option<u64> {
    let rest = name.strip_prefix("ckpt-")?;
    let digits = rest.split('.').next()?;
    digits.parse().ok()
}

/// Writes `name` in `dir` through a synced temporary file renamed over it.
fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), CheckpointError> {
    let path = dir.join(name);
    let mut tmp = tempfile::Builder::new()
        .prefix("ckpt-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(io(&path))?;
    tmp.write_all(bytes).map_err(io(&path))?;
    tmp.as_file().sync_all().map_err(io(&path))?;
    tmp.persist(&path).map_err(|e| CheckpointError::Io {
        path: path.clone(),
        source: e.error,
    })?;
    Ok(())
}
