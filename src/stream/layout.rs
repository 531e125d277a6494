//! Where time and channels are in a flat sample: the layout shared by window assembly,
//! augmentation and mounting calibration.
//!
//! A sample is the model's input without the batch dimension. For a rank-2 sample one axis is
//! time and the other channels; which is which comes from the config or, by default, the
//! longer axis is taken as time (`[64, 6]` is 64 steps of 6 channels, `[6, 64]` the
//! transpose). Other ranks are treated as one channel over a flat sequence.

/// Strides that locate (time, channel) in a flat sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub steps: usize,
    pub channels: usize,
    pub step_stride: usize,
    pub channel_stride: usize,
}

impl Layout {
    /// Values in one sample.
    pub fn sample_len(&self) -> usize {
        self.steps * self.channels
    }

    pub fn for_shape(shape: &[usize], time_axis: Option<usize>) -> Layout {
        match shape {
            [a, b] => {
                let time = time_axis.unwrap_or(if a >= b { 0 } else { 1 });
                if time == 0 {
                    Layout {
                        steps: *a,
                        channels: *b,
                        step_stride: *b,
                        channel_stride: 1,
                    }
                } else {
                    Layout {
                        steps: *b,
                        channels: *a,
                        step_stride: 1,
                        channel_stride: *b,
                    }
                }
            }
            _ => {
                let n = shape.iter().product();
                Layout {
                    steps: n,
                    channels: 1,
                    step_stride: 1,
                    channel_stride: 0,
                }
            }
        }
    }
}
