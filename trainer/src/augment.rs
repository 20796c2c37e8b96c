//! Seeded image augmentation on 8-bit RGB (HWC) images of the network's input size: horizontal
//! flip, zoom, shear and rotation as one affine map (sampled bilinearly, borders filled with the
//! nearest pixel, as Keras' `ImageDataGenerator` does), then brightness and contrast.

use rand::Rng;
use serde::{Deserialize, Serialize};

/// Ranges of the random transforms; a range of 0 turns that transform off.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AugmentConfig {
    pub enabled: bool,
    /// Mirror left-right with probability 1/2.
    pub flip: bool,
    /// Zoom factor drawn from [1 - zoom, 1 + zoom], per axis.
    pub zoom: f64,
    /// Shear angle drawn from [-shear, shear], degrees.
    pub shear: f64,
    /// Rotation angle drawn from [-rotation, rotation], degrees.
    pub rotation: f64,
    /// Brightness shift drawn from [-brightness, brightness], as a fraction of full scale.
    pub brightness: f64,
    /// Contrast factor drawn from [1 - contrast, 1 + contrast].
    pub contrast: f64,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self { enabled: true, flip: true, zoom: 0.1, shear: 10.0, rotation: 10.0, brightness: 0.1, contrast: 0.1 }
    }
}

fn sym(rng: &mut impl Rng, r: f32) -> f32 {
    if r > 0.0 {
        rng.random_range(-r..=r)
    } else {
        0.0
    }
}

/// A randomly transformed copy of `img` ([size, size, 3], u8).
pub fn augment(img: &[u8], size: usize, cfg: &AugmentConfig, rng: &mut impl Rng) -> Vec<u8> {
    assert_eq!(img.len(), size * size * 3, "augment: image is not {size}x{size} RGB");
    let flip = cfg.flip && rng.random_bool(0.5);
    let (zx, zy) = (1.0 + sym(rng, cfg.zoom as f32), 1.0 + sym(rng, cfg.zoom as f32));
    let shear = sym(rng, cfg.shear as f32).to_radians();
    let theta = sym(rng, cfg.rotation as f32).to_radians();
    let brightness = sym(rng, cfg.brightness as f32) * 255.0;
    let contrast = 1.0 + sym(rng, cfg.contrast as f32);
    // Output pixel p (centred) reads source pixel M·p: M = R(θ) · Shear · Zoom · Flip.
    let (c, s) = (theta.cos(), theta.sin());
    let (sh_c, sh_t) = (shear.cos(), shear.sin());
    // Shear as Keras builds it: [[1, -sin], [0, cos]].
    let a = [[1.0, -sh_t], [0.0, sh_c]];
    let r = [[c, -s], [s, c]];
    let ra = [
        [r[0][0] * a[0][0] + r[0][1] * a[1][0], r[0][0] * a[0][1] + r[0][1] * a[1][1]],
        [r[1][0] * a[0][0] + r[1][1] * a[1][0], r[1][0] * a[0][1] + r[1][1] * a[1][1]],
    ];
    let fx = if flip { -zx } else { zx };
    let m = [[ra[0][0] * fx, ra[0][1] * zy], [ra[1][0] * fx, ra[1][1] * zy]];
    let centre = (size as f32 - 1.0) / 2.0;
    let last = size as f32 - 1.0;
    let mut out = vec![0u8; img.len()];
    for y in 0..size {
        for x in 0..size {
            let (px, py) = (x as f32 - centre, y as f32 - centre);
            let sx = (m[0][0] * px + m[0][1] * py + centre).clamp(0.0, last);
            let sy = (m[1][0] * px + m[1][1] * py + centre).clamp(0.0, last);
            let (x0, y0) = (sx.floor() as usize, sy.floor() as usize);
            let (x1, y1) = ((x0 + 1).min(size - 1), (y0 + 1).min(size - 1));
            let (wx, wy) = (sx - x0 as f32, sy - y0 as f32);
            for ch in 0..3 {
                let p = |xx: usize, yy: usize| img[(yy * size + xx) * 3 + ch] as f32;
                let v = (p(x0, y0) * (1.0 - wx) + p(x1, y0) * wx) * (1.0 - wy)
                    + (p(x0, y1) * (1.0 - wx) + p(x1, y1) * wx) * wy;
                let v = (v - 127.5) * contrast + 127.5 + brightness;
                out[(y * size + x) * 3 + ch] = v.round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn gradient(size: usize) -> Vec<u8> {
        (0..size * size * 3).map(|i| ((i / 3) % size * 255 / size) as u8).collect()
    }

    #[test]
    fn identity_when_everything_is_off() {
        let cfg = AugmentConfig {
            enabled: true,
            flip: false,
            zoom: 0.0,
            shear: 0.0,
            rotation: 0.0,
            brightness: 0.0,
            contrast: 0.0,
        };
        let img = gradient(9);
        assert_eq!(augment(&img, 9, &cfg, &mut ChaCha8Rng::seed_from_u64(1)), img);
    }

    #[test]
    fn flip_mirrors_and_seed_repeats() {
        let cfg = AugmentConfig {
            flip: true,
            zoom: 0.0,
            shear: 0.0,
            rotation: 0.0,
            brightness: 0.0,
            contrast: 0.0,
            enabled: true,
        };
        let img = gradient(8);
        // Some seed flips: find one, and check the result is the exact mirror image.
        let flipped: Vec<u8> = (0..64)
            .flat_map(|i| {
                let (y, x) = (i / 8, i % 8);
                img[(y * 8 + 7 - x) * 3..][..3].to_vec()
            })
            .collect();
        let found = (0..20).any(|s| augment(&img, 8, &cfg, &mut ChaCha8Rng::seed_from_u64(s)) == flipped);
        assert!(found, "no seed out of 20 flipped the image");
        let cfg = AugmentConfig::default();
        let a = augment(&img, 8, &cfg, &mut ChaCha8Rng::seed_from_u64(7));
        let b = augment(&img, 8, &cfg, &mut ChaCha8Rng::seed_from_u64(7));
        assert_eq!(a, b);
    }
}
