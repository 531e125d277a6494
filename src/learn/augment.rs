//! Seeded augmentations for sensor windows: jitter, per-channel scaling and time shift, along
//! the sample's [`Layout`] (which axis is time).

use super::rng::Rng;
use crate::stream::Layout;

#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentConfig {
    /// Gaussian noise, as a fraction of each channel's standard deviation in the window.
    pub jitter: f32,
    /// Standard deviation of the per-channel gain around 1.
    pub scale: f32,
    /// Largest circular-free shift along time, in steps (edges are repeated).
    pub max_shift: usize,
    /// Which sample axis is time (0 or 1 for rank-2 inputs); unset: the longer one.
    pub time_axis: Option<usize>,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        AugmentConfig {
            jitter: 0.1,
            scale: 0.1,
            max_shift: 4,
            time_axis: None,
        }
    }
}

pub struct Augmenter {
    cfg: AugmentConfig,
    layout: Layout,
    mean: Vec<f32>,
    std: Vec<f32>,
}

impl Augmenter {
    pub fn new(cfg: AugmentConfig, layout: Layout) -> Self {
        Augmenter {
            cfg,
            layout,
            mean: vec![0.0; layout.channels],
            std: vec![0.0; layout.channels],
        }
    }

    /// Writes one random augmentation of `x` into `out` (same length).
    pub fn apply(&mut self, x: &[f32], out: &mut [f32], rng: &mut Rng) {
        let Layout {
            steps,
            channels,
            step_stride,
            channel_stride,
        } = self.layout;
        debug_assert_eq!(x.len(), out.len());
        let at = |t: usize, c: usize| t * step_stride + c * channel_stride;
        for c in 0..channels {
            let (mut s, mut s2) = (0.0f32, 0.0f32);
            for t in 0..steps {
                let v = x[at(t, c)];
                s += v;
                s2 += v * v;
            }
            let mean = s / steps as f32;
            self.mean[c] = mean;
            self.std[c] = (s2 / steps as f32 - mean * mean).max(0.0).sqrt();
        }
        let shift = if self.cfg.max_shift > 0 {
            rng.below(2 * self.cfg.max_shift + 1) as isize - self.cfg.max_shift as isize
        } else {
            0
        };
        for c in 0..channels {
            let gain = 1.0 + self.cfg.scale * rng.normal();
            let noise = self.cfg.jitter * self.std[c];
            for t in 0..steps {
                let src = (t as isize - shift).clamp(0, steps as isize - 1) as usize;
                out[at(t, c)] = x[at(src, c)] * gain + noise * rng.normal();
            }
        }
    }
}
