//! A checkpoint directory: atomic saves, keep-last-K, and restoring the newest valid one.
//!
//! Each file is written to a temporary file in the same directory, fsynced and renamed
//! (`tempfile`'s persist), the manifest last, then the directory is fsynced: a crash at any
//! moment leaves either the old or the new checkpoint, never a torn one. Temporary files and
//! tensor files without a manifest (a crash between the two renames) are removed on open.
//!
//! The disk may be small, shared and changing under us. A save recreates a directory that
//! was deleted, and makes room *before* writing when the free space would not take the new
//! checkpoint (its size is known exactly before anything is written), removing this model's
//! oldest checkpoints but never the newest valid one. Only this model's checkpoints (by the
//! fingerprint in their manifest) are ever pruned: another model tried on the same directory
//! leaves them, so switching back resumes its adaptation.

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
    /// Bytes this model's newest checkpoint takes (tensor file and manifest): what the
    /// write budget expects the next one to cost.
    last_bytes: Option<u64>,
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
    /// files whose manifest was never written. Only the directory's writer (it holds the
    /// [`super::lock`]) may: to a reader, those are what a writer is in the middle of.
    pub fn open(dir: &Path, keep: usize, identity: Identity) -> Result<Self, CheckpointError> {
        fs::create_dir_all(dir).map_err(io(dir))?;
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
            }
        }
        let mut store = Self::open_read_only(dir, keep, identity)?;
        store.last_bytes = store.own_manifests().first().and_then(|p| {
            let manifest = fs::metadata(p).ok()?.len();
            let tensors = fs::metadata(p.with_extension("safetensors")).ok()?.len();
            Some(manifest + tensors)
        });
        Ok(store)
    }

    /// Opens `dir` for reading only (`edgemt check`, `edgemt export`): nothing is created or
    /// removed, so a daemon writing a checkpoint there meanwhile loses nothing (a tensor file
    /// whose manifest is not written yet is one it is writing, not a crash's leftover).
    pub fn open_read_only(
        dir: &Path,
        keep: usize,
        identity: Identity,
    ) -> Result<Self, CheckpointError> {
        let entries = match fs::read_dir(dir) {
            // Nothing saved there yet: no checkpoints to read.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            entries => entries.map_err(io(dir))?.flatten().collect(),
        };
        let mut max_seq = 0;
        for entry in entries {
            if let Some(seq) = sequence_of(&entry.file_name().to_string_lossy()) {
                max_seq = max_seq.max(seq);
            }
        }
        Ok(CheckpointStore {
            dir: dir.to_owned(),
            keep: keep.max(1),
            identity,
            next_sequence: max_seq + 1,
            last_bytes: None,
        })
    }

    /// Bytes the newest checkpoint of this model took on disk (tensor file and manifest).
    pub fn last_bytes(&self) -> Option<u64> {
        self.last_bytes
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
        let id = &self.identity;
        let manifest = Manifest {
            format: FORMAT.into(),
            sequence: seq,
            created_unix_s: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            model_fingerprint: format!("{:016x}", id.model_fingerprint),
            model_path: id.model_path.clone(),
            reference_path: id.reference_path.clone(),
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
            label_accuracy: saved.label_accuracy,
        };
        let json = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
        if !self.dir.is_dir() {
            // Said after it worked: a directory that cannot be made fails every save, and
            // the caller rate-limits that error; this line would not be.
            fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
            tracing::warn!(
                "checkpoint directory {} was gone; created it again",
                self.dir.display()
            );
        }
        self.make_room(&[bytes.len(), json.len()]);
        match self.write(&stem, &bytes, &json) {
            Err(e) if disk_full(&e) => {
                // The free-space estimate was wrong (metadata, another writer, a quota): the
                // temporaries are gone, so free everything of ours but the newest valid
                // checkpoint and try once more. Once more only: after that nothing of ours is
                // left to free, and a second failure says the disk is full of something else.
                let removed = self.prune_to_newest_valid();
                if removed.is_empty() {
                    return Err(e);
                }
                tracing::warn!(
                    "{}; removed {} to retry",
                    crate::report(&e),
                    removed.join(", ")
                );
                self.write(&stem, &bytes, &json)?;
            }
            other => other?,
        }
        self.last_bytes = Some((bytes.len() + json.len()) as u64);
        self.prune();
        Ok(manifest)
    }

    /// The tensor file, then the manifest, then the directory. A failure removes what was
    /// written of this checkpoint (the temporaries remove themselves), so a full disk is
    /// not left fuller.
    fn write(&self, stem: &str, tensors: &[u8], json: &[u8]) -> Result<(), CheckpointError> {
        let tensors_path = self.dir.join(format!("{stem}.safetensors"));
        write_atomically(&self.dir, &format!("{stem}.safetensors"), tensors)?;
        if let Err(e) = write_atomically(&self.dir, &format!("{stem}.json"), json) {
            let _ = fs::remove_file(&tensors_path);
            return Err(e);
        }
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))
    }

    /// This model's manifests (by fingerprint, whatever their format version), newest first.
    /// Other models' and unreadable ones are not ours to prune.
    fn own_manifests(&self) -> Vec<PathBuf> {
        /// The one field that says whose a checkpoint is.
        #[derive(serde::Deserialize)]
        struct Owner {
            model_fingerprint: String,
        }
        let fingerprint = format!("{:016x}", self.identity.model_fingerprint);
        self.manifests()
            .into_iter()
            .filter(|p| {
                fs::read(p)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<Owner>(&b).ok())
                    .is_some_and(|o| o.model_fingerprint == fingerprint)
            })
            .collect()
    }

    /// Removes one checkpoint, manifest first (without it the tensor file is never
    /// considered); its name.
    fn remove(manifest: &Path) -> String {
        let _ = fs::remove_file(manifest);
        let _ = fs::remove_file(manifest.with_extension("safetensors"));
        manifest
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    fn prune(&self) {
        for old in self.own_manifests().into_iter().skip(self.keep) {
            Self::remove(&old);
        }
    }

    /// Before writing files of `sizes` bytes: when the file system's free space would not
    /// take them, removes this model's checkpoints, oldest first, until it would, keeping
    /// the newest valid one whatever happens.
    fn make_room(&self, sizes: &[usize]) {
        let Some(space) = free_space(&self.dir) else {
            return;
        };
        // Whole blocks per file, and one more for the directory's own growth.
        let block = space.block.max(1);
        let need: u64 = block
            + sizes
                .iter()
                .map(|&s| (s as u64).div_ceil(block) * block)
                .sum::<u64>();
        if space.available >= need {
            return;
        }
        let own = self.own_manifests();
        let newest_valid = own.iter().find(|p| self.load(p).is_ok()).cloned();
        let mut removed = Vec::new();
        for old in own.iter().rev() {
            if Some(old) == newest_valid.as_ref() {
                continue;
            }
            removed.push(Self::remove(old));
            if free_space(&self.dir).is_some_and(|s| s.available >= need) {
                break;
            }
        }
        if !removed.is_empty() {
            tracing::info!(
                "{} had {} bytes free, {need} needed: removed {} first",
                self.dir.display(),
                space.available,
                removed.join(", ")
            );
        }
    }

    /// Removes every checkpoint of this model but the newest valid one; their names.
    fn prune_to_newest_valid(&self) -> Vec<String> {
        let own = self.own_manifests();
        let newest_valid = own.iter().find(|p| self.load(p).is_ok()).cloned();
        own.iter()
            .filter(|p| Some(*p) != newest_valid.as_ref())
            .map(|p| Self::remove(p))
            .collect()
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

    /// The model file, trainable layer count and embedding reference recorded by the newest
    /// manifest that parses (for `export` without a config).
    pub fn recorded_model(dir: &Path) -> Option<(PathBuf, usize, Option<PathBuf>)> {
        manifests_in(dir).iter().find_map(|p| {
            let m: Manifest = serde_json::from_slice(&fs::read(p).ok()?).ok()?;
            Some((m.model_path, m.layers, m.reference_path))
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

/// Free space for an unprivileged writer, and the file system's block size.
struct FreeSpace {
    available: u64,
    block: u64,
}

#[cfg(unix)]
fn free_space(dir: &Path) -> Option<FreeSpace> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs reads a NUL-terminated path and writes one struct we own; an all-zero
    // statvfs is a valid value of that plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(path.as_ptr(), &mut st) };
    // The field types are 32-bit on armv7 and 64-bit on x86_64 and aarch64.
    #[allow(clippy::unnecessary_cast)]
    (rc == 0).then(|| FreeSpace {
        available: (st.f_bavail as u64).saturating_mul(st.f_frsize as u64),
        block: st.f_frsize as u64,
    })
}

#[cfg(not(unix))]
fn free_space(_dir: &Path) -> Option<FreeSpace> {
    None
}

/// Whether a write failed for want of space (a full disk or a quota).
fn disk_full(e: &CheckpointError) -> bool {
    match e {
        CheckpointError::Io { source, .. } => {
            matches!(source.kind(), std::io::ErrorKind::StorageFull)
                || matches!(
                    source.raw_os_error(),
                    Some(libc::ENOSPC) | Some(libc::EDQUOT)
                )
        }
        _ => false,
    }
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
