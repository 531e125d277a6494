//! Named f32 tensors stored back to back in one buffer.
//!
//! One contiguous buffer makes the whole-parameter operations (an Adam step, an EMA update,
//! a norm) a single pass over a slice, while [`Params::iter`] still shows them as
//! `(name, shape, values)` for the checkpoint codec and for per-tensor state. The layout
//! (names, shapes, offsets) is shared between clones, so optimizer moments and gradients
//! built with [`Params::zeros_like`] are guaranteed to line up with the parameters.

use std::sync::Arc;

use ndarray::{ArrayView1, ArrayView2, ArrayViewMut1, ArrayViewMut2};

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    name: String,
    shape: Vec<usize>,
    offset: usize,
    len: usize,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ParamsError {
    #[error("tensor {name} has shape {got:?}, expected {expected:?}")]
    Shape {
        name: String,
        got: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("tensor {name} holds {got} values, its shape {shape:?} needs {expected}")]
    Length {
        name: String,
        got: usize,
        expected: usize,
        shape: Vec<usize>,
    },
    #[error("tensor {0} is missing")]
    Missing(String),
    #[error("tensor {0} is named twice")]
    Duplicate(String),
}

/// Named tensors with fixed shapes; see the module docs.
#[derive(Debug, Clone)]
pub struct Params {
    layout: Arc<Vec<Entry>>,
    data: Vec<f32>,
}

impl PartialEq for Params {
    fn eq(&self, other: &Self) -> bool {
        self.layout == other.layout && self.data == other.data
    }
}

impl Params {
    /// Builds from `(name, shape, values)` triples, checking each length against its shape.
    pub fn from_tensors<'a>(
        tensors: impl IntoIterator<Item = (String, Vec<usize>, &'a [f32])>,
    ) -> Result<Params, ParamsError> {
        let mut layout = Vec::new();
        let mut data = Vec::new();
        for (name, shape, values) in tensors {
            let len = shape.iter().product::<usize>();
            if values.len() != len {
                return Err(ParamsError::Length {
                    name,
                    got: values.len(),
                    expected: len,
                    shape,
                });
            }
            if layout.iter().any(|e: &Entry| e.name == name) {
                return Err(ParamsError::Duplicate(name));
            }
            layout.push(Entry {
                name,
                shape,
                offset: data.len(),
                len,
            });
            data.extend_from_slice(values);
        }
        Ok(Params {
            layout: Arc::new(layout),
            data,
        })
    }

    /// The same names and shapes, all zeros (gradients, optimizer moments).
    pub fn zeros_like(&self) -> Params {
        Params {
            layout: self.layout.clone(),
            data: vec![0.0; self.data.len()],
        }
    }

    /// Same names and shapes as `other` (and so the same offsets).
    pub fn same_layout(&self, other: &Params) -> bool {
        Arc::ptr_eq(&self.layout, &other.layout) || self.layout == other.layout
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.layout.len()
    }

    pub fn is_empty(&self) -> bool {
        self.layout.is_empty()
    }

    /// Number of scalar values over all tensors.
    pub fn count(&self) -> usize {
        self.data.len()
    }

    /// `(name, shape, values)` of every tensor, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[usize], &[f32])> + '_ {
        self.layout.iter().map(|e| {
            (
                e.name.as_str(),
                e.shape.as_slice(),
                &self.data[e.offset..e.offset + e.len],
            )
        })
    }

    /// Index of the tensor called `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.layout.iter().position(|e| e.name == name)
    }

    pub fn name(&self, i: usize) -> &str {
        &self.layout[i].name
    }

    pub fn shape(&self, i: usize) -> &[usize] {
        &self.layout[i].shape
    }

    pub fn values(&self, i: usize) -> &[f32] {
        let e = &self.layout[i];
        &self.data[e.offset..e.offset + e.len]
    }

    pub fn values_mut(&mut self, i: usize) -> &mut [f32] {
        let e = &self.layout[i];
        &mut self.data[e.offset..e.offset + e.len]
    }

    /// Tensor `i` as a matrix (it must be rank 2).
    pub fn matrix(&self, i: usize) -> ArrayView2<'_, f32> {
        let s = &self.layout[i].shape;
        ArrayView2::from_shape((s[0], s[1]), self.values(i)).expect("rank-2 tensor")
    }

    pub fn matrix_mut(&mut self, i: usize) -> ArrayViewMut2<'_, f32> {
        let s = self.layout[i].shape.clone();
        ArrayViewMut2::from_shape((s[0], s[1]), self.values_mut(i)).expect("rank-2 tensor")
    }

    pub fn vector(&self, i: usize) -> ArrayView1<'_, f32> {
        ArrayView1::from(self.values(i))
    }

    pub fn vector_mut(&mut self, i: usize) -> ArrayViewMut1<'_, f32> {
        ArrayViewMut1::from(self.values_mut(i))
    }

    /// Every value of every tensor, back to back.
    pub fn as_slice(&self) -> &[f32] {
        &self.data
    }

    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        &mut self.data
    }

    /// Copies the values of `other` (same layout) into `self`.
    pub fn assign(&mut self, other: &Params) {
        debug_assert!(self.same_layout(other));
        self.data.copy_from_slice(&other.data);
    }

    /// Replaces one tensor's values, checking its shape.
    pub fn set(&mut self, name: &str, shape: &[usize], values: &[f32]) -> Result<(), ParamsError> {
        let i = self
            .index_of(name)
            .ok_or_else(|| ParamsError::Missing(name.to_string()))?;
        if self.shape(i) != shape {
            return Err(ParamsError::Shape {
                name: name.to_string(),
                got: shape.to_vec(),
                expected: self.shape(i).to_vec(),
            });
        }
        if values.len() != self.layout[i].len {
            return Err(ParamsError::Length {
                name: name.to_string(),
                got: values.len(),
                expected: self.layout[i].len,
                shape: shape.to_vec(),
            });
        }
        self.values_mut(i).copy_from_slice(values);
        Ok(())
    }

    pub fn fill(&mut self, v: f32) {
        self.data.fill(v);
    }

    pub fn is_finite(&self) -> bool {
        self.data.iter().all(|v| v.is_finite())
    }

    /// Global L2 norm over every tensor.
    pub fn norm(&self) -> f32 {
        self.data.iter().map(|v| v * v).sum::<f32>().sqrt()
    }

    pub fn scale(&mut self, s: f32) {
        self.data.iter_mut().for_each(|v| *v *= s);
    }

    /// Euclidean distance between two parameter sets of the same layout.
    pub fn distance(&self, other: &Params) -> f32 {
        debug_assert!(self.same_layout(other));
        self.data
            .iter()
            .zip(&other.data)
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f32>()
            .sqrt()
    }

    /// `self ← m·self + (1−m)·other` (the EMA update).
    pub fn lerp_toward(&mut self, other: &Params, m: f32) {
        debug_assert!(self.same_layout(other));
        for (t, &s) in self.data.iter_mut().zip(&other.data) {
            *t = m * *t + (1.0 - m) * s;
        }
    }

    /// Adds `a·(p − q)` to `self` and returns ‖p − q‖² (the gradient and the size of an L2
    /// pull of `p` toward `q`).
    pub fn add_pull(&mut self, p: &Params, q: &Params, a: f32) -> f32 {
        let mut sq = 0.0;
        for ((g, &p), &q) in self.data.iter_mut().zip(&p.data).zip(&q.data) {
            *g += a * (p - q);
            sq += (p - q) * (p - q);
        }
        sq
    }
}
