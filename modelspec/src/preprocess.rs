//! Preprocessing, written once for the trainer, the exporter and the runtime: decode → RGB →
//! resize to the model's square input (bilinear, aspect ratio not kept, as Keras'
//! `image_dataset_from_directory` does) → `x * scale + offset`, channels last (HWC).
//!
//! Also the two ways images reach it: [`image_files`], the one folder walk every step uses, and
//! [`decode_batch`], the one loop that turns a list of files or encoded images into one batch
//! of resized pixels, listing the ones it could not read.

use crate::{Preprocessing, Resize};
use image::imageops::FilterType;
use rayon::prelude::*;
use std::collections::HashSet;
use std::io::Cursor;
use std::path::{Path, PathBuf};

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
    #[error("cannot read: {0}")]
    Read(#[from] std::io::Error),
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
    let filter = match p.resize {
        Resize::Nearest => FilterType::Nearest,
        Resize::Bilinear => FilterType::Triangle,
    };
    if img.width() == size && img.height() == size {
        return img.clone();
    }
    image::imageops::resize(img, size, size, filter)
}

/// Scales 8-bit RGB pixels to the network's input, HWC.
pub fn to_input(img: &image::RgbImage, p: &Preprocessing) -> Vec<f32> {
    scale_pixels(img.as_raw(), p)
}

/// Scales resized pixels (any number of images, one after another) to the network's input:
/// `x * scale + offset`.
pub fn scale_pixels(pixels: &[u8], p: &Preprocessing) -> Vec<f32> {
    pixels.iter().map(|&v| v as f32 * p.scale + p.offset).collect()
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
pub fn is_image_path(p: &Path) -> bool {
    p.extension().is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_string_lossy().to_lowercase().as_str()))
}

/// The image files under `dir` and its sub-folders, sorted by path: files with an image
/// extension ([`is_image_path`]), hidden entries (a leading `.`, such as macOS' `._` files)
/// left out. Links are followed (a data folder of links is common), but a folder already
/// visited is not entered again, so a link loop ends the walk instead of recursing forever.
pub fn image_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    fn walk(dir: &Path, seen: &mut HashSet<PathBuf>, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
        if !seen.insert(std::fs::canonicalize(dir)?) {
            return Ok(());
        }
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')) {
                continue;
            }
            if path.is_dir() {
                walk(&path, seen, out)?;
            } else if path.is_file() && is_image_path(&path) {
                out.push(path);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, &mut HashSet::new(), &mut out)?;
    out.sort();
    Ok(out)
}

/// One image of a batch: a file to read, or encoded bytes already in memory.
#[derive(Debug, Clone, Copy)]
pub enum Source<'a> {
    File(&'a Path),
    Bytes(&'a [u8]),
}

/// A decoded batch: the resized pixels of the images that could be read, one after another
/// (`size * size * 3` bytes each, HWC), and why the others could not.
#[derive(Debug)]
pub struct DecodedBatch {
    /// Side of each image, pixels.
    pub size: usize,
    pub pixels: Vec<u8>,
    /// Positions (in the sources) of the images in `pixels`, in order.
    pub decoded: Vec<usize>,
    /// Positions of the images that could not be read, with the reason.
    pub failed: Vec<(usize, ImageError)>,
}

impl DecodedBatch {
    /// Images in `pixels`.
    pub fn len(&self) -> usize {
        self.decoded.len()
    }

    pub fn is_empty(&self) -> bool {
        self.decoded.is_empty()
    }

    /// Image `i` of `pixels`.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.size * self.size * 3;
        &self.pixels[i * n..(i + 1) * n]
    }
}

/// Reads (files), decodes and resizes `sources` to `size` x `size` in parallel: the loop every
/// step runs to turn images into a batch for the network (the runtime's CLI and server, the
/// exporter's samples and evaluation, the trainer's data).
pub fn decode_batch(sources: &[Source], size: u32, p: &Preprocessing, max_pixels: u64) -> DecodedBatch {
    let one = |s: &Source| -> Result<Vec<u8>, ImageError> {
        match s {
            Source::File(path) => resized_pixels(&std::fs::read(path)?, size, p, max_pixels),
            Source::Bytes(bytes) => resized_pixels(bytes, size, p, max_pixels),
        }
    };
    // A single image is decoded on the calling thread (no pool hand-off for one request).
    let results: Vec<Result<Vec<u8>, ImageError>> =
        if sources.len() == 1 { vec![one(&sources[0])] } else { sources.par_iter().map(one).collect() };
    let per = (size * size * 3) as usize;
    let mut batch = DecodedBatch {
        size: size as usize,
        pixels: Vec::with_capacity(per * results.iter().filter(|r| r.is_ok()).count()),
        decoded: Vec::new(),
        failed: Vec::new(),
    };
    for (i, r) in results.into_iter().enumerate() {
        match r {
            Ok(px) => {
                batch.pixels.extend_from_slice(&px);
                batch.decoded.push(i);
            }
            Err(e) => batch.failed.push((i, e)),
        }
    }
    batch
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn png(w: u32, h: u32) -> Vec<u8> {
        let mut v = Vec::new();
        image::RgbImage::from_pixel(w, h, image::Rgb([200, 10, 10]))
            .write_to(&mut Cursor::new(&mut v), image::ImageFormat::Png)
            .unwrap();
        v
    }

    /// Nested folders, hidden files, other extensions and a link loop: one sorted list of the
    /// images, each once.
    #[test]
    fn image_files_walks_sub_folders_once_and_skips_the_rest() {
        let root = std::env::temp_dir().join(format!("modelspec-walk-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("b/deeper")).unwrap();
        std::fs::create_dir_all(root.join("a")).unwrap();
        for f in ["a/1.JPG", "b/2.png", "b/deeper/3.webp", "b/notes.txt", "b/._4.jpg", ".hidden.jpg"] {
            std::fs::write(root.join(f), b"x").unwrap();
        }
        std::os::unix::fs::symlink(&root, root.join("b/loop")).unwrap();
        let found = image_files(&root).unwrap();
        let rel: Vec<String> = found.iter().map(|p| p.strip_prefix(&root).unwrap().display().to_string()).collect();
        assert_eq!(rel, ["a/1.JPG", "b/2.png", "b/deeper/3.webp"]);
        assert!(image_files(&root.join("missing")).is_err());
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// Files and bytes alike; the unreadable ones are listed by position and the rest keep
    /// their order.
    #[test]
    fn decode_batch_keeps_order_and_lists_failures() {
        let (a, b) = (png(10, 7), png(3, 30));
        let missing = std::path::Path::new("/nonexistent/x.png");
        let sources = [Source::Bytes(&a), Source::Bytes(b"junk"), Source::File(missing), Source::Bytes(&b)];
        let batch = decode_batch(&sources, 8, &Preprocessing::default(), DEFAULT_MAX_PIXELS);
        assert_eq!(batch.decoded, [0, 3]);
        assert_eq!(batch.pixels.len(), 2 * 8 * 8 * 3);
        assert_eq!(batch.image(1), resized_pixels(&b, 8, &Preprocessing::default(), DEFAULT_MAX_PIXELS).unwrap());
        let failed: Vec<(usize, String)> = batch.failed.iter().map(|(i, e)| (*i, e.to_string())).collect();
        assert!(matches!(failed.as_slice(), [(1, _), (2, r)] if r.starts_with("cannot read")), "{failed:?}");
    }
}
