//! The out-of-distribution answer end to end: the small model's file carries `ood_score` and
//! its threshold (set by the exporter on the run's validation photos); the `footwear` binary
//! answers `unknown` with the reason, the score and the threshold on the command line (table,
//! JSON, CSV), `/v1/predict`, v2 and gRPC list the output, `/metrics` counts the answers,
//! `--ood off` turns it off, and a file without the output is served as before.
//!
//! A copy of the file whose threshold is 0 makes every image out of distribution, so that the
//! paths are checked on real photos whatever the small model scores them; the real threshold's
//! rates are measured on the full-size model (docs/ood.md).

use e2e::{client, footwear_bin, json, ort_lib, test_photos, trained, with_ood_threshold, Server};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

fn predict(model: &Path, format: &str, extra: &[&str], inputs: &[PathBuf]) -> String {
    let out = Command::new(footwear_bin())
        .args(["predict", "--format", format, "-m"])
        .arg(model)
        .arg("--ort-lib")
        .arg(ort_lib())
        .args(extra)
        .args(inputs)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn info(model: &Path) -> Value {
    let out =
        Command::new(footwear_bin()).args(["info", "--ort-lib"]).arg(ort_lib()).arg("-m").arg(model).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn out_of_distribution_images_are_unknown_on_every_client_and_old_files_are_served_unchanged() {
    let t = trained();
    let dir = testkit::tmp("e2e", "ood");
    let photos: Vec<PathBuf> = test_photos(&t.data, 2).into_iter().map(|p| p.0).collect();

    // The real file: its threshold from the validation photos, each answer consistent with it.
    let i = info(&t.onnx);
    assert_eq!(i["ood_score_output"], json!(true), "{i}");
    let threshold = i["ood"]["threshold"].as_f64().unwrap();
    assert_eq!(i["ood"]["method"], json!("mahalanobis_l2"));
    assert_eq!(i["ood"]["rejection_rate"], json!(0.01));
    assert_eq!(i["ood"]["photos"], json!(90), "the 30 validation photos of each class: {i}");
    assert!(i["ood"]["set_on"].as_str().unwrap().contains("validation"), "{i}");
    let v: Value = serde_json::from_str(&predict(&t.onnx, "json", &[], &photos)).unwrap();
    assert_eq!(v["model"]["ood_threshold"].as_f64().unwrap(), threshold);
    for p in v["predictions"].as_array().unwrap() {
        let score = p["ood_score"].as_f64().unwrap();
        assert!(score > 0.0 && score.is_finite(), "{p}");
        assert_eq!(p["ood_threshold"].as_f64().unwrap(), threshold);
        assert_eq!(p["reason"] == json!("out_of_distribution"), score > threshold, "{p}");
    }

    // Threshold 0: every photo is out of distribution, on the CLI in each format...
    let far = dir.join("model-ood0.onnx");
    with_ood_threshold(&t.onnx, &far, 0.0);
    let v: Value = serde_json::from_str(&predict(&far, "json", &[], &photos)).unwrap();
    let preds = v["predictions"].as_array().unwrap();
    assert_eq!(preds.len(), photos.len());
    for p in preds {
        assert_eq!((&p["label"], &p["reason"]), (&json!("unknown"), &json!("out_of_distribution")), "{p}");
        assert_eq!(p["ood_threshold"], json!(0.0));
        // The best class and its probability are still there.
        assert!(["boot", "sandal", "shoe"].contains(&p["top_k"][0]["label"].as_str().unwrap()), "{p}");
        assert_eq!(p["confidence"], p["top_k"][0]["probability"]);
    }
    let table = predict(&far, "table", &[], &photos[..1]);
    assert!(table.contains("ood_score") && table.contains("unknown"), "{table}");
    assert!(table.contains("this does not look like a boot, a sandal or a shoe"), "{table}");
    let csv = predict(&far, "csv", &[], &photos[..1]);
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("file,label,confidence,top_k,reason,ood_score,ood_threshold"));
    let row: Vec<&str> = lines.next().unwrap().split(',').collect();
    assert_eq!((row[1], row[4], row[6]), ("unknown", "out_of_distribution", "0.000000"), "{csv}");
    // ... and `--ood off` gives the classes back, with no score.
    let v: Value = serde_json::from_str(&predict(&far, "json", &["--ood", "off"], &photos)).unwrap();
    for p in v["predictions"].as_array().unwrap() {
        assert_eq!(p["label"], p["top_k"][0]["label"], "{p}");
        assert!(p.get("reason").is_none() && p.get("ood_score").is_none(), "{p}");
    }

    // The server: /v1/predict, v2 JSON, the metrics counter, the metadata.
    let server = Server::start(&far, &[]);
    let body = std::fs::read(&photos[0]).unwrap();
    let (status, a) = json(client().post(format!("{}/v1/predict", server.url)).body(body.clone()).send().unwrap());
    assert_eq!(status, 200, "{a}");
    assert_eq!((&a["label"], &a["reason"]), (&json!("unknown"), &json!("out_of_distribution")), "{a}");
    assert!(a["ood_score"].as_f64().unwrap() > 0.0 && a["ood_threshold"] == json!(0.0), "{a}");
    assert_eq!(a["predictions"][0]["reason"], json!("out_of_distribution"));
    let (_, meta) = json(client().get(format!("{}/v2/models/footwear", server.url)).send().unwrap());
    let outputs: Vec<&str> = meta["outputs"].as_array().unwrap().iter().map(|o| o["name"].as_str().unwrap()).collect();
    assert_eq!(outputs, ["logits", "probabilities", "ood_score"], "{meta}");
    assert_eq!(meta["outputs"][2]["shape"], json!([-1]));
    assert_eq!(meta["parameters"]["ood_threshold"], json!(0.0));
    let (_, cfg) = json(client().get(format!("{}/v2/models/footwear/config", server.url)).send().unwrap());
    assert_eq!(
        cfg["output"][2],
        json!({"name": "ood_score", "data_type": "TYPE_FP32", "dims": [1], "reshape": {"shape": []}})
    );
    let size = i["input_size"].as_u64().unwrap() as usize;
    let req = json!({"inputs": [{"name": "image", "shape": [1, size, size, 3], "datatype": "UINT8",
        "data": vec![128u8; size * size * 3]}], "outputs": [{"name": "ood_score"}]});
    let (status, r) =
        json(client().post(format!("{}/v2/models/footwear/infer", server.url)).json(&req).send().unwrap());
    assert_eq!(status, 200, "{r}");
    assert_eq!((&r["outputs"][0]["name"], &r["outputs"][0]["shape"]), (&json!("ood_score"), &json!([1])), "{r}");
    assert_eq!(r["outputs"][0]["parameters"]["threshold"], json!(0.0), "{r}");
    assert!(r["outputs"][0]["data"][0].as_f64().unwrap() > 0.0, "{r}");
    let metrics = client().get(format!("{}/metrics", server.url)).send().unwrap().text().unwrap();
    let count = |reason: &str| -> f64 {
        let key = format!("footwear_unknown_answers_total{{reason=\"{reason}\"}} ");
        metrics.lines().find_map(|l| l.strip_prefix(&key)).map(|v| v.trim().parse().unwrap()).unwrap_or(-1.0)
    };
    assert_eq!(count("out_of_distribution"), 2.0, "one /v1/predict photo, one v2 image:\n{metrics}");
    assert_eq!(count("low_confidence"), 0.0, "{metrics}");
    // The page says it in words.
    let page = client().get(&server.url).send().unwrap().text().unwrap();
    assert!(page.contains("data-classes=\"a boot, a sandal or a shoe\""), "the page names the classes");
    drop(server);

    // `--ood off` on the server: served as a file without the output.
    let server = Server::start(&far, &["--ood", "off"]);
    let (_, a) = json(client().post(format!("{}/v1/predict", server.url)).body(body.clone()).send().unwrap());
    assert_eq!(a["label"], a["top_k"][0]["label"], "{a}");
    assert!(a.get("reason").is_none() && a.get("ood_score").is_none(), "{a}");
    let (_, meta) = json(client().get(format!("{}/v2/models/footwear", server.url)).send().unwrap());
    assert_eq!(meta["outputs"].as_array().unwrap().len(), 2, "{meta}");
    drop(server);

    // A file without the output (written before it, or with --no-ood) works as before.
    let plain = dir.join("model-plain.onnx");
    let mut o = e2e::export_options(&t.dir.join("run"), &plain, 7, false);
    o.ood_rejection = None;
    exporter::export(&o).unwrap();
    let i = info(&plain);
    assert_eq!((&i["ood"], &i["ood_score_output"]), (&Value::Null, &json!(false)), "{i}");
    let v: Value = serde_json::from_str(&predict(&plain, "json", &[], &photos)).unwrap();
    assert!(v["model"]["ood_threshold"].is_null());
    for p in v["predictions"].as_array().unwrap() {
        assert!(p.get("reason").is_none() && p.get("ood_score").is_none(), "{p}");
    }
    let server = Server::start(&plain, &[]);
    let (_, a) = json(client().post(format!("{}/v1/predict", server.url)).body(body).send().unwrap());
    assert!(a.get("reason").is_none() && a.get("ood_score").is_none() && a["label"] == a["top_k"][0]["label"], "{a}");
    let (_, meta) = json(client().get(format!("{}/v2/models/footwear", server.url)).send().unwrap());
    assert_eq!(meta["outputs"].as_array().unwrap().len(), 2, "{meta}");
    assert!(meta["parameters"].get("ood_threshold").is_none(), "{meta}");
    let req = json!({"inputs": [{"name": "image", "shape": [1, size, size, 3], "datatype": "UINT8",
        "data": vec![128u8; size * size * 3]}], "outputs": [{"name": "ood_score"}]});
    let (status, r) =
        json(client().post(format!("{}/v2/models/footwear/infer", server.url)).json(&req).send().unwrap());
    assert_eq!((status, &r["code"]), (400, &json!("bad_outputs")), "{r}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// Plain synthetic images (flat colours, uniform noise, smooth colour blobs, a gradient, stripes,
/// a checkerboard) are out of distribution at the file's own threshold, set on the validation
/// photos: the first version of the score (Mahalanobis of the raw features, docs/ood.md) scored
/// them *below* real photos, since their features are short and lie near every class mean.
#[test]
fn plain_synthetic_images_are_unknown_at_the_files_own_threshold() {
    let t = trained();
    let dir = testkit::tmp("e2e", "ood-synthetic");
    let mut state = 29u64;
    let mut byte = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 56) as u8
    };
    let mut images: Vec<(&str, image::RgbImage)> = Vec::new();
    for (name, c) in
        [("white", [255, 255, 255]), ("black", [0, 0, 0]), ("grey", [128, 128, 128]), ("red", [200, 30, 40])]
    {
        images.push((name, image::RgbImage::from_pixel(240, 200, image::Rgb(c))));
    }
    for name in ["noise-1", "noise-2"] {
        images.push((name, image::RgbImage::from_fn(256, 256, |_, _| image::Rgb([byte(), byte(), byte()]))));
    }
    let cells: Vec<[u8; 3]> = (0..36).map(|_| [byte(), byte(), byte()]).collect();
    let small = image::RgbImage::from_fn(6, 6, |x, y| image::Rgb(cells[(y * 6 + x) as usize]));
    images.push(("blobs", image::imageops::resize(&small, 300, 300, image::imageops::FilterType::CatmullRom)));
    images.push((
        "gradient",
        image::RgbImage::from_fn(320, 240, |x, y| image::Rgb([(x * 255 / 319) as u8, 90, (y * 255 / 239) as u8])),
    ));
    images.push((
        "stripes",
        image::RgbImage::from_fn(300, 300, |x, _| {
            image::Rgb(if x / 20 % 2 == 0 { [20, 60, 160] } else { [240, 220, 40] })
        }),
    ));
    images.push((
        "checker",
        image::RgbImage::from_fn(300, 300, |x, y| {
            image::Rgb(if (x / 30 + y / 30) % 2 == 0 { [0; 3] } else { [255; 3] })
        }),
    ));
    let files: Vec<PathBuf> = images
        .iter()
        .map(|(name, img)| {
            let f = dir.join(format!("{name}.png"));
            img.save(&f).unwrap();
            f
        })
        .collect();
    let threshold = info(&t.onnx)["ood"]["threshold"].as_f64().unwrap();
    let v: Value = serde_json::from_str(&predict(&t.onnx, "json", &[], &files)).unwrap();
    let preds = v["predictions"].as_array().unwrap();
    assert_eq!(preds.len(), files.len());
    for p in preds {
        println!("{}: ood_score {} (threshold {threshold:.3})", p["file"], p["ood_score"]);
        assert_eq!((&p["label"], &p["reason"]), (&json!("unknown"), &json!("out_of_distribution")), "{p}");
    }
}
