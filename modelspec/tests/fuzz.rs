//! Structure-aware fuzzing of the one guarded decode (`decode_rgb`), on stable Rust inside
//! `cargo test` (proptest): PNG files built chunk by chunk (headers of any size and type, ICC
//! profiles and text that inflate, animation chunks, bad CRCs, cut anywhere), JPEG files with
//! forged frame headers and segments, WebP files with forged canvas sizes and metadata chunks.
//!
//! The global allocator of this test binary refuses any single allocation over
//! [`MAX_ALLOCATION`]: a decode that tried to allocate more aborts the binary (the test fails)
//! instead of taking the machine. The limits are small here so that the bound is tight.
//!
//! `PROPTEST_CASES` sets the cases per target (CI: the default 256); `scripts/fuzz.sh` runs the
//! targets for minutes with fresh seeds.

use modelspec::onnx_meta;
use modelspec::preprocess::{decode_rgb, resized_pixels, DecodeLimits};
use modelspec::Preprocessing;
use proptest::prelude::*;
use std::io::Cursor;
use testkit::alloc::assert_nothing_refused;
use testkit::png::{crc32, zlib};

/// The limits every case decodes under.
const LIMITS: DecodeLimits = DecodeLimits {
    max_pixels: 1 << 20,
    max_side: 4096,
    max_aspect: 32,
    max_alloc: 16 << 20,
    max_metadata_bytes: 64 << 10,
    max_file_bytes: 1 << 20,
};
/// Input side the decoded images are resized to.
const SIZE: u32 = 64;
/// The largest single allocation a decode within [`LIMITS`] needs: the decoder's budget, the RGB
/// copy, the resize's rows (16 bytes · 4096 · 64), with room for the allocator's rounding. Test
/// data is built before decoding, in pieces under it.
const MAX_ALLOCATION: usize = 2 * (16 << 20);

#[global_allocator]
static GLOBAL: testkit::alloc::Bounded = testkit::alloc::Bounded(MAX_ALLOCATION);

/// Decodes within the limits; whatever the outcome, a success must respect them.
fn check(bytes: &[u8]) {
    let decoded = decode_rgb(bytes, &LIMITS);
    assert_nothing_refused();
    if let Ok(img) = decoded {
        let (w, h) = img.dimensions();
        assert!(u64::from(w) * u64::from(h) <= LIMITS.max_pixels && w.max(h) <= LIMITS.max_side);
        let px = resized_pixels(bytes, SIZE, &Preprocessing::default(), &LIMITS).unwrap();
        assert_eq!(px.len(), (SIZE * SIZE * 3) as usize);
        assert_nothing_refused();
    }
}

/// One PNG chunk, described: its type, its data, whether its CRC is right.
#[derive(Debug, Clone)]
enum PngChunk {
    /// A chunk type from the specification or not, with raw data.
    Raw([u8; 4], Vec<u8>),
    /// IDAT holding `n` inflated bytes of `byte` (a plausible or bomb-like image stream).
    Idat(usize, u8),
    /// An ICC profile or compressed text inflating to `n` bytes.
    Inflating([u8; 4], usize),
}

fn png_chunk() -> impl Strategy<Value = PngChunk> {
    let kinds = prop::sample::select(vec![
        *b"PLTE", *b"tRNS", *b"gAMA", *b"sRGB", *b"iCCP", *b"tEXt", *b"zTXt", *b"iTXt", *b"eXIf", *b"acTL", *b"fcTL",
        *b"fdAT", *b"IDAT", *b"IEND", *b"IHDR", *b"xYzW",
    ]);
    prop_oneof![
        (kinds.clone(), prop::collection::vec(any::<u8>(), 0..64)).prop_map(|(k, d)| PngChunk::Raw(k, d)),
        (0usize..(8 << 20), any::<u8>()).prop_map(|(n, b)| PngChunk::Idat(n, b)),
        (prop::sample::select(vec![*b"iCCP", *b"zTXt", *b"iTXt"]), 0usize..(64 << 20))
            .prop_map(|(k, n)| PngChunk::Inflating(k, n)),
    ]
}

/// Bytes of the image data a PNG header announces (filter byte + packed pixels per row).
fn raw_len(w: u32, h: u32, depth: u8, colour: u8) -> u64 {
    let channels = match colour {
        2 => 3,
        4 => 2,
        6 => 4,
        _ => 1,
    };
    (u64::from(w) * channels * u64::from(depth)).div_ceil(8).saturating_add(1).saturating_mul(u64::from(h))
}

/// A PNG: header of any size, depth and colour type, then chunks, often the image data the
/// header announces (so that extreme shapes decode and reach the resize), maybe cut short.
fn png() -> impl Strategy<Value = Vec<u8>> {
    let side = prop_oneof![1u32..300, 1u32..5000, 5000u32..300_000, any::<u32>()];
    (
        side.clone(),
        side,
        prop::sample::select(vec![1u8, 2, 4, 8, 16, 3]),
        prop::sample::select(vec![0u8, 2, 3, 4, 6, 5]),
        any::<u8>(),
        prop::collection::vec(png_chunk(), 0..6),
        any::<bool>(),
        any::<u16>(),
        any::<bool>(),
    )
        .prop_map(|(w, h, depth, colour, interlace, chunks, good_crc, cut, whole)| {
            let mut out = testkit::png::SIGNATURE.to_vec();
            let mut put = |kind: &[u8], data: &[u8], good: bool| {
                out.extend_from_slice(&(data.len() as u32).to_be_bytes());
                let body = [kind, data].concat();
                out.extend_from_slice(&body);
                out.extend_from_slice(&(crc32(&body) ^ u32::from(!good)).to_be_bytes());
            };
            let ihdr = [&w.to_be_bytes()[..], &h.to_be_bytes(), &[depth, colour, 0, 0, interlace % 3]].concat();
            put(b"IHDR", &ihdr, true);
            for c in &chunks {
                match c {
                    PngChunk::Raw(k, d) => put(k, d, good_crc),
                    PngChunk::Idat(n, b) => put(b"IDAT", &zlib(*n, *b, 1), true),
                    PngChunk::Inflating(k, n) => {
                        let head: &[u8] = if k == b"iTXt" { b"k\0\x01\0\0\0" } else { b"k\0\0" };
                        put(k, &[head, &zlib(*n, 0, 1)].concat(), true)
                    }
                }
            }
            let raw = raw_len(w, h, depth, colour);
            if whole && raw <= 64 << 20 {
                put(b"IDAT", &zlib(raw as usize, 0, 1), true);
            }
            put(b"IEND", &[], true);
            // Most files whole, some cut anywhere.
            if cut % 4 == 0 {
                out.truncate(out.len() - (cut as usize >> 2) % out.len());
            }
            out
        })
}

/// A real JPEG of a small random image, then forged: a frame header claiming any size, extra
/// segments, bytes flipped, cut short.
fn jpeg() -> impl Strategy<Value = Vec<u8>> {
    (
        1u32..48,
        1u32..48,
        any::<u64>(),
        prop::option::of((any::<u16>(), any::<u16>())),
        prop::collection::vec((0xe0u8..0xf0, prop::collection::vec(any::<u8>(), 0..300)), 0..4),
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        any::<u16>(),
    )
        .prop_map(|(w, h, seed, sof, segments, flips, cut)| {
            let img = image::RgbImage::from_fn(w, h, |x, y| {
                let v = seed.wrapping_mul(x as u64 + 1).wrapping_add(y as u64 * 7919);
                image::Rgb([v as u8, (v >> 8) as u8, (v >> 16) as u8])
            });
            let mut out = Vec::new();
            img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Jpeg).unwrap();
            if let Some((fh, fw)) = sof {
                // The baseline frame header: FFC0, length, precision, height, width.
                if let Some(i) = out.windows(2).position(|p| p == [0xff, 0xc0]) {
                    out[i + 5..i + 7].copy_from_slice(&fh.to_be_bytes());
                    out[i + 7..i + 9].copy_from_slice(&fw.to_be_bytes());
                }
            }
            for (marker, data) in segments.iter().rev() {
                let len = (data.len() + 2) as u16;
                let seg = [&[0xff, *marker][..], &len.to_be_bytes(), data].concat();
                out.splice(2..2, seg);
            }
            for (at, b) in &flips {
                let i = at.index(out.len());
                out[i] = *b;
            }
            if cut > 0 && (cut as usize) < out.len() {
                out.truncate(out.len() - cut as usize);
            }
            out
        })
}

/// A WebP: a forged extended header (canvas of any size, flags) and chunks, or a real lossless
/// image with bytes flipped.
fn webp() -> impl Strategy<Value = Vec<u8>> {
    let forged = (
        any::<u8>(),
        0u32..(1 << 24),
        0u32..(1 << 24),
        prop::collection::vec(
            (
                prop::sample::select(vec![
                    *b"ICCP", *b"EXIF", *b"XMP ", *b"ANIM", *b"ANMF", *b"ALPH", *b"VP8 ", *b"VP8L",
                ]),
                prop::collection::vec(any::<u8>(), 0..200),
            ),
            0..5,
        ),
    )
        .prop_map(|(flags, w, h, chunks)| {
            let mut body = b"WEBPVP8X".to_vec();
            body.extend_from_slice(&10u32.to_le_bytes());
            body.extend_from_slice(&[flags, 0, 0, 0]);
            body.extend_from_slice(&w.to_le_bytes()[..3]);
            body.extend_from_slice(&h.to_le_bytes()[..3]);
            for (k, d) in &chunks {
                body.extend_from_slice(k);
                body.extend_from_slice(&(d.len() as u32).to_le_bytes());
                body.extend_from_slice(d);
                if d.len() % 2 == 1 {
                    body.push(0);
                }
            }
            [&b"RIFF"[..], &(body.len() as u32).to_le_bytes(), &body].concat()
        });
    let real = (1u32..40, 1u32..40, prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6)).prop_map(
        |(w, h, flips)| {
            let img = image::RgbaImage::from_fn(w, h, |x, y| image::Rgba([(x * 9) as u8, (y * 5) as u8, 77, 255]));
            let mut out = Vec::new();
            img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::WebP).unwrap();
            for (at, b) in &flips {
                let i = at.index(out.len());
                out[i] = *b;
            }
            out
        },
    );
    prop_oneof![forged, real]
}

proptest! {
    #[test]
    fn png_files(bytes in png()) {
        check(&bytes);
    }

    #[test]
    fn jpeg_files(bytes in jpeg()) {
        check(&bytes);
    }

    #[test]
    fn webp_files(bytes in webp()) {
        check(&bytes);
    }

    /// ONNX metadata properties of any content (the keys the exporter writes and others; JSON
    /// of the right and wrong shapes; long strings): a description or an error naming the key.
    #[test]
    fn onnx_metadata(props in prop::collection::hash_map(
        prop::sample::select(vec!["classes", "input_size", "layout", "input_type", "preprocessing", "model_name",
            "model_version", "architecture", "head", "metrics", "source", "toolchain", "other"]),
        prop_oneof![
            Just(r#"["boot","sandal","shoe"]"#.to_string()),
            Just("224".to_string()),
            Just("NHWC".to_string()),
            Just("uint8".to_string()),
            Just("xception".to_string()),
            Just(r#"{"color":"RGB","resize":"bilinear","scale":0.007843138,"offset":-1.0,"scaling_in_graph":true}"#.to_string()),
            Just(r#"{"inner":100,"dropout":0.2,"classes":3}"#.to_string()),
            Just("null".to_string()),
            "[0-9]{1,25}",
            "\\PC{0,64}",
            (0usize..3_000_000).prop_map(|n| "[".repeat(n % 200_000)),
            (0usize..2_000_000).prop_map(|n| "x".repeat(n)),
        ],
        0..14,
    )) {
        match onnx_meta::parse(|k| props.get(k).cloned()) {
            Ok(info) => {
                let d = &info.description;
                prop_assert!(d.input_size <= modelspec::MAX_INPUT_SIZE && d.classes.len() <= modelspec::MAX_CLASSES);
            }
            Err(e) => prop_assert!(!e.key.is_empty()),
        }
        assert_nothing_refused();
    }

    /// Anything at all, with a PNG, JPEG or WebP signature in front.
    #[test]
    fn arbitrary_bytes(sig in prop::sample::select(vec![&b"\x89PNG\r\n\x1a\n"[..], &[0xff, 0xd8, 0xff][..], &b"RIFF\0\0\0\0WEBP"[..], &b""[..]]),
                       rest in prop::collection::vec(any::<u8>(), 0..2000)) {
        check(&[sig, &rest].concat());
    }
}

/// The allocation counter is live: a legal 1024 x 1024 decode is seen allocating its 3 MiB
/// image (the largest allocation of the targets so far is printed beside the bound).
#[test]
fn the_allocation_counter_sees_a_legal_decode() {
    let img = image::RgbImage::from_pixel(1024, 1024, image::Rgb([1, 2, 3]));
    let mut bytes = Vec::new();
    img.write_to(&mut Cursor::new(&mut bytes), image::ImageFormat::Png).unwrap();
    check(&bytes);
    let largest = testkit::alloc::largest();
    println!("largest single allocation so far: {largest} bytes (bound {MAX_ALLOCATION})");
    assert!(largest >= 3 << 20, "{largest}");
}
