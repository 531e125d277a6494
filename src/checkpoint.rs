//! Durable learner state: checkpoints that survive power loss.
//!
//! A checkpoint is two files: `ckpt-<seq>.safetensors` (every tensor: the three heads,
//! optimizer moments, the labeled buffer, the alignment distribution) and `ckpt-<seq>.json`,
//! a small manifest with counters, shapes, the model's fingerprint, the config hash and the
//! SHA-256 of the tensor file. Each file is written to a temporary name, fsynced and renamed,
//! the manifest last, then the directory is fsynced: a manifest that exists names a complete
//! tensor file, so a crash at any moment leaves either the old or the new checkpoint, never a
//! torn one. On start the newest checkpoint that passes every check is restored; anything
//! corrupted, truncated or foreign is refused with the reason and the next older one tried.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use ndarray::{Array1, Array2};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::learn::buffer::LabeledBuffer;
use crate::learn::loss::Gradients;
use crate::learn::optim::Optimizer;
use crate::learn::{Counters, LearnConfig, Learner, LinearHead};

const FORMAT: &str = "edgemt-checkpoint/1";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint I/O on {path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("checkpoint {name} refused: {reason}")]
    Refused { name: String, reason: String },
}

/// `[checkpoint]`: where and how often.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Directory for checkpoints. Default for `edgemt run`: $STATE_DIRECTORY (systemd's
    /// StateDirectory) when set, else no checkpoints. `replay --checkpoint DIR` overrides.
    pub dir: Option<PathBuf>,
    /// Save after this many student steps...
    pub every_steps: u64,
    /// ...or this many seconds, whichever comes first (daemon only).
    pub every_s: f64,
    /// Checkpoints kept; older ones are deleted.
    pub keep: usize,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            dir: None,
            every_steps: 100,
            every_s: 300.0,
            keep: 3,
        }
    }
}

/// What the manifest records besides the tensors.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: String,
    pub sequence: u64,
    pub created_unix_s: f64,
    pub model_fingerprint: String,
    pub model_path: PathBuf,
    pub config_hash: String,
    pub tensors: String,
    pub tensors_bytes: u64,
    pub tensors_sha256: String,
    pub classes: usize,
    pub embedding_dim: usize,
    pub sample_len: usize,
    pub counters: Counters,
    pub optimizer: OptimizerMeta,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum OptimizerMeta {
    Sgd {
        momentum: f32,
    },
    Adam {
        beta1: f32,
        beta2: f32,
        eps: f32,
        t: u64,
    },
}

/// The identity of what a checkpoint must match to be restored.
#[derive(Debug, Clone)]
pub struct Identity {
    pub model_fingerprint: u64,
    pub model_path: PathBuf,
    pub config_hash: String,
    pub classes: usize,
    pub embedding_dim: usize,
    pub sample_len: usize,
}

impl Identity {
    fn empty() -> Self {
        Identity {
            model_fingerprint: 0,
            model_path: PathBuf::new(),
            config_hash: String::new(),
            classes: 0,
            embedding_dim: 0,
            sample_len: 0,
        }
    }

    pub fn new(classifier: &crate::model::Classifier, learn: &LearnConfig) -> Self {
        Identity {
            model_fingerprint: classifier.fingerprint,
            model_path: fs::canonicalize(&classifier.path)
                .unwrap_or_else(|_| classifier.path.clone()),
            config_hash: config_hash(learn),
            classes: classifier.classes(),
            embedding_dim: classifier.embedding_dim,
            sample_len: classifier.sample_len(),
        }
    }
}

/// Hash of the learning config, to tell in a log that a checkpoint was made with other knobs.
pub fn config_hash(learn: &LearnConfig) -> String {
    let text = toml::to_string(learn).unwrap_or_default();
    hex(&Sha256::digest(text.as_bytes()))[..16].to_string()
}

/// A learner's state, copied out so it can be written on another thread.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub heads: [LinearHead; 3],
    pub optimizer: Optimizer,
    pub counters: Counters,
    pub labeled: LabeledBuffer,
    pub running: Array1<f32>,
}

impl Snapshot {
    pub fn of(learner: &Learner) -> Self {
        Snapshot {
            heads: [
                learner.student.clone(),
                learner.teacher.clone(),
                learner.source.clone(),
            ],
            optimizer: learner.optimizer.clone(),
            counters: learner.counters,
            labeled: learner.labeled.clone(),
            running: learner.pseudo.running.clone(),
        }
    }

    /// Puts the state into `learner`, refilling its labeled buffer (of the configured
    /// capacity) oldest first.
    pub fn restore_into(self, learner: &mut Learner) {
        let (l, d) = (
            self.labeled.ring(0).sample_len(),
            self.heads[0].embedding_dim(),
        );
        let mut labeled = LabeledBuffer::new(
            self.labeled.classes(),
            learner.config().labeled_per_class,
            l,
            d,
        );
        for class in 0..self.labeled.classes() {
            let ring = self.labeled.ring(class);
            for i in ring.oldest_first() {
                labeled.push(ring.input(i), ring.embedding(i), class);
            }
        }
        learner.restore(
            self.heads,
            self.optimizer,
            self.counters,
            labeled,
            self.running,
        );
    }
}

/// A checkpoint directory.
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

impl CheckpointStore {
    /// Opens (creating) `dir`, removing temporary files a crash left behind.
    pub fn open(dir: &Path, keep: usize, identity: Identity) -> Result<Self, CheckpointError> {
        fs::create_dir_all(dir).map_err(|source| CheckpointError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let mut max_seq = 0;
        for entry in fs::read_dir(dir)
            .map_err(|source| CheckpointError::Io {
                path: dir.to_owned(),
                source,
            })?
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("ckpt-") && name.ends_with(".tmp") {
                let _ = fs::remove_file(entry.path());
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
        let mut found: Vec<(u64, PathBuf)> = fs::read_dir(&self.dir)
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

    /// Writes `snapshot` atomically as the next checkpoint and prunes old ones.
    pub fn save(&mut self, snapshot: &Snapshot) -> Result<Manifest, CheckpointError> {
        let seq = self.next_sequence;
        self.next_sequence += 1;
        let stem = format!("ckpt-{seq:010}");
        let tensors_name = format!("{stem}.safetensors");
        let bytes = encode_tensors(snapshot);
        let tensors_path = self.dir.join(&tensors_name);
        write_atomically(&tensors_path, &bytes)?;
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
            counters: snapshot.counters,
            optimizer: match &snapshot.optimizer {
                Optimizer::Sgd { momentum, .. } => OptimizerMeta::Sgd {
                    momentum: *momentum,
                },
                Optimizer::Adam {
                    beta1,
                    beta2,
                    eps,
                    t,
                    ..
                } => OptimizerMeta::Adam {
                    beta1: *beta1,
                    beta2: *beta2,
                    eps: *eps,
                    t: *t,
                },
            },
        };
        let json = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
        write_atomically(&self.dir.join(format!("{stem}.json")), &json)?;
        sync_dir(&self.dir)?;
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
    pub fn load(&self, manifest_path: &Path) -> Result<(Manifest, Snapshot), CheckpointError> {
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
        let tensors_path = self.dir.join(&m.tensors);
        let bytes = fs::read(&tensors_path)
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
        let tensors = decode_tensors(&bytes).map_err(|e| refuse(format!("tensor file: {e}")))?;
        let snapshot = snapshot_from(&m, tensors).map_err(refuse)?;
        Ok((m, snapshot))
    }

    /// The newest checkpoint that passes every check, logging each refusal.
    pub fn latest_valid(&self) -> Option<(Manifest, Snapshot)> {
        self.manifests().iter().find_map(|p| {
            self.load(p)
                .map_err(|e| tracing::warn!("{e}; trying an older one"))
                .ok()
        })
    }

    /// The model file recorded by the newest manifest that parses (for `export` without a
    /// config).
    pub fn recorded_model_path(dir: &Path) -> Option<PathBuf> {
        let probe = CheckpointStore {
            dir: dir.to_owned(),
            keep: 1,
            identity: Identity::empty(),
            next_sequence: 0,
        };
        probe.manifests().iter().find_map(|p| {
            let m: Manifest = serde_json::from_slice(&fs::read(p).ok()?).ok()?;
            Some(m.model_path)
        })
    }

    /// Restores the newest valid checkpoint into `learner`, logging every refusal; `None`
    /// when there is none (the learner keeps the pretrained state).
    pub fn restore_latest(&self, learner: &mut Learner) -> Option<Restored> {
        for path in self.manifests() {
            match self.load(&path) {
                Ok((manifest, snapshot)) => {
                    snapshot.restore_into(learner);
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
                Err(e) => tracing::warn!("{e}; trying an older one"),
            }
        }
        for entry in fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let p = entry.path();
            if p.extension().is_some_and(|e| e == "safetensors")
                && !p.with_extension("json").exists()
            {
                tracing::warn!("{} has no manifest; ignored", p.display());
            }
        }
        tracing::info!(
            "no usable checkpoint in {}; starting from the pretrained model",
            self.dir.display()
        );
        None
    }
}

fn sequence_of(name: &str) -> Option<u64> {
    let rest = name.strip_prefix("ckpt-")?;
    let digits = rest.split('.').next()?;
    digits.parse().ok()
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let tmp = path.with_extension(format!(
        "{}.tmp",
        path.extension()
            .map(|e| e.to_string_lossy())
            .unwrap_or_default()
    ));
    let io = |source| CheckpointError::Io {
        path: path.to_owned(),
        source,
    };
    let mut f = File::create(&tmp).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    fs::rename(&tmp, path).map_err(io)
}

fn sync_dir(dir: &Path) -> Result<(), CheckpointError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| CheckpointError::Io {
            path: dir.to_owned(),
            source,
        })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Named f32 tensors in the safetensors layout: u64 LE header length, JSON header, data.
fn encode_tensors(s: &Snapshot) -> Vec<u8> {
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let mut add =
        |name: String, shape: Vec<usize>, data: Vec<f32>| tensors.push((name, shape, data));
    for (role, head) in ["student", "teacher", "source"].iter().zip(&s.heads) {
        add(
            format!("{role}.weight"),
            head.weight.shape().to_vec(),
            head.weight.iter().copied().collect(),
        );
        add(
            format!("{role}.bias"),
            vec![head.bias.len()],
            head.bias.to_vec(),
        );
    }
    let mut state = |prefix: &str, g: &Gradients| {
        add(
            format!("{prefix}.weight"),
            g.weight.shape().to_vec(),
            g.weight.iter().copied().collect(),
        );
        add(
            format!("{prefix}.bias"),
            vec![g.bias.len()],
            g.bias.to_vec(),
        );
    };
    match &s.optimizer {
        Optimizer::Sgd { velocity, .. } => state("optim.velocity", velocity),
        Optimizer::Adam { m, v, .. } => {
            state("optim.m", m);
            state("optim.v", v);
        }
    }
    add(
        "pseudo.running".into(),
        vec![s.running.len()],
        s.running.to_vec(),
    );
    for class in 0..s.labeled.classes() {
        let ring = s.labeled.ring(class);
        let slots: Vec<usize> = ring.oldest_first().collect();
        let inputs: Vec<f32> = slots
            .iter()
            .flat_map(|&i| ring.input(i).iter().copied())
            .collect();
        let embs: Vec<f32> = slots
            .iter()
            .flat_map(|&i| ring.embedding(i).to_vec())
            .collect();
        add(
            format!("labeled.{class}.inputs"),
            vec![slots.len(), ring.sample_len()],
            inputs,
        );
        add(
            format!("labeled.{class}.embeddings"),
            vec![slots.len(), s.heads[0].embedding_dim()],
            embs,
        );
    }

    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": FORMAT}));
    let mut offset = 0usize;
    for (name, shape, data) in &tensors {
        let end = offset + data.len() * 4;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut head = serde_json::to_vec(&header).expect("header serializes");
    while head.len() % 8 != 0 {
        head.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + head.len() + offset);
    out.extend_from_slice(&(head.len() as u64).to_le_bytes());
    out.extend_from_slice(&head);
    for (_, _, data) in &tensors {
        for v in data {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out
}

type Tensors = HashMap<String, (Vec<usize>, Vec<f32>)>;

fn decode_tensors(bytes: &[u8]) -> Result<Tensors, String> {
    let n = u64::from_le_bytes(
        bytes
            .get(..8)
            .ok_or("shorter than its header length")?
            .try_into()
            .expect("8 bytes"),
    ) as usize;
    let header = bytes
        .get(8..8usize.saturating_add(n))
        .ok_or("header runs past the end")?;
    let data = &bytes[8 + n..];
    let map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(header).map_err(|e| format!("header is not JSON: {e}"))?;
    let mut out = HashMap::new();
    for (name, v) in map {
        if name == "__metadata__" {
            continue;
        }
        let meta: TensorMeta =
            serde_json::from_value(v).map_err(|e| format!("tensor {name}: {e}"))?;
        if meta.dtype != "F32" {
            return Err(format!(
                "tensor {name} has dtype {}, expected F32",
                meta.dtype
            ));
        }
        let [begin, end] = meta.data_offsets;
        let raw = data
            .get(begin..end)
            .ok_or_else(|| format!("tensor {name} runs past the end"))?;
        if raw.len() != meta.shape.iter().product::<usize>() * 4 {
            return Err(format!(
                "tensor {name} has {} bytes for shape {:?}",
                raw.len(),
                meta.shape
            ));
        }
        let values: Vec<f32> = raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        if values.iter().any(|v| !v.is_finite()) {
            return Err(format!("tensor {name} holds non-finite values"));
        }
        out.insert(name, (meta.shape, values));
    }
    Ok(out)
}

#[derive(Deserialize)]
struct TensorMeta {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [usize; 2],
}

fn snapshot_from(m: &Manifest, mut t: Tensors) -> Result<Snapshot, String> {
    let (c, d, l) = (m.classes, m.embedding_dim, m.sample_len);
    let mut take = |name: &str, shape: &[usize]| -> Result<Vec<f32>, String> {
        let (s, v) = t
            .remove(name)
            .ok_or_else(|| format!("tensor {name} is missing"))?;
        if s != shape {
            return Err(format!("tensor {name} has shape {s:?}, expected {shape:?}"));
        }
        Ok(v)
    };
    // Heads and optimizer moments are all a `{prefix}.weight` [c, d] and a `{prefix}.bias` [c].
    let mut pair = |prefix: &str| -> Result<Gradients, String> {
        let weight = take(&format!("{prefix}.weight"), &[c, d])?;
        let bias = take(&format!("{prefix}.bias"), &[c])?;
        Ok(Gradients {
            weight: Array2::from_shape_vec((c, d), weight).expect("shape checked"),
            bias: Array1::from(bias),
        })
    };
    let mut heads = Vec::with_capacity(3);
    for role in ["student", "teacher", "source"] {
        let g = pair(role)?;
        heads.push(LinearHead::new(g.weight, g.bias));
    }
    let heads: [LinearHead; 3] = heads.try_into().expect("three heads");
    let mut grads = pair;
    let optimizer = match m.optimizer {
        OptimizerMeta::Sgd { momentum } => Optimizer::Sgd {
            momentum,
            velocity: grads("optim.velocity")?,
        },
        OptimizerMeta::Adam {
            beta1,
            beta2,
            eps,
            t,
        } => Optimizer::Adam {
            beta1,
            beta2,
            eps,
            m: grads("optim.m")?,
            v: grads("optim.v")?,
            t,
        },
    };
    let running = Array1::from(take("pseudo.running", &[c])?);
    // The buffer keeps the configured capacity; restore as many of the newest as fit.
    let mut labeled_rows = Vec::with_capacity(c);
    for class in 0..c {
        let (s, inputs) = t
            .remove(&format!("labeled.{class}.inputs"))
            .ok_or(format!("tensor labeled.{class}.inputs is missing"))?;
        let (se, embs) = t
            .remove(&format!("labeled.{class}.embeddings"))
            .ok_or(format!("tensor labeled.{class}.embeddings is missing"))?;
        if s.len() != 2 || s[1] != l || se != [s[0], d] {
            return Err(format!(
                "labeled buffer of class {class} has shapes {s:?} / {se:?}"
            ));
        }
        labeled_rows.push((s[0], inputs, embs));
    }
    Ok(Snapshot {
        heads,
        optimizer,
        counters: m.counters,
        labeled: LabeledRows(labeled_rows).into_buffer(l, d),
        running,
    })
}

/// Labeled samples per class, oldest first, as stored.
struct LabeledRows(Vec<(usize, Vec<f32>, Vec<f32>)>);

impl LabeledRows {
    fn into_buffer(self, sample_len: usize, dim: usize) -> LabeledBuffer {
        let per_class = self.0.iter().map(|(n, _, _)| *n).max().unwrap_or(0).max(1);
        let mut buf = LabeledBuffer::new(self.0.len(), per_class, sample_len, dim);
        for (class, (n, inputs, embs)) in self.0.iter().enumerate() {
            for i in 0..*n {
                let emb = ndarray::ArrayView1::from(&embs[i * dim..(i + 1) * dim]);
                buf.push(&inputs[i * sample_len..(i + 1) * sample_len], emb, class);
            }
        }
        buf
    }
}
