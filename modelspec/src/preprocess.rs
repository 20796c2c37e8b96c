//! Preprocessing, written once for the trainer, the exporter and the runtime: decode → RGB →
//! fit to the model's square input (the whole photo stretched, as Keras'
//! `image_dataset_from_directory` does, or its centre square, as torchvision users crop) and
//! resize (bilinear) → `x * scale + offset`, channels last (HWC).
//!
//! Also the two ways images reach it: [`image_files`], the one folder walk every step uses, and
//! [`decode_batch`], the one loop that turns a list of files or encoded images into one batch
//! of resized pixels, listing the ones it could not read.

use crate::{Fit, Preprocessing, Resize};
use image::imageops::FilterType;
use rayon::prelude::*;
use std::collections::HashSet;
use std::io::Cursor;
use std::path::{Path, PathBuf};

/// What one encoded image may cost to decode. Every image of every step goes through
/// [`decode_rgb`] with these limits: the header's sizes are checked before anything is decoded,
/// metadata chunks before the decoder sees them, and the decoders' own allocations are capped
/// (`image::Limits`), so that no file, however crafted, makes a step allocate more than about
/// [`DecodeLimits::max_alloc`] plus the resize's working buffers (see [`DecodeLimits::peak_bytes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Most pixels (width × height, from the header).
    pub max_pixels: u64,
    /// Longest side, pixels.
    pub max_side: u32,
    /// Largest ratio of the longer side to the shorter (a 40,000,000 x 1 image has a small pixel
    /// count but makes a resize allocate for 40,000,000 x size).
    pub max_aspect: u32,
    /// Most bytes the decoder may hold at once: the decoded image (up to 8 bytes a pixel for
    /// 16-bit RGBA) and metadata it inflates (ICC profiles, text).
    pub max_alloc: u64,
    /// Largest metadata chunk of a PNG or WebP file (ICC profile, text, EXIF, XMP), bytes as
    /// stored: real photos carry a few KB; a large compressed chunk is a decompression bomb.
    pub max_metadata_bytes: u64,
    /// Largest encoded file read from disk, bytes (the server's bodies have their own limit).
    pub max_file_bytes: u64,
}

impl Default for DecodeLimits {
    /// 40 Mpixels, 16,384 px a side, 32:1, 384 MiB, 1 MiB of metadata per chunk, 256 MiB files.
    fn default() -> Self {
        Self {
            max_pixels: 40_000_000,
            max_side: 16_384,
            max_aspect: 32,
            max_alloc: 384 << 20,
            max_metadata_bytes: 1 << 20,
            max_file_bytes: 256 << 20,
        }
    }
}

impl DecodeLimits {
    /// The most memory one decode to a `size` x `size` input can take: the decoder's allowance,
    /// the RGB copy of the largest image, and the resize's intermediate buffer (the longest side
    /// by `size`, 4 floats a pixel).
    pub fn peak_bytes(&self, size: u32) -> u64 {
        self.max_alloc + 3 * self.max_pixels + 16 * u64::from(self.max_side) * u64::from(size)
    }

    /// Checks a header's sizes.
    fn check(&self, width: u32, height: u32) -> Result<(), ImageError> {
        let too_large = |reason: String| Err(ImageError::TooLarge { width, height, reason });
        let (long, short) = (width.max(height), width.min(height));
        if short == 0 {
            return Err(ImageError::Decode(format!("{width}x{height}: the image has no pixels")));
        }
        if u64::from(width) * u64::from(height) > self.max_pixels {
            return too_large(format!("more than the {} pixels allowed", self.max_pixels));
        }
        if long > self.max_side {
            return too_large(format!("a side is longer than the {} pixels allowed", self.max_side));
        }
        if u64::from(long) > u64::from(short) * u64::from(self.max_aspect) {
            return too_large(format!("the sides differ by more than the {}:1 allowed", self.max_aspect));
        }
        Ok(())
    }
}

/// Why an image could not be turned into network input.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("empty file")]
    Empty,
    #[error("not a supported image (JPEG, PNG, WebP): {0}")]
    Format(String),
    #[error("{width}x{height} pixels: {reason}")]
    TooLarge { width: u32, height: u32, reason: String },
    #[error("metadata chunk `{chunk}` of {bytes} bytes is over the {max} bytes allowed")]
    Metadata { chunk: String, bytes: u64, max: u64 },
    #[error("decoding needs more than the {max} bytes allowed ({reason})")]
    OverBudget { max: u64, reason: String },
    #[error("cannot decode image: {0}")]
    Decode(String),
    #[error("truncated JPEG: the data ends before the image's end-of-image marker")]
    Truncated,
    #[error("cannot read: {0}")]
    Read(#[from] std::io::Error),
    #[error("a file of {bytes} bytes is larger than the {max} allowed")]
    FileTooLarge { bytes: u64, max: u64 },
}

/// The metadata chunks of a PNG (ancillary chunks: ICC profile, text, EXIF) or WebP (`ICCP`,
/// `EXIF`, `XMP `) file larger than `max` bytes as stored, found by walking the chunk headers
/// (nothing is decompressed). Other formats, and files cut short, pass: the decoder judges them.
fn oversized_metadata(bytes: &[u8], max: u64) -> Option<(String, u64)> {
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as u64;
    let le = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as u64;
    let name = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    if let Some(mut rest) = bytes.strip_prefix(b"\x89PNG\r\n\x1a\n".as_slice()) {
        while rest.len() >= 8 {
            let (len, kind) = (be(&rest[..4]), &rest[4..8]);
            // Ancillary chunks have a lower-case first letter.
            if kind[0].is_ascii_lowercase() && len > max {
                return Some((name(kind), len));
            }
            if kind == b"IEND" {
                break;
            }
            rest = rest.get(12 + len as usize..)?;
        }
    } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        let mut rest = &bytes[12..];
        while rest.len() >= 8 {
            let (kind, len) = (&rest[..4], le(&rest[4..8]));
            if matches!(kind, b"ICCP" | b"EXIF" | b"XMP ") && len > max {
                return Some((name(kind), len));
            }
            rest = rest.get(8 + (len as usize).next_multiple_of(2)..)?;
        }
    }
    None
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

/// Decodes an encoded image (JPEG, PNG, WebP; 8 or 16 bits, grey or colour, with or without
/// alpha; the first frame of an animation) to 8-bit RGB within `limits`: sizes and metadata are
/// checked before decoding, the decoder's allocations while it runs.
pub fn decode_rgb(bytes: &[u8], limits: &DecodeLimits) -> Result<image::RgbImage, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty);
    }
    // The decoders' own limits: what they may allocate (the image, and metadata they inflate,
    // such as an ICC profile), and, once the header has passed `limits.check`, its sides.
    let reader = |sides: bool| -> Result<image::ImageReader<Cursor<&[u8]>>, ImageError> {
        let mut r = image::ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| ImageError::Format(e.to_string()))?;
        if r.format().is_none() {
            return Err(ImageError::Format("unknown format".into()));
        }
        let mut l = image::Limits::default();
        if sides {
            (l.max_image_width, l.max_image_height) = (Some(limits.max_side), Some(limits.max_side));
        }
        l.max_alloc = Some(limits.max_alloc);
        r.limits(l);
        Ok(r)
    };
    if let Some((chunk, len)) = oversized_metadata(bytes, limits.max_metadata_bytes) {
        return Err(ImageError::Metadata { chunk, bytes: len, max: limits.max_metadata_bytes });
    }
    let decode_error = |e: image::ImageError| match e {
        image::ImageError::Limits(l) => ImageError::OverBudget { max: limits.max_alloc, reason: l.to_string() },
        e => ImageError::Decode(e.to_string()),
    };
    let (width, height) = reader(false)?.into_dimensions().map_err(decode_error)?;
    limits.check(width, height)?;
    if jpeg_truncated(bytes) {
        return Err(ImageError::Truncated);
    }
    let img = reader(true)?.decode().map_err(decode_error)?;
    Ok(img.to_rgb8())
}

/// Brings a photo to `size` x `size`: the whole photo or its centre square ([`Fit`]), resized
/// with the filter the description names.
pub fn resize(img: &image::RgbImage, size: u32, p: &Preprocessing) -> image::RgbImage {
    let filter = match p.resize {
        Resize::Nearest => FilterType::Nearest,
        Resize::Bilinear => FilterType::Triangle,
    };
    let (w, h) = img.dimensions();
    let (x, y, side_w, side_h) = match p.fit {
        Fit::Stretch => (0, 0, w, h),
        Fit::Crop => {
            let side = w.min(h);
            ((w - side) / 2, (h - side) / 2, side, side)
        }
    };
    if side_w == size && side_h == size {
        return image::imageops::crop_imm(img, x, y, size, size).to_image();
    }
    // A view, not a copy: the resize reads the centre square in place.
    image::imageops::resize(&*image::imageops::crop_imm(img, x, y, side_w, side_h), size, size, filter)
}

/// Scales 8-bit RGB pixels to the network's input, HWC.
pub fn to_input(img: &image::RgbImage, p: &Preprocessing) -> Vec<f32> {
    scale_pixels(img.as_raw(), p)
}

/// Scales resized pixels (any number of images, one after another) to the network's input:
/// `x * scale + offset`.
/// The mirror images (left-right) of square RGB images of side `side`, packed one after the
/// other: what flip averaging runs beside each image.
pub fn mirror_rgb(pixels: &[u8], side: usize) -> Vec<u8> {
    let mut out = pixels.to_vec();
    for row in out.chunks_exact_mut(side * 3) {
        for x in 0..side / 2 {
            for c in 0..3 {
                row.swap(x * 3 + c, (side - 1 - x) * 3 + c);
            }
        }
    }
    out
}

pub fn scale_pixels(pixels: &[u8], p: &Preprocessing) -> Vec<f32> {
    pixels.iter().map(|&v| v as f32 * p.scale + p.offset).collect()
}

/// Encoded bytes → the resized RGB pixels [size, size, 3], HWC: what an exported ONNX graph
/// (uint8 input) takes.
pub fn resized_pixels(
    bytes: &[u8],
    size: u32,
    p: &Preprocessing,
    limits: &DecodeLimits,
) -> Result<Vec<u8>, ImageError> {
    Ok(resize(&decode_rgb(bytes, limits)?, size, p).into_raw())
}

/// A file read (at most `limits.max_file_bytes`) and decoded to 8-bit RGB at its own size, within
/// `limits`: for pictures of photos (contact sheets), not network input.
pub fn decode_file(path: &Path, limits: &DecodeLimits) -> Result<image::RgbImage, ImageError> {
    decode_rgb(&read_bounded(path, limits.max_file_bytes)?, limits)
}

/// The whole chain: encoded bytes → [size, size, 3] floats, HWC.
pub fn preprocess(bytes: &[u8], size: u32, p: &Preprocessing, limits: &DecodeLimits) -> Result<Vec<f32>, ImageError> {
    let img = decode_rgb(bytes, limits)?;
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
    Ok(files_under(dir)?.images)
}

/// What [`files_under`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    /// Files with an image extension, sorted.
    pub images: Vec<PathBuf>,
    /// Other files (GIFs, text, ...), sorted: not read, but worth naming to whoever expected them.
    pub others: Vec<PathBuf>,
}

/// The walk of [`image_files`], keeping the files it passes over.
pub fn files_under(dir: &Path) -> std::io::Result<Listing> {
    fn walk(dir: &Path, seen: &mut HashSet<PathBuf>, out: &mut Listing) -> std::io::Result<()> {
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
                out.images.push(path);
            } else if path.is_file() {
                out.others.push(path);
            }
        }
        Ok(())
    }
    let mut out = Listing::default();
    walk(dir, &mut HashSet::new(), &mut out)?;
    out.images.sort();
    out.others.sort();
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

/// A file's bytes, if it holds at most `max` (checked before reading, and while reading, in case
/// it grows).
fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, ImageError> {
    use std::io::Read;
    let f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    if len > max {
        return Err(ImageError::FileTooLarge { bytes: len, max });
    }
    let mut bytes = Vec::with_capacity(len as usize);
    f.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(ImageError::FileTooLarge { bytes: bytes.len() as u64, max });
    }
    Ok(bytes)
}

/// Reads (files), decodes and resizes `sources` to `size` x `size` in parallel: the loop every
/// step runs to turn images into a batch for the network (the runtime's CLI and server, the
/// exporter's samples and evaluation, the trainer's data).
pub fn decode_batch(sources: &[Source], size: u32, p: &Preprocessing, limits: &DecodeLimits) -> DecodedBatch {
    let one = |s: &Source| -> Result<Vec<u8>, ImageError> {
        match s {
            Source::File(path) => resized_pixels(&read_bounded(path, limits.max_file_bytes)?, size, p, limits),
            Source::Bytes(bytes) => resized_pixels(bytes, size, p, limits),
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

    /// `crop` keeps the centre square of the shorter side (the left and right thirds of a 3:1
    /// photo are cut), `stretch` squeezes the whole photo; the photo's shape decides nothing
    /// else.
    #[test]
    fn crop_keeps_the_centre_square_and_stretch_the_whole_photo() {
        // 30x10: red, green, blue thirds.
        let img = image::RgbImage::from_fn(30, 10, |x, _| match x / 10 {
            0 => image::Rgb([255, 0, 0]),
            1 => image::Rgb([0, 255, 0]),
            _ => image::Rgb([0, 0, 255]),
        });
        let crop = Preprocessing { fit: Fit::Crop, ..Preprocessing::default() };
        let c = resize(&img, 10, &crop);
        assert!(c.pixels().all(|p| p.0 == [0, 255, 0]), "the crop is not the green centre");
        let s = resize(&img, 10, &Preprocessing::default());
        assert_eq!((s.get_pixel(0, 5).0, s.get_pixel(9, 5).0), ([255, 0, 0], [0, 0, 255]));
        // A tall photo is cut at the top and bottom; a square one is the same either way.
        let tall = image::RgbImage::from_fn(10, 30, |_, y| image::Rgb([(y / 10 * 100) as u8, 0, 0]));
        assert!(resize(&tall, 5, &crop).pixels().all(|p| p.0 == [100, 0, 0]));
        let square = image::RgbImage::from_fn(20, 20, |x, y| image::Rgb([x as u8, y as u8, 7]));
        assert_eq!(resize(&square, 8, &crop), resize(&square, 8, &Preprocessing::default()));
        // A description written before `fit` existed reads as stretch.
        let old: Preprocessing =
            serde_json::from_str(r#"{"color":"RGB","resize":"bilinear","scale":0.007843138,"offset":-1.0}"#).unwrap();
        assert_eq!(old.fit, Fit::Stretch);
    }

    #[test]
    fn bad_bytes_are_clear_errors() {
        assert!(matches!(decode_rgb(b"", &DecodeLimits::default()), Err(ImageError::Empty)));
        assert!(matches!(decode_rgb(b"hello world", &DecodeLimits::default()), Err(ImageError::Format(_))));
        // A PNG header claiming 50,000 x 50,000 pixels is refused before decoding.
        let png = png_header_only(50_000, 50_000);
        assert!(
            matches!(decode_rgb(&png, &DecodeLimits::default()), Err(ImageError::TooLarge { .. })),
            "{:?}",
            decode_rgb(&png, &DecodeLimits::default()).err()
        );
        // A JPEG cut in half decodes (grey rows) unless the missing end-of-image marker is noticed.
        let img = image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([(x * 4) as u8, (y * 5) as u8, 90]));
        let mut jpeg = Vec::new();
        img.write_to(&mut Cursor::new(&mut jpeg), image::ImageFormat::Jpeg).unwrap();
        assert!(decode_rgb(&jpeg, &DecodeLimits::default()).is_ok());
        let cut = &jpeg[..jpeg.len() * 2 / 3];
        assert!(matches!(decode_rgb(cut, &DecodeLimits::default()), Err(ImageError::Truncated)));
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
        // A file over the size limit is refused before it is read.
        let big = std::env::temp_dir().join(format!("modelspec-big-{}.png", std::process::id()));
        std::fs::write(&big, &a).unwrap();
        let small_files = DecodeLimits { max_file_bytes: a.len() as u64 - 1, ..DecodeLimits::default() };
        let r = decode_batch(&[Source::File(&big)], 8, &Preprocessing::default(), &small_files);
        assert!(matches!(r.failed.as_slice(), [(0, ImageError::FileTooLarge { .. })]), "{:?}", r.failed);
        std::fs::remove_file(&big).unwrap();
        let sources = [Source::Bytes(&a), Source::Bytes(b"junk"), Source::File(missing), Source::Bytes(&b)];
        let batch = decode_batch(&sources, 8, &Preprocessing::default(), &DecodeLimits::default());
        assert_eq!(batch.decoded, [0, 3]);
        assert_eq!(batch.pixels.len(), 2 * 8 * 8 * 3);
        assert_eq!(batch.image(1), resized_pixels(&b, 8, &Preprocessing::default(), &DecodeLimits::default()).unwrap());
        let failed: Vec<(usize, String)> = batch.failed.iter().map(|(i, e)| (*i, e.to_string())).collect();
        assert!(matches!(failed.as_slice(), [(1, _), (2, r)] if r.starts_with("cannot read")), "{failed:?}");
    }

    use testkit::png::{chunk, header_only as png_header_only};

    /// A real 8x8 PNG with `extra` inserted right after its header chunk.
    fn png_with(extra: &[u8]) -> Vec<u8> {
        let good = png(8, 8);
        let after_ihdr = 8 + 25;
        [&good[..after_ihdr], extra, &good[after_ihdr..]].concat()
    }

    /// Regression: a 38 KB PNG of 40,000,000 x 1 pixels passed the pixel count and made the
    /// resize ask for 96 GB (the process aborted). Long sides and extreme aspect ratios are
    /// refused from the header now.
    #[test]
    fn long_thin_images_are_refused_before_decoding() {
        let l = DecodeLimits::default();
        for (w, h, why) in [(40_000_000, 1, "longer than"), (1, 40_000_000, "longer than"), (10_000, 100, "32:1")] {
            match decode_rgb(&png_header_only(w, h), &l) {
                Err(e @ ImageError::TooLarge { .. }) => assert!(e.to_string().contains(why), "{e}"),
                other => panic!("{w}x{h}: {other:?}"),
            }
        }
        assert!(matches!(decode_rgb(&png_header_only(0, 5), &l), Err(ImageError::Decode(_))));
        // The same shapes within the limits decode.
        let wide = image::RgbImage::from_pixel(320, 10, image::Rgb([1, 2, 3]));
        let mut bytes = Vec::new();
        wide.write_to(&mut Cursor::new(&mut bytes), image::ImageFormat::Png).unwrap();
        assert_eq!(decode_rgb(&bytes, &l).unwrap().dimensions(), (320, 10));
    }

    /// Regression: a 3 MB PNG whose ICC profile inflated to 3 GB was decoded (3.3 GB resident,
    /// 11 s of CPU). Metadata chunks over the stored-size limit are refused unread.
    #[test]
    fn metadata_bombs_are_refused_or_bounded() {
        let l = DecodeLimits::default();
        let big = vec![0u8; l.max_metadata_bytes as usize + 1];
        for kind in [b"iCCP", b"zTXt", b"iTXt", b"eXIf"] {
            let e = decode_rgb(&png_with(&chunk(kind, &big)), &l).unwrap_err();
            assert!(matches!(e, ImageError::Metadata { ref chunk, .. } if chunk.as_bytes() == kind), "{e}");
        }
        // WebP's metadata chunks likewise (the RIFF walk stops at the oversized one).
        let webp = [&b"RIFF\0\0\0\0WEBPICCP"[..], &(big.len() as u32).to_le_bytes(), &big].concat();
        assert!(matches!(decode_rgb(&webp, &l), Err(ImageError::Metadata { .. })));
        // What a smaller chunk inflates to is bounded: tests/decode_memory.rs.
    }

    /// 16-bit and grey images become 8-bit RGB like any other.
    #[test]
    fn sixteen_bit_and_grey_images_decode() {
        let l = DecodeLimits::default();
        let img16 = image::ImageBuffer::<image::Rgba<u16>, _>::from_pixel(5, 4, image::Rgba([65535, 0, 32768, 65535]));
        let mut bytes = Vec::new();
        image::DynamicImage::ImageRgba16(img16)
            .write_to(&mut Cursor::new(&mut bytes), image::ImageFormat::Png)
            .unwrap();
        let rgb = decode_rgb(&bytes, &l).unwrap();
        assert_eq!(rgb.get_pixel(0, 0).0, [255, 0, 128]);
        let grey = image::GrayImage::from_pixel(3, 3, image::Luma([77]));
        let mut bytes = Vec::new();
        grey.write_to(&mut Cursor::new(&mut bytes), image::ImageFormat::Png).unwrap();
        assert_eq!(decode_rgb(&bytes, &l).unwrap().get_pixel(1, 1).0, [77, 77, 77]);
    }
}
