//! The candidate mountings and applying one: [`SignedPerm`] (one of the 48 signed axis
//! permutations), [`Mounting`] (a permutation applied to every declared channel group of a
//! flat sample) and [`MountingRecord`] (an adopted mounting as checkpoints and exported
//! models keep it).
//!
//! Accelerometer-like groups are polar vectors (`v' = R·v`); gyroscope and magnetometer
//! groups are axial vectors, which a mirror flips once more (`v' = det(R)·R·v`).

use ndarray::Array2;

use super::CalibrationConfig;
use crate::stream::Layout;

/// A signed permutation matrix `R`: row `i` has `signs[i]` at column `perm[i]`, so
/// `(R·v)[i] = signs[i] · v[perm[i]]`. Exact in f32: applying one only moves and negates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct SignedPerm {
    pub perm: [u8; 3],
    pub signs: [i8; 3],
}

impl Default for SignedPerm {
    /// The identity: the device's own axes.
    fn default() -> Self {
        SignedPerm::IDENTITY
    }
}

impl SignedPerm {
    pub const IDENTITY: SignedPerm = SignedPerm {
        perm: [0, 1, 2],
        signs: [1, 1, 1],
    };

    /// The 48 signed permutations: permutations in lexicographic order, each with its 8 sign
    /// patterns (`+++` first), so [`SignedPerm::IDENTITY`] comes first and wins ties.
    pub fn all() -> Vec<SignedPerm> {
        const PERMS: [[u8; 3]; 6] = [
            [0, 1, 2],
            [0, 2, 1],
            [1, 0, 2],
            [1, 2, 0],
            [2, 0, 1],
            [2, 1, 0],
        ];
        let mut out = Vec::with_capacity(48);
        for perm in PERMS {
            for mask in 0..8u8 {
                let signs = [0, 1, 2].map(|i| if mask >> (2 - i) & 1 == 1 { -1 } else { 1 });
                out.push(SignedPerm { perm, signs });
            }
        }
        out
    }

    /// +1 for a proper rotation, -1 for a mirror.
    pub fn det(&self) -> i8 {
        let p = self.perm;
        let inversions = (p[0] > p[1]) as u8 + (p[0] > p[2]) as u8 + (p[1] > p[2]) as u8;
        let parity = if inversions % 2 == 0 { 1 } else { -1 };
        parity * self.signs[0] * self.signs[1] * self.signs[2]
    }

    pub fn matrix(&self) -> [[f32; 3]; 3] {
        let mut m = [[0.0; 3]; 3];
        for (i, row) in m.iter_mut().enumerate() {
            row[self.perm[i] as usize] = self.signs[i] as f32;
        }
        m
    }

    /// `R·v`.
    pub fn apply(&self, v: [f32; 3]) -> [f32; 3] {
        [0, 1, 2].map(|i| self.signs[i] as f32 * v[self.perm[i] as usize])
    }

    /// `R⁻¹ = Rᵀ`.
    pub fn inverse(&self) -> SignedPerm {
        let mut inv = SignedPerm::IDENTITY;
        for i in 0..3 {
            let j = self.perm[i] as usize;
            inv.perm[j] = i as u8;
            inv.signs[j] = self.signs[i];
        }
        inv
    }

    /// `other ∘ self`: `self` applied first, then `other`.
    pub fn then(&self, other: &SignedPerm) -> SignedPerm {
        let mut out = SignedPerm::IDENTITY;
        for i in 0..3 {
            let j = other.perm[i] as usize;
            out.perm[i] = self.perm[j];
            out.signs[i] = other.signs[i] * self.signs[j];
        }
        out
    }

    /// What each output axis reads, e.g. `x,-z,y` for 90° about x; `x,y,z` is identity.
    pub fn name(&self) -> String {
        let axis = |i: usize| {
            let sign = if self.signs[i] < 0 { "-" } else { "" };
            format!("{sign}{}", ["x", "y", "z"][self.perm[i] as usize])
        };
        format!("{},{},{}", axis(0), axis(1), axis(2))
    }
}

impl std::fmt::Display for SignedPerm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

/// One declared 3-channel group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Group {
    channels: [usize; 3],
    axial: bool,
}

pub(super) fn groups_of(cfg: &CalibrationConfig, layout: &Layout) -> Vec<Group> {
    let groups: Vec<Group> = cfg
        .polar
        .iter()
        .map(|&channels| Group {
            channels,
            axial: false,
        })
        .chain(cfg.axial.iter().map(|&channels| Group {
            channels,
            axial: true,
        }))
        .collect();
    for g in &groups {
        assert!(
            g.channels.iter().all(|&c| c < layout.channels),
            "calibration group {:?} is outside the {} channels (validate the config first)",
            g.channels,
            layout.channels
        );
    }
    groups
}

/// The signs a group actually gets: axial vectors flip once more under a mirror.
fn effective_signs(r: &SignedPerm, axial: bool) -> [f32; 3] {
    let d = if axial { r.det() as f32 } else { 1.0 };
    r.signs.map(|s| s as f32 * d)
}

/// Writes `x` re-oriented by `r` into `out` (same length; ungrouped channels copied).
pub(super) fn transform(
    groups: &[Group],
    layout: &Layout,
    r: &SignedPerm,
    x: &[f32],
    out: &mut [f32],
) {
    assert_eq!(
        x.len(),
        out.len(),
        "mounting input and output lengths differ"
    );
    out.copy_from_slice(x);
    if *r == SignedPerm::IDENTITY {
        return;
    }
    let cs = layout.channel_stride;
    for g in groups {
        let signs = effective_signs(r, g.axial);
        // Output axis i reads input axis perm[i] (offsets within a step), times signs[i].
        let from = [0, 1, 2].map(|i| g.channels[r.perm[i] as usize] * cs);
        let to = g.channels.map(|c| c * cs);
        for t in 0..layout.steps {
            let base = t * layout.step_stride;
            for i in 0..3 {
                out[base + to[i]] = signs[i] * x[base + from[i]];
            }
        }
    }
}

/// Applies R to every declared group at every time step of a flat sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Mounting {
    pub(super) groups: Vec<Group>,
    pub(super) layout: Layout,
    pub(super) r: SignedPerm,
}

impl Mounting {
    /// Panics if a group names a channel the layout does not have (see
    /// [`CalibrationConfig::validate`]).
    pub fn new(cfg: &CalibrationConfig, layout: Layout, r: SignedPerm) -> Self {
        Mounting {
            groups: groups_of(cfg, &layout),
            layout,
            r,
        }
    }

    /// Values in one sample.
    pub fn sample_len(&self) -> usize {
        self.layout.sample_len()
    }

    pub fn r(&self) -> SignedPerm {
        self.r
    }

    /// `out.len() == x.len()`; channels outside any group are copied unchanged.
    pub fn apply(&self, x: &[f32], out: &mut [f32]) {
        transform(&self.groups, &self.layout, &self.r, x, out);
    }

    /// The C×C matrix M over the channel axis with x'_t = M · x_t for every step t (block R for
    /// polar groups, det(R)·R for axial groups, identity elsewhere) — what export folds in.
    pub fn channel_matrix(&self) -> Array2<f32> {
        let mut m = Array2::eye(self.layout.channels);
        for g in &self.groups {
            let signs = effective_signs(&self.r, g.axial);
            for &c in &g.channels {
                m[[c, c]] = 0.0;
            }
            for i in 0..3 {
                m[[g.channels[i], g.channels[self.r.perm[i] as usize]]] = signs[i];
            }
        }
        m
    }
}

/// An adopted mounting as the checkpoint manifest keeps it: the signed permutation, and the
/// matrix over the input's channel axis that export folds in front of the graph (so export
/// needs no config to know which channels are which).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MountingRecord {
    pub r: SignedPerm,
    pub name: String,
    /// Axis of the per-sample input shape that holds the channels.
    pub channel_axis: usize,
    /// `x'_t = M · x_t` for every time step t.
    pub channel_matrix: Vec<Vec<f32>>,
}

impl MountingRecord {
    pub fn of(m: &Mounting, layout: &Layout) -> Self {
        MountingRecord {
            r: m.r(),
            name: m.r().name(),
            channel_axis: if layout.channel_stride == 1 { 1 } else { 0 },
            channel_matrix: m
                .channel_matrix()
                .rows()
                .into_iter()
                .map(|r| r.to_vec())
                .collect(),
        }
    }
}
