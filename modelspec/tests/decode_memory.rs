//! What a decompression bomb costs in memory, measured by a global allocator that records the
//! largest single allocation of this test binary (one test, so nothing else allocates at the
//! same time).
//!
//! A PNG whose ICC profile is under the 1 MiB stored-size limit and inflates to 64 MiB:
//! with an 8 MiB decoding budget the profile is inflated no further than the budget (the PNG
//! decoder then drops it and decodes the image); without limits, as before, the whole 64 MiB
//! was allocated.

use modelspec::preprocess::{decode_rgb, DecodeLimits};
use std::io::Cursor;
use testkit::png::{chunk, zlib};

#[global_allocator]
static GLOBAL: testkit::alloc::Bounded = testkit::alloc::Bounded(usize::MAX);

#[test]
fn an_icc_profile_bomb_inflates_no_further_than_the_budget() {
    let mut png = Vec::new();
    image::RgbImage::from_pixel(8, 8, image::Rgb([9, 9, 9]))
        .write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let profile = [&b"bomb\0\0"[..], &zlib(64 << 20, 0, 1)].concat();
    let limits = DecodeLimits { max_alloc: 8 << 20, ..DecodeLimits::default() };
    assert!((profile.len() as u64) < limits.max_metadata_bytes, "{} bytes stored", profile.len());
    let after_header = 8 + 25;
    let bomb = [&png[..after_header], &chunk(b"iCCP", &profile), &png[after_header..]].concat();

    testkit::alloc::reset_largest();
    let img = decode_rgb(&bomb, &limits).unwrap();
    let largest = testkit::alloc::largest();
    assert_eq!(img.dimensions(), (8, 8));
    println!("largest single allocation while decoding: {largest} bytes (budget {})", limits.max_alloc);
    assert!(largest as u64 <= 2 * limits.max_alloc, "{largest} bytes for an 8 MiB budget");
}
