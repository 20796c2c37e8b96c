//! Our bilinear resize against PIL's (the resize Keras uses), on the four footwear images of
//! `../shared/fixtures/preprocess` (computed with PIL): within a couple of grey levels on average.

use modelspec::preprocess::{decode_rgb, resize, DecodeLimits};
use modelspec::Preprocessing;

#[test]
fn resize_is_close_to_pil_bilinear() {
    let files = std::fs::read_to_string(testkit::fixtures().join("xception/footwear_files.txt")).unwrap();
    for size in [150u32, 299] {
        let pil =
            candle_core::Tensor::read_npy(testkit::fixtures().join(format!("preprocess/pil_bilinear_{size}.npy")))
                .unwrap();
        let pil = pil.to_dtype(candle_core::DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let per = (size * size * 3) as usize;
        for (i, f) in files.lines().filter(|l| !l.trim().is_empty()).enumerate() {
            let path = testkit::footwear().join(f.trim().trim_start_matches("footwear/"));
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let img = resize(&decode_rgb(&bytes, &DecodeLimits::default()).unwrap(), size, &Preprocessing::default());
            let ours: Vec<f32> = img.as_raw().iter().map(|&v| v as f32).collect();
            let mean =
                ours.iter().zip(&pil[i * per..(i + 1) * per]).map(|(a, b)| (a - b).abs()).sum::<f32>() / per as f32;
            println!("{f} at {size}: mean |diff| {mean:.2} grey levels");
            assert!(mean < 2.0, "{f} at {size}: mean |diff| {mean}");
        }
    }
}
