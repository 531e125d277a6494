//! A [`LearnerState`] as named f32 tensors in a safetensors file, and back.
//!
//! Names: `{student,teacher,source}.<param>` for the trainable part (e.g. `teacher.1.weight`),
//! `optim.<role>.<param>` for the optimizer's moments, `pseudo.running`, per class
//! `labeled.<k>.inputs` / `labeled.<k>.embeddings` (oldest first), and label trust's memory:
//! `trust.embeddings` `[n, dim]`, `trust.labels` `[n, 3]` (label, pretrained class, its
//! confidence), `trust.accepted` `[k, 2]` (a checkpoint written before label trust kept
//! its memory has none of the three and restores an empty one) and `trust.inputs` `[3]` (the
//! share of recent inputs the embedding reference calls atypical, over how many, and whether
//! they showed no sign of shift; older checkpoints start it over). Every tensor goes through
//! the same two functions, whatever the number of layers. Non-finite values are refused both
//! ways: a poisoned state is never written, and never restored.

use std::collections::HashMap;

use ndarray::{Array1, ArrayView1};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use super::manifest::OptimizerMeta;
use crate::learn::buffer::LabeledBuffer;
use crate::learn::optim::Optimizer;
use crate::learn::trust::TrustMemory;
use crate::learn::{Counters, LearnerState};
use crate::nn::Params;

/// One tensor to write.
struct Named {
    name: String,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

fn named(name: String, shape: Vec<usize>, values: &[f32]) -> Result<Named, String> {
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(format!("tensor {name} holds a non-finite value at {i}"));
    }
    Ok(Named {
        name,
        shape,
        bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    })
}

fn add_params(out: &mut Vec<Named>, prefix: &str, p: &Params) -> Result<(), String> {
    for (name, shape, values) in p.iter() {
        out.push(named(format!("{prefix}.{name}"), shape.to_vec(), values)?);
    }
    Ok(())
}

/// Serializes `state`; refuses (naming the tensor) if any value is not finite.
pub fn encode(state: &LearnerState) -> Result<Vec<u8>, String> {
    let mut t = Vec::new();
    add_params(&mut t, "student", &state.student)?;
    add_params(&mut t, "teacher", &state.teacher)?;
    // Stored as "source", the format's name for the pretrained weights since version 1.
    add_params(&mut t, "source", &state.pretrained)?;
    for (role, p) in state.optimizer.state() {
        add_params(&mut t, &format!("optim.{role}"), p)?;
    }
    let gate: Vec<f32> = state.gate.iter().map(|&w| w as u8 as f32).collect();
    t.push(named("gate.outcomes".into(), vec![gate.len()], &gate)?);
    t.push(named(
        "pseudo.running".into(),
        vec![state.running.len()],
        &state.running.to_vec(),
    )?);
    let dim = state.student.shape(0).get(1).copied().unwrap_or(0);
    for class in 0..state.labeled.classes() {
        let ring = state.labeled.ring(class);
        let slots: Vec<usize> = ring.oldest_first().collect();
        let inputs: Vec<f32> = slots
            .iter()
            .flat_map(|&i| ring.input(i).iter().copied())
            .collect();
        let embs: Vec<f32> = slots
            .iter()
            .flat_map(|&i| ring.embedding(i).to_vec())
            .collect();
        t.push(named(
            format!("labeled.{class}.inputs"),
            vec![slots.len(), ring.sample_len()],
            &inputs,
        )?);
        t.push(named(
            format!("labeled.{class}.embeddings"),
            vec![slots.len(), dim],
            &embs,
        )?);
    }
    let m = &state.trust;
    t.push(named(
        "trust.embeddings".into(),
        vec![m.labels.len(), dim],
        &m.embeddings,
    )?);
    let labels: Vec<f32> = m
        .labels
        .iter()
        .zip(&m.pretrained)
        .flat_map(|(&l, &(c, p))| [l as f32, c as f32, p])
        .collect();
    t.push(named(
        "trust.labels".into(),
        vec![m.labels.len(), 3],
        &labels,
    )?);
    let accepted: Vec<f32> = m
        .accepted_pairs
        .iter()
        .flat_map(|&(a, b)| [a as f32, b as f32])
        .collect();
    t.push(named(
        "trust.accepted".into(),
        vec![m.accepted_pairs.len(), 2],
        &accepted,
    )?);
    // A count up to SHIFT_WINDOW is exact in f32.
    let (share, count, unshifted) = m.inputs;
    t.push(named(
        "trust.inputs".into(),
        vec![3],
        &[share, count as f32, f32::from(u8::from(unshifted))],
    )?);
    let views = t
        .iter()
        .map(|n| {
            TensorView::new(Dtype::F32, n.shape.clone(), &n.bytes)
                .map(|v| (n.name.clone(), v))
                .map_err(|e| format!("tensor {}: {e}", n.name))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let meta = HashMap::from([("format".to_string(), super::manifest::FORMAT.to_string())]);
    safetensors::serialize(views, Some(meta)).map_err(|e| e.to_string())
}

/// What decoding needs besides the bytes: the manifest's scalars and the expected shapes.
pub struct Expected<'a> {
    /// The trainable part's names and shapes.
    pub params: &'a Params,
    pub classes: usize,
    pub sample_len: usize,
    pub optimizer: OptimizerMeta,
    pub counters: Counters,
}

/// Reads a state back, checking every tensor's presence, dtype, shape and finiteness.
pub fn decode(bytes: &[u8], want: &Expected) -> Result<LearnerState, String> {
    let file = SafeTensors::deserialize(bytes).map_err(|e| format!("not safetensors: {e}"))?;
    let read = |name: &str| -> Result<(Vec<usize>, Vec<f32>), String> {
        let view = file
            .tensor(name)
            .map_err(|_| format!("tensor {name} is missing"))?;
        if view.dtype() != Dtype::F32 {
            return Err(format!(
                "tensor {name} has dtype {:?}, expected F32",
                view.dtype()
            ));
        }
        let values: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        if values.iter().any(|v| !v.is_finite()) {
            return Err(format!("tensor {name} holds non-finite values"));
        }
        Ok((view.shape().to_vec(), values))
    };
    let params = |prefix: &str| -> Result<Params, String> {
        let mut p = want.params.clone();
        for i in 0..want.params.len() {
            let name = format!("{prefix}.{}", want.params.name(i));
            let (shape, values) = read(&name)?;
            p.set(want.params.name(i), &shape, &values)
                .map_err(|e| format!("{prefix}: {e}"))?;
        }
        Ok(p)
    };
    // The weights first, so a shape mismatch is reported on them.
    let (student, teacher, source) = (params("student")?, params("teacher")?, params("source")?);
    let optimizer = match want.optimizer {
        OptimizerMeta::Sgd { momentum } => Optimizer::Sgd {
            momentum,
            velocity: params("optim.velocity")?,
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
            m: params("optim.m")?,
            v: params("optim.v")?,
            t,
        },
    };
    let (shape, gate) = read("gate.outcomes")?;
    if shape.len() != 1 || gate.iter().any(|&v| v != 0.0 && v != 1.0) {
        return Err(format!(
            "tensor gate.outcomes has shape {shape:?} or values other than 0/1"
        ));
    }
    let (shape, running) = read("pseudo.running")?;
    if shape != [want.classes] {
        return Err(format!(
            "tensor pseudo.running has shape {shape:?}, expected [{}]",
            want.classes
        ));
    }
    let dim = want.params.shape(0).get(1).copied().unwrap_or(0);
    let l = want.sample_len;
    let mut per_class = Vec::with_capacity(want.classes);
    for class in 0..want.classes {
        let (s, inputs) = read(&format!("labeled.{class}.inputs"))?;
        let (se, embs) = read(&format!("labeled.{class}.embeddings"))?;
        if s.len() != 2 || s[1] != l || se != [s[0], dim] {
            return Err(format!(
                "labeled buffer of class {class} has shapes {s:?} / {se:?}"
            ));
        }
        per_class.push((s[0], inputs, embs));
    }
    // As many slots as the fullest class needs; the learner refills its own capacity.
    let capacity = per_class.iter().map(|c| c.0).max().unwrap_or(0).max(1);
    let mut labeled = LabeledBuffer::new(want.classes, capacity, l, dim);
    for (class, (n, inputs, embs)) in per_class.iter().enumerate() {
        for i in 0..*n {
            let emb = ArrayView1::from(&embs[i * dim..(i + 1) * dim]);
            labeled.push(&inputs[i * l..(i + 1) * l], emb, class);
        }
    }
    let trust = if file.tensor("trust.labels").is_err() {
        TrustMemory::default()
    } else {
        let (se, embeddings) = read("trust.embeddings")?;
        let (sl, labels) = read("trust.labels")?;
        let (sa, accepted) = read("trust.accepted")?;
        let n = sl.first().copied().unwrap_or(0);
        if sl != [n, 3] || se != [n, dim] || sa.len() != 2 || sa[1] != 2 {
            return Err(format!(
                "label trust memory has shapes {se:?} / {sl:?} / {sa:?}"
            ));
        }
        // Classes are stored as f32: exact for any class count a head has.
        let class = |v: f32| (v >= 0.0 && v.fract() == 0.0).then_some(v as usize);
        let bad = || "label trust memory holds a class that is not a whole number".to_string();
        let mut m = TrustMemory {
            embeddings,
            ..TrustMemory::default()
        };
        for row in labels.chunks_exact(3) {
            m.labels.push(class(row[0]).ok_or_else(bad)?);
            m.pretrained.push((class(row[1]).ok_or_else(bad)?, row[2]));
        }
        for pair in accepted.chunks_exact(2) {
            m.accepted_pairs.push((
                class(pair[0]).ok_or_else(bad)?,
                class(pair[1]).ok_or_else(bad)?,
            ));
        }
        // Written since the embedding reference; older checkpoints start the share over.
        if file.tensor("trust.inputs").is_ok() {
            let (si, inputs) = read("trust.inputs")?;
            let n = class(inputs.get(1).copied().unwrap_or(-1.0));
            // [2]: written before the flag; it is then judged by the stricter line.
            match (si.as_slice(), n) {
                ([2], Some(n)) => m.inputs = (inputs[0], n as u64, false),
                ([3], Some(n)) => m.inputs = (inputs[0], n as u64, inputs[2] == 1.0),
                _ => return Err(format!("label trust input share has shape {si:?}")),
            }
        }
        m
    };
    Ok(LearnerState {
        student,
        teacher,
        pretrained: source,
        optimizer,
        counters: want.counters,
        labeled,
        running: Array1::from(running),
        gate: gate.iter().map(|&v| v == 1.0).collect(),
        trust,
    })
}
