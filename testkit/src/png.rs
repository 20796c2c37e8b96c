//! PNG files built by hand, chunk by chunk, for the tests of hostile and broken images: headers
//! of any size, metadata chunks of any size, image data that inflates to what a test wants.

use std::io::Write;

/// The 8-byte PNG signature.
pub const SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";

/// The CRC-32 of a chunk's type and data, as PNG computes it.
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}

/// One chunk: length, type, data, CRC.
pub fn chunk(kind: &[u8], data: &[u8]) -> Vec<u8> {
    let body = [kind, data].concat();
    [&(data.len() as u32).to_be_bytes()[..], &body, &crc32(&body).to_be_bytes()].concat()
}

/// The IHDR data of an 8-bit RGB image of `width` x `height`.
pub fn ihdr(width: u32, height: u32) -> Vec<u8> {
    [&width.to_be_bytes()[..], &height.to_be_bytes(), &[8, 2, 0, 0, 0]].concat()
}

/// `n` copies of `byte`, zlib-compressed at `level` (0-9), fed in 1 MiB pieces so that a
/// gigabyte of zeros costs no gigabyte of memory.
pub fn zlib(n: usize, byte: u8, level: u32) -> Vec<u8> {
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::new(level));
    let block = vec![byte; 1 << 20];
    let mut left = n;
    while left > 0 {
        let k = left.min(block.len());
        z.write_all(&block[..k]).expect("writing to memory");
        left -= k;
    }
    z.finish().expect("writing to memory")
}

/// A PNG whose header claims `width` x `height` RGB pixels, with one tiny IDAT: enough for a
/// decoder to read the sizes, not to decode.
pub fn header_only(width: u32, height: u32) -> Vec<u8> {
    let idat = [0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01];
    [SIGNATURE, &chunk(b"IHDR", &ihdr(width, height)), &chunk(b"IDAT", &idat), &chunk(b"IEND", &[])].concat()
}

/// A valid PNG of `width` x `height` black RGB pixels (small however large, the rows being
/// zeros), with `extra` chunks between its header and its data.
pub fn black(width: u32, height: u32, extra: &[u8]) -> Vec<u8> {
    let idat = zlib((width as usize * 3 + 1) * height as usize, 0, 9);
    [SIGNATURE, &chunk(b"IHDR", &ihdr(width, height)), extra, &chunk(b"IDAT", &idat), &chunk(b"IEND", &[])].concat()
}
