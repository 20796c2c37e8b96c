//! Preprocessing, written once for the trainer and the runtime: decode → RGB → resize to the
//! model's square input (bilinear, aspect ratio not kept, as Keras'
//! `image_dataset_from_directory` does) → `x * scale + offset`, channels last (HWC).

use crate::Preprocessing;
use image::imageops::FilterType;
use std::io::Cursor;

/// Largest image accepted, in pixels (checked from the header, before decoding).
pub const DEFAULT_MAX_PIXELS: u64 = 40_000_000;

/// Why an image could not be turned into network input.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("empty file")]
    Empty,
    #[error("not a supported image (JPEG, PNG, WebP): {0}")]
    Format(String),
    #[error("{width}x{height} pixels is more than the {max} allowed")]
    TooLarge { width: u32, height: u32, max: u64 },
    #[error("cannot decode image: {0}")]
    Decode(String),
    #[error("truncated JPEG: the data ends before the image's end-of-image marker")]
    Truncated,
}

/// A JPEG whose last scan (the main image's; an EXIF thumbnail's come earlier) is not followed
/// by an end-of-image marker was cut short. The decoder would fill the missing rows with grey
/// and answer as if nothing were wrong.
fn jpeg_truncated(bytes: &[u8]) -> bool {
    if !bytes.starts_with(&[0xff, 0xd8, 0xff]) {
        return false;
    }
    let last_scan = bytes.windows(2).rposition(|w| w == [0xff, 0xda]);
    match last_scan {
        Some(i) => !bytes[i..].windows(2).any(|w| w == [0xff, 0xd9]),
        None => true,
    }
}

/// Decodes an encoded image (JPEG, PNG, WebP) to RGB, refusing images of more than
/// `max_pixels` pixels before decoding them.
pub fn decode_rgb(bytes: &[u8], max_pixels: u64) -> Result<image::RgbImage, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty);
    }
    let reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageError::Format(e.to_string()))?;
    if reader.format().is_none() {
        return Err(ImageError::Format("unknown format".into()));
    }
    let (width, height) = reader.into_dimensions().map_err(|e| ImageError::Decode(e.to_string()))?;
    if u64::from(width) * u64::from(height) > max_pixels {
        return Err(ImageError::TooLarge { width, height, max: max_pixels });
    }
    if jpeg_truncated(bytes) {
        return Err(ImageError::Truncated);
    }
    let mut reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageError::Format(e.to_string()))?;
    reader.no_limits();
    let img = reader.decode().map_err(|e| ImageError::Decode(e.to_string()))?;
    Ok(img.to_rgb8())
}

/// Resizes to `size` x `size` with the filter the description names.
pub fn resize(img: &image::RgbImage, size: u32, p: &Preprocessing) -> image::RgbImage {
    let filter = match p.resize.as_str() {
        "nearest" => FilterType::Nearest,
        _ => FilterType::Triangle,
    };
    if img.width() == size && img.height() == size {
        return img.clone();
    }
    image::imageops::resize(img, size, size, filter)
}

/// Scales 8-bit RGB pixels to the network's input, HWC.
pub fn to_input(img: &image::RgbImage, p: &Preprocessing) -> Vec<f32> {
    img.as_raw().iter().map(|&v| v as f32 * p.scale + p.offset).collect()
}

/// Encoded bytes → the resized RGB pixels [size, size, 3], HWC: what an exported ONNX graph
/// (uint8 input) takes.
pub fn resized_pixels(bytes: &[u8], size: u32, p: &Preprocessing, max_pixels: u64) -> Result<Vec<u8>, ImageError> {
    Ok(resize(&decode_rgb(bytes, max_pixels)?, size, p).into_raw())
}

/// The whole chain: encoded bytes → [size, size, 3] floats, HWC.
pub fn preprocess(bytes: &[u8], size: u32, p: &Preprocessing, max_pixels: u64) -> Result<Vec<f32>, ImageError> {
    let img = decode_rgb(bytes, max_pixels)?;
    Ok(to_input(&resize(&img, size, p), p))
}

/// File extensions of the formats read (JPEG, PNG, WebP), lower case.
pub const IMAGE_EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];

/// Whether a file name has one of [`IMAGE_EXTENSIONS`] (any case).
pub fn is_image_path(p: &std::path::Path) -> bool {
    p.extension().is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_string_lossy().to_lowercase().as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn shared() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared")
    }

    /// Our bilinear resize against PIL's (the resize Keras uses), on the four footwear images
    /// of `../shared/fixtures/preprocess` (computed with PIL): within a couple of grey levels
    /// on average.
    #[test]
    fn resize_is_close_to_pil_bilinear() {
        let files = std::fs::read_to_string(shared().join("fixtures/xception/footwear_files.txt")).unwrap();
        for size in [150u32, 299] {
            let pil =
                candle_core::Tensor::read_npy(shared().join(format!("fixtures/preprocess/pil_bilinear_{size}.npy")))
                    .unwrap();
            let pil = pil.to_dtype(candle_core::DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let per = (size * size * 3) as usize;
            for (i, f) in files.lines().filter(|l| !l.trim().is_empty()).enumerate() {
                let path = shared().join("data/footwear").join(f.trim().trim_start_matches("footwear/"));
                let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                let img = resize(&decode_rgb(&bytes, DEFAULT_MAX_PIXELS).unwrap(), size, &Preprocessing::default());
                let ours: Vec<f32> = img.as_raw().iter().map(|&v| v as f32).collect();
                let mean =
                    ours.iter().zip(&pil[i * per..(i + 1) * per]).map(|(a, b)| (a - b).abs()).sum::<f32>() / per as f32;
                println!("{f} at {size}: mean |diff| {mean:.2} grey levels");
                assert!(mean < 2.0, "{f} at {size}: mean |diff| {mean}");
            }
        }
    }

    #[test]
    fn bad_bytes_are_clear_errors() {
        assert!(matches!(decode_rgb(b"", 100), Err(ImageError::Empty)));
        assert!(matches!(decode_rgb(b"hello world", 100), Err(ImageError::Format(_))));
        // A PNG header claiming 50,000 x 50,000 pixels is refused before decoding.
        fn crc32(bytes: &[u8]) -> u32 {
            let mut c = !0u32;
            for &b in bytes {
                c ^= b as u32;
                for _ in 0..8 {
                    c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
                }
            }
            !c
        }
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut chunk = |kind: &[u8], data: &[u8]| {
            png.extend_from_slice(&(data.len() as u32).to_be_bytes());
            let body = [kind, data].concat();
            png.extend_from_slice(&body);
            png.extend_from_slice(&crc32(&body).to_be_bytes());
        };
        let ihdr = [&50_000u32.to_be_bytes()[..], &50_000u32.to_be_bytes(), &[8, 2, 0, 0, 0]].concat();
        chunk(b"IHDR", &ihdr);
        chunk(b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
        chunk(b"IEND", &[]);
        assert!(
            matches!(decode_rgb(&png, DEFAULT_MAX_PIXELS), Err(ImageError::TooLarge { .. })),
            "{:?}",
            decode_rgb(&png, DEFAULT_MAX_PIXELS).err()
        );
        // A JPEG cut in half decodes (grey rows) unless the missing end-of-image marker is noticed.
        let img = image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([(x * 4) as u8, (y * 5) as u8, 90]));
        let mut jpeg = Vec::new();
        img.write_to(&mut Cursor::new(&mut jpeg), image::ImageFormat::Jpeg).unwrap();
        assert!(decode_rgb(&jpeg, DEFAULT_MAX_PIXELS).is_ok());
        let cut = &jpeg[..jpeg.len() * 2 / 3];
        assert!(matches!(decode_rgb(cut, DEFAULT_MAX_PIXELS), Err(ImageError::Truncated)));
    }
}
