//! What a decompression bomb costs in memory, measured by a global allocator that records the
//! largest single allocation of this test binary (one test, so nothing else allocates at the
//! same time).
//!
//! A PNG whose ICC profile is 64 KB stored and 64 MiB inflated, under the stored-size limit:
//! with an 8 MiB decoding budget the profile is inflated no further than the budget (the PNG
//! decoder then drops it and decodes the image); without limits, as before, the whole 64 MiB
//! was allocated.

use modelspec::preprocess::{decode_rgb, DecodeLimits};
use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Cursor, Write};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Largest;
static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; only sizes are recorded.
unsafe impl GlobalAlloc for Largest {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LARGEST.fetch_max(l.size(), Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LARGEST.fetch_max(new, Ordering::Relaxed);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static GLOBAL: Largest = Largest;

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

fn chunk(kind: &[u8], data: &[u8]) -> Vec<u8> {
    let body = [kind, data].concat();
    [&(data.len() as u32).to_be_bytes()[..], &body, &crc32(&body).to_be_bytes()].concat()
}

#[test]
fn an_icc_profile_bomb_inflates_no_further_than_the_budget() {
    let mut png = Vec::new();
    image::RgbImage::from_pixel(8, 8, image::Rgb([9, 9, 9]))
        .write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    for _ in 0..64 {
        z.write_all(&[0u8; 1 << 20]).unwrap();
    }
    let profile = [&b"bomb\0\0"[..], &z.finish().unwrap()].concat();
    let limits = DecodeLimits { max_alloc: 8 << 20, ..DecodeLimits::default() };
    assert!((profile.len() as u64) < limits.max_metadata_bytes, "{} bytes stored", profile.len());
    let after_header = 8 + 25;
    let bomb = [&png[..after_header], &chunk(b"iCCP", &profile), &png[after_header..]].concat();

    LARGEST.store(0, Ordering::Relaxed);
    let img = decode_rgb(&bomb, &limits).unwrap();
    let largest = LARGEST.load(Ordering::Relaxed);
    assert_eq!(img.dimensions(), (8, 8));
    println!("largest single allocation while decoding: {largest} bytes (budget {})", limits.max_alloc);
    assert!(largest as u64 <= 2 * limits.max_alloc, "{largest} bytes for an 8 MiB budget");
}
