//! The whole chain on real footwear photos: a small model trained and exported, then the
//! `footwear` binary serving it over HTTP (real requests, every bad input), predicting from the
//! command line, and its web page driven in headless Chromium.

use e2e::repo;
use e2e::{client, footwear_bin, json, ort_lib, test_photos, trained, Server};
use reqwest::blocking::multipart;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use testkit::png::header_only as png_header;

const TOKEN: &str = "s3cret";

/// POSTs to /v1/predict over a plain socket the headers of an `n`-byte body with `token`, then
/// `sent` zero bytes of it, before reading anything; returns the answer's status line. With all
/// of the body sent: does an oversized one get its 413 rather than a reset? With none: does the
/// server check the token without waiting for the body?
fn raw_post(url: &str, token: &str, n: usize, sent: usize) -> std::io::Result<String> {
    use std::io::Write;
    let addr = url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(if sent == 0 { 5 } else { 30 })))?;
    write!(
        s,
        "POST /v1/predict HTTP/1.1\r\nHost: {addr}\r\nContent-Type: image/jpeg\r\n\
         Authorization: Bearer {token}\r\nContent-Length: {n}\r\n\r\n"
    )?;
    s.write_all(&vec![0u8; sent])?;
    let mut status = String::new();
    BufReader::new(s).read_line(&mut status)?;
    Ok(status)
}

#[test]
fn server_labels_real_photos_and_answers_every_bad_input_with_a_json_4xx() {
    let t = trained();
    let server = Server::start(&t.onnx, &["--token", TOKEN, "--max-body-mib", "1"]);
    let c = client();
    let url = |p: &str| format!("{}{p}", server.url);
    let auth = format!("Bearer {TOKEN}");

    // Health and metadata (open endpoints, then the KServe v2 model metadata).
    assert_eq!(json(c.get(url("/v2/health/live")).send().unwrap()), (200, serde_json::json!({"live": true})));
    assert_eq!(json(c.get(url("/v2/health/ready")).send().unwrap()).0, 200);
    let (s, meta) = json(c.get(url("/v2/models/footwear")).header("Authorization", &auth).send().unwrap());
    assert_eq!(s, 200);
    assert_eq!(meta["inputs"][0]["shape"], serde_json::json!([-1, 96, 96, 3]));
    assert_eq!(meta["parameters"]["classes"], serde_json::json!(["boot", "sandal", "shoe"]));
    assert_eq!(json(c.get(url("/v2/models/footwear/ready")).header("Authorization", &auth).send().unwrap()).0, 200);

    // Real photos, one per request, 16 clients at once.
    let photos = test_photos(&t.data, 5);
    let answers: Vec<(String, Value)> = std::thread::scope(|sc| {
        let handles: Vec<_> = photos
            .iter()
            .map(|(f, class)| {
                let (c, u, auth) = (c.clone(), url("/v1/predict"), auth.clone());
                sc.spawn(move || {
                    let body = std::fs::read(f).unwrap();
                    let r = c.post(u).header("Content-Type", "image/jpeg").header("Authorization", auth).body(body);
                    let (s, v) = json(r.send().unwrap());
                    assert_eq!(s, 200, "{v}");
                    (class.clone(), v)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // The classifier's own choice (top_k[0]): `label` may be `unknown` where the small model's
    // out-of-distribution fit (tests/ood.rs tests it) finds a photo unlike its 90 training photos.
    let correct = answers.iter().filter(|(class, v)| v["top_k"][0]["label"] == class.as_str()).count();
    for (_, v) in &answers {
        assert_eq!(v["model"], serde_json::json!({"name": "footwear", "version": "7"}));
        assert!(v["confidence"].as_f64().unwrap() > 0.0 && v["top_k"].as_array().unwrap().len() == 3);
        assert!(v["timings_ms"]["inference"].as_f64().unwrap() > 0.0);
    }
    // A 96 px head-only model trained on 90 photos; the full model is far better (docs/training.md).
    assert!(correct >= 12, "{correct}/15 photos labelled as their class: {answers:?}");
    println!("HTTP: {correct}/15 real test photos labelled correctly (trainer's test accuracy {:.3})", t.test_accuracy);

    // Several images in one multipart request.
    let mut form = multipart::Form::new();
    for (f, _) in photos.iter().take(3) {
        let part = multipart::Part::bytes(std::fs::read(f).unwrap())
            .file_name(f.file_name().unwrap().to_string_lossy().into_owned())
            .mime_str("image/jpeg")
            .unwrap();
        form = form.part("image", part);
    }
    let (s, v) = json(c.post(url("/v1/predict")).header("Authorization", &auth).multipart(form).send().unwrap());
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["predictions"].as_array().unwrap().len(), 3);
    assert_eq!(v["predictions"][0]["label"], answers[0].1["label"]);

    // KServe v2 inference on the same photo's pixels gives the same class.
    let px = modelspec::preprocess::resized_pixels(
        &std::fs::read(&photos[0].0).unwrap(),
        96,
        &modelspec::Preprocessing::default(),
        &modelspec::preprocess::DecodeLimits::default(),
    )
    .unwrap();
    let req = serde_json::json!({"id": "r1", "inputs": [{"name": "image", "shape": [1, 96, 96, 3], "datatype": "UINT8", "data": px}]});
    let (s, v) =
        json(c.post(url("/v2/models/footwear/infer")).header("Authorization", &auth).json(&req).send().unwrap());
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["id"], "r1");
    let probs: Vec<f64> = v["outputs"][1]["data"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    let top = (0..3).max_by(|&a, &b| probs[a].total_cmp(&probs[b])).unwrap();
    assert_eq!(["boot", "sandal", "shoe"][top], answers[0].1["top_k"][0]["label"]);

    // Bad input: each gets a 4xx JSON error saying what is wrong.
    let jpeg = std::fs::read(&photos[0].0).unwrap();
    let post = |ctype: &str, body: Vec<u8>| {
        json(
            c.post(url("/v1/predict"))
                .header("Content-Type", ctype)
                .header("Authorization", &auth)
                .body(body)
                .send()
                .unwrap(),
        )
    };
    let cases: Vec<(&str, (u16, Value), u16, &str)> = vec![
        ("not an image", post("image/jpeg", b"hello, this is text".to_vec()), 422, "invalid_image"),
        ("truncated JPEG", post("image/jpeg", jpeg[..jpeg.len() / 2].to_vec()), 422, "invalid_image"),
        ("0 bytes", post("image/jpeg", Vec::new()), 422, "invalid_image"),
        ("50,000 x 50,000 header", post("image/png", png_header(50_000, 50_000)), 413, "image_too_large"),
        // Once answered by an abort: the resize asked for 96 GB.
        ("40,000,000 x 1 header", post("image/png", png_header(40_000_000, 1)), 413, "image_too_large"),
        ("body over 1 MiB", post("image/jpeg", vec![0u8; 2 << 20]), 413, "body_too_large"),
        ("wrong content type", post("text/plain", b"{}".to_vec()), 415, "unsupported_content_type"),
        ("JSON without an image", post("application/json", b"{}".to_vec()), 400, "no_image"),
        ("JSON with an unknown field", post("application/json", br#"{"img": "aGk="}"#.to_vec()), 400, "malformed_json"),
    ];
    for (what, (status, v), want, code) in &cases {
        assert_eq!(*status, *want, "{what}: {v}");
        assert_eq!(v["code"], *code, "{what}: {v}");
        assert!(!v["error"].as_str().unwrap().is_empty(), "{what}: {v}");
        println!("{what}: {status} {}", v["error"]);
    }
    // A client that writes all of an oversized body before reading (8 MiB: more than the sockets
    // buffer) still gets the 413, not a reset connection.
    let status = raw_post(&server.url, TOKEN, 8 << 20, 8 << 20).expect("the 413 of an 8 MiB body");
    assert!(status.starts_with("HTTP/1.1 413"), "{status}");
    // The token is checked before any body is read: a wrong one is answered at once.
    let status = raw_post(&server.url, "wrong", 8 << 20, 0).expect("a 401 before the body");
    assert!(status.starts_with("HTTP/1.1 401"), "{status}");
    let infer = |model: &str, body: &str| {
        json(
            c.post(url(&format!("/v2/models/{model}/infer")))
                .header("Content-Type", "application/json")
                .header("Authorization", &auth)
                .body(body.to_string())
                .send()
                .unwrap(),
        )
    };
    let (s, v) = infer("footwear", "{\"inputs\": [");
    assert_eq!((s, v["code"].as_str()), (400, Some("malformed_json")), "{v}");
    let (s, v) = infer(
        "footwear",
        r#"{"inputs": [{"name": "image", "shape": [1, 5, 5, 3], "datatype": "UINT8", "data": [1]}]}"#,
    );
    assert_eq!((s, v["code"].as_str()), (400, Some("bad_shape")), "{v}");
    let (s, v) = infer("sneakers", "{}");
    assert_eq!((s, v["code"].as_str()), (404, Some("unknown_model")), "{v}");
    assert!(v["error"].as_str().unwrap().contains("sneakers"));
    let (s, v) =
        json(c.post(url("/v1/predict")).header("Content-Type", "image/jpeg").body(jpeg.clone()).send().unwrap());
    assert_eq!((s, v["code"].as_str()), (401, Some("unauthorized")), "{v}");
    let (s, v) = json(
        c.post(url("/v1/predict?top_k=many"))
            .header("Content-Type", "image/jpeg")
            .header("Authorization", &auth)
            .body(jpeg.clone())
            .send()
            .unwrap(),
    );
    assert_eq!((s, v["code"].as_str()), (400, Some("bad_query")), "{v}");
    let (s, v) = json(c.get(url("/nope")).send().unwrap());
    assert_eq!((s, v["code"].as_str()), (404, Some("not_found")), "{v}");

    // Still serving, and the metrics counted all of it.
    assert_eq!(post("image/jpeg", jpeg.clone()).0, 200);
    let m = c.get(url("/metrics")).send().unwrap().text().unwrap();
    for want in [
        "footwear_http_requests_total{endpoint=\"/v1/predict\",status=\"200\"}",
        "footwear_http_errors_total{endpoint=\"/v1/predict\",code=\"invalid_image\"} 3",
        "footwear_http_request_duration_seconds_bucket",
        "footwear_batch_size_images_bucket",
        "footwear_queue_seconds_count",
    ] {
        assert!(m.contains(want), "/metrics lacks {want}:\n{m}");
    }
    let page = c.get(url("/")).send().unwrap().text().unwrap();
    assert!(page.contains("type=\"file\"") && !page.contains("http://") && !page.contains("https://"));

    assert!(server.stop().success(), "graceful shutdown");
}

/// Top-k probabilities of one answer, by label.
fn probabilities(answer: &Value) -> Vec<(String, f64)> {
    let mut p: Vec<(String, f64)> = answer["top_k"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["label"].as_str().unwrap().to_string(), r["probability"].as_f64().unwrap()))
        .collect();
    p.sort_by(|a, b| a.0.cmp(&b.0));
    p
}

#[test]
fn micro_batching_groups_concurrent_requests_gives_each_its_own_rows_and_times_out() {
    let t = trained();
    let photos: Vec<_> = test_photos(&t.data, 2);
    // Each photo alone (the CLI, batch 1): the reference for what the batched server must answer.
    let out = Command::new(footwear_bin())
        .args(["predict", "--format", "json", "--batch", "1", "-m"])
        .arg(&t.onnx)
        .arg("--ort-lib")
        .arg(ort_lib())
        .args(photos.iter().map(|(f, _)| f))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let solo: Value = serde_json::from_slice(&out.stdout).unwrap();
    let solo = solo["predictions"].as_array().unwrap();
    assert_eq!(solo.len(), photos.len());

    // One session, batches of up to 6 images, each batch waiting up to 1.5 s for company: six
    // clients at once must share batches, and each must get the rows of its own photo.
    let server = Server::start(&t.onnx, &["--sessions", "1", "--max-batch", "6", "--max-delay-ms", "1500"]);
    let c = client();
    let u = format!("{}/v1/predict", server.url);
    let answers: Vec<Value> = std::thread::scope(|sc| {
        let handles: Vec<_> = photos
            .iter()
            .map(|(f, _)| {
                let (c, u) = (c.clone(), u.clone());
                sc.spawn(move || {
                    let r = c.post(u).header("Content-Type", "image/jpeg").body(std::fs::read(f).unwrap());
                    let (s, v) = json(r.send().unwrap());
                    assert_eq!(s, 200, "{v}");
                    v
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let sizes: Vec<u64> = answers.iter().map(|v| v["batch_size"].as_u64().unwrap()).collect();
    println!("batch sizes seen by 6 concurrent requests: {sizes:?}");
    assert!(sizes.iter().all(|&b| (1..=6).contains(&b)), "{sizes:?}");
    assert!(sizes.iter().any(|&b| b >= 2), "no request shared a batch: {sizes:?}");
    for ((answer, alone), (f, _)) in answers.iter().zip(solo).zip(&photos) {
        assert_eq!(answer["label"], alone["label"], "{}", f.display());
        for ((la, pa), (lb, pb)) in probabilities(answer).iter().zip(probabilities(alone)) {
            assert_eq!(*la, lb);
            assert!((pa - pb).abs() < 1e-4, "{}: {la} {pa} in a batch, {pb} alone", f.display());
        }
    }
    let m = c.get(format!("{}/metrics", server.url)).send().unwrap().text().unwrap();
    let batches: f64 = m
        .lines()
        .find(|l| l.starts_with("footwear_batch_size_images_count"))
        .and_then(|l| l.split_whitespace().last())
        .unwrap_or_else(|| panic!("no batch count in /metrics:\n{m}"))
        .parse()
        .unwrap();
    assert!(batches < 6.0, "{batches} batches for 6 requests");
    assert!(server.stop().success());

    // A request that cannot be answered in time gets a 503 JSON error, and the server goes on.
    let server = Server::start(&t.onnx, &["--max-batch", "8", "--max-delay-ms", "4000", "--timeout-s", "1"]);
    let started = Instant::now();
    let body = std::fs::read(&photos[0].0).unwrap();
    let (s, v) = json(
        c.post(format!("{}/v1/predict", server.url)).header("Content-Type", "image/jpeg").body(body).send().unwrap(),
    );
    assert_eq!((s, v["code"].as_str()), (503, Some("timeout")), "{v}");
    assert!(started.elapsed() < Duration::from_secs(3), "answered after {:?}", started.elapsed());
    assert_eq!(json(client().get(format!("{}/v2/health/live", server.url)).send().unwrap()).0, 200);
    let m = c.get(format!("{}/metrics", server.url)).send().unwrap().text().unwrap();
    assert!(m.contains("code=\"timeout\"} 1"), "{m}");
    assert!(server.stop().success(), "graceful shutdown with a request still queued");
}

#[test]
fn cli_predicts_files_folders_and_globs_and_reports_unreadable_files() {
    let t = trained();
    let bad = t.dir.join("corrupt.jpg");
    std::fs::write(&bad, b"\xff\xd8\xff\xe0 not really a jpeg").unwrap();
    let glob = format!("{}/test/sandal/*.jpg", t.data.display());
    let out = Command::new(footwear_bin())
        .args(["predict", "--format", "json", "--top-k", "2", "-m"])
        .arg(&t.onnx)
        .arg("--ort-lib")
        .arg(ort_lib())
        .arg(t.data.join("test/boot"))
        .arg(&glob)
        .arg(&bad)
        .arg(t.data.join("test/shoe").join("missing.jpg"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "exit code 2 when some inputs fail: {stderr}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let preds = v["predictions"].as_array().unwrap();
    assert_eq!(preds.len(), 60, "30 boots + 30 sandals");
    assert!(preds.iter().all(|p| p["top_k"].as_array().unwrap().len() == 2));
    let errors = v["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors.iter().any(|e| e["file"].as_str().unwrap().ends_with("corrupt.jpg")));
    assert!(stderr.contains("corrupt.jpg") && stderr.contains("missing.jpg"));
    let right = preds
        .iter()
        .filter(|p| p["file"].as_str().unwrap().contains(&format!("/{}/", p["top_k"][0]["label"].as_str().unwrap())))
        .count();
    println!("CLI: {right}/60 labelled as their folder");
    assert!(right >= 48, "{right}/60");

    // A threshold above every confidence answers `unknown`; CSV has a header and one row per image.
    let out = Command::new(footwear_bin())
        .args(["predict", "--format", "csv", "--threshold", "1.01", "-m"])
        .arg(&t.onnx)
        .arg("--ort-lib")
        .arg(ort_lib())
        .arg(t.data.join("test/shoe"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let csv = String::from_utf8(out.stdout).unwrap();
    assert_eq!(csv.lines().count(), 31);
    assert!(csv.lines().skip(1).all(|l| l.split(',').nth(1) == Some("unknown")), "{csv}");

    // A missing model is a fatal error (exit code 1) naming the file.
    let out = Command::new(footwear_bin()).args(["predict", "-m", "/no/model.onnx", "x.jpg"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/no/model.onnx"));
}

#[test]
fn cuda_without_a_cuda_library_is_refused_with_require_cuda_and_else_falls_back_saying_so() {
    // The CPU build of ONNX Runtime (what the tests install) has no CUDA execution provider.
    let t = trained();
    let info = |extra: &[&str]| {
        Command::new(footwear_bin())
            .args(["info", "--device", "cuda", "-m"])
            .arg(&t.onnx)
            .arg("--ort-lib")
            .arg(ort_lib())
            .args(extra)
            .env("NO_COLOR", "1")
            .output()
            .unwrap()
    };
    let out = info(&["--require-cuda"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("CUDA execution provider required but unavailable"), "{stderr}");
    assert!(out.stdout.is_empty());

    let out = info(&[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("WARN") && stderr.contains("running on the CPU"), "{stderr}");
    assert!(stderr.contains("execution provider CPU"), "the log names the provider that runs: {stderr}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["classes"], serde_json::json!(["boot", "sandal", "shoe"]));
}

#[test]
fn web_page_in_headless_chromium_uploads_a_photo_and_shows_its_label() {
    let t = trained();
    let server = Server::start(&t.onnx, &[]);
    // The same model with its out-of-distribution threshold at 0: every photo is `unknown`.
    let strict = testkit::tmp("e2e", "web-ood").join("model.onnx");
    e2e::with_ood_threshold(&t.onnx, &strict, 0.0);
    let strict_server = Server::start(&strict, &[]);
    let photo = std::fs::canonicalize(&test_photos(&t.data, 1)[1].0).unwrap(); // a sandal
    let expected = {
        let r =
            client().post(format!("{}/v1/predict", server.url)).body(std::fs::read(&photo).unwrap()).send().unwrap();
        json(r).1["label"].as_str().unwrap().to_string()
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut driver = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .spawn()
        .expect("chromedriver (Debian's chromium-driver; scripts/setup-system.sh test installs it)");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let shown = rt.block_on(async {
        let caps: serde_json::Map<String, Value> = serde_json::from_value(serde_json::json!({
            "goog:chromeOptions": {"args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]}
        }))
        .unwrap();
        let mut c = None;
        for _ in 0..50 {
            match fantoccini::ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new()).capabilities(caps.clone()).connect(&format!("http://127.0.0.1:{port}")).await {
                Ok(client) => {
                    c = Some(client);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        let c = c.expect("cannot reach chromedriver");
        c.set_window_size(1200, 900).await.unwrap();
        let upload = |url: String| {
            let (c, photo) = (c.clone(), photo.clone());
            async move {
                c.goto(&url).await.unwrap();
                let input = c.find(fantoccini::Locator::Css("#file")).await.unwrap();
                input.send_keys(&photo.display().to_string()).await.unwrap();
                let t0 = Instant::now();
                loop {
                    let text = c.find(fantoccini::Locator::Css("#label")).await.unwrap().text().await.unwrap();
                    if !text.is_empty() && text != "…" {
                        break text;
                    }
                    assert!(t0.elapsed() < Duration::from_secs(30), "no label shown");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        // An out-of-distribution answer first: the page says so and why, and still shows the bars.
        let ood_text = upload(strict_server.url.clone()).await;
        let ood_detail = c.find(fantoccini::Locator::Css("#confidence")).await.unwrap().text().await.unwrap();
        let ood_bars = c.find_all(fantoccini::Locator::Css("#probs .bar")).await.unwrap().len();
        let ood = (ood_text, ood_detail, ood_bars);
        let text = upload(server.url.clone()).await;
        let bars = c.find_all(fantoccini::Locator::Css("#probs .bar")).await.unwrap().len();
        let error = c.find(fantoccini::Locator::Css("#error")).await.unwrap().text().await.unwrap();
        // The layout: nothing overlaps the drop box, the photo is shown, each bar has a width.
        let layout = c
            .execute(
                r##"const r = (q) => document.querySelector(q).getBoundingClientRect();
                const img = document.getElementById("preview");
                const fills = [...document.querySelectorAll("#probs .fill")].map((f) => f.getBoundingClientRect().width);
                return {
                  header_bottom: r("header").bottom, drop_top: r("#drop").top,
                  photo_shown: img.complete && img.naturalWidth > 0 && r("#preview").height > 50,
                  bars_right_of_photo: r("#probs").left >= r("#drop").right,
                  widest_bar: Math.max(...fills), widths: fills,
                };"##,
                vec![],
            )
            .await
            .unwrap();
        let shot = c.screenshot().await.unwrap();
        c.close().await.unwrap();
        (text, bars, error, layout, shot, ood)
    });
    let _ = driver.kill();
    let _ = driver.wait();
    let (text, bars, error, layout, shot, (ood_text, ood_detail, ood_bars)) = shown;
    println!("out-of-distribution answer shown as: {ood_text} / {ood_detail}");
    assert_eq!(ood_text, "unknown: this does not look like a boot, a sandal or a shoe");
    assert!(
        ood_detail.starts_with("out-of-distribution score ") && ood_detail.contains("(above 0.00 "),
        "{ood_detail}"
    );
    assert_eq!(ood_bars, 3, "the classes are still ranked");
    println!("page shows: {text}; layout {layout}");
    // The screenshot in docs/ comes from here (1200 x 900).
    let png = testkit::repo().join("target/web-page.png");
    std::fs::write(&png, &shot).unwrap();
    println!("screenshot: {}", png.display());
    assert!(shot.starts_with(b"\x89PNG"), "a PNG screenshot");
    assert!(layout["header_bottom"].as_f64().unwrap() <= layout["drop_top"].as_f64().unwrap(), "{layout}");
    assert_eq!(layout["photo_shown"], serde_json::json!(true), "{layout}");
    assert_eq!(layout["bars_right_of_photo"], serde_json::json!(true), "at 1200 px, two columns: {layout}");
    assert!(layout["widest_bar"].as_f64().unwrap() > 20.0, "{layout}");
    assert!(error.is_empty(), "{error}");
    if expected == "unknown" {
        // The small model's fit may find this photo unlike its 90 training photos (tests/ood.rs).
        assert!(text.starts_with("unknown: this does not look like"), "page shows `{text}`, the API says `unknown`");
    } else {
        assert!(text.starts_with(&format!("{expected} (")), "page shows `{text}`, the API says `{expected}`");
    }
    assert_eq!(bars, 3, "one probability bar per class");
}

#[test]
fn runtime_has_no_candle_in_its_dependency_tree() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(e2e::repo())
        .args(["tree", "--offline", "-p", "runtime", "-e", "normal,build", "--prefix", "none"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let tree = String::from_utf8(out.stdout).unwrap();
    assert!(tree.contains("ort v2.0.0-rc.15") && tree.contains("modelspec"), "{tree}");
    let candle: Vec<&str> = tree.lines().filter(|l| l.starts_with("candle")).collect();
    assert!(candle.is_empty(), "the runtime depends on {candle:?}");
}

/// Overload and limits: a request beyond --max-inflight is answered 503 with Retry-After before
/// its body is read, and the server goes on; more images than --max-images in one request is a
/// 413; an empty token is refused at start.
#[test]
fn overload_is_shed_with_503_and_per_request_limits_hold() {
    let t = trained();
    let photos = test_photos(&t.data, 3);
    let server = Server::start(
        &t.onnx,
        &["--max-inflight", "1", "--max-batch", "8", "--max-delay-ms", "3000", "--max-images", "2"],
    );
    let c = client();
    let u = format!("{}/v1/predict", server.url);
    let jpeg = std::fs::read(&photos[0].0).unwrap();
    std::thread::scope(|sc| {
        // Holds the only admission slot for about 3 s (its batch waits for more images).
        let first =
            sc.spawn(|| json(c.post(&u).header("Content-Type", "image/jpeg").body(jpeg.clone()).send().unwrap()));
        std::thread::sleep(Duration::from_millis(800));
        let r = c.post(&u).header("Content-Type", "image/jpeg").body(jpeg.clone()).send().unwrap();
        assert_eq!(r.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
        let (s, v) = json(r);
        assert_eq!((s, v["code"].as_str()), (503, Some("overloaded")), "{v}");
        // Health is never shed.
        assert_eq!(json(client().get(format!("{}/v2/health/ready", server.url)).send().unwrap()).0, 200);
        let (s, v) = first.join().unwrap();
        assert_eq!(s, 200, "{v}");
    });
    // Three images where two are allowed, as multipart parts and as a v2 tensor.
    let mut form = multipart::Form::new();
    for (i, (f, _)) in photos.iter().enumerate() {
        form = form
            .part(format!("image{i}"), multipart::Part::bytes(std::fs::read(f).unwrap()).file_name(format!("{i}.jpg")));
    }
    let (s, v) = json(c.post(&u).multipart(form).send().unwrap());
    assert_eq!((s, v["code"].as_str()), (413, Some("too_many_images")), "{v}");
    let req = r#"{"inputs": [{"name": "image", "shape": [3, 96, 96, 3], "datatype": "UINT8", "data": [0]}]}"#;
    let (s, v) = json(
        c.post(format!("{}/v2/models/footwear/infer", server.url))
            .header("Content-Type", "application/json")
            .body(req)
            .send()
            .unwrap(),
    );
    assert_eq!((s, v["code"].as_str()), (413, Some("too_many_images")), "{v}");
    let m = c.get(format!("{}/metrics", server.url)).send().unwrap().text().unwrap();
    assert!(m.contains("code=\"overloaded\"} 1"), "{m}");
    assert!(server.stop().success());

    let out = Command::new(footwear_bin()).args(["serve", "--token", "", "-m"]).arg(&t.onnx).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code() == Some(1) && err.contains("empty"), "{:?}: {err}", out.status);
}

/// Slow clients: headers that never end are cut off by --header-timeout-s, a body that stops
/// arriving gets a 408 after --body-timeout-s, and a body that trickles in steadily a 408 after
/// --request-timeout-s; the server answers a good request afterwards.
#[test]
fn slow_clients_are_timed_out() {
    use std::io::{Read, Write};
    let t = trained();
    let server = Server::start(
        &t.onnx,
        &["--header-timeout-s", "1", "--body-timeout-s", "1", "--request-timeout-s", "3", "--timeout-s", "30"],
    );
    let addr = server.url.trim_start_matches("http://").to_string();
    let connect = || {
        let s = std::net::TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    };
    let head = |n: usize| {
        format!("POST /v1/predict HTTP/1.1\r\nHost: {addr}\r\nContent-Type: image/jpeg\r\nContent-Length: {n}\r\n\r\n")
    };

    // Headers that never end: the connection is closed (hyper may answer 408 first).
    let mut s = connect();
    let started = Instant::now();
    s.write_all(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n").unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    let text = String::from_utf8_lossy(&got);
    assert!(started.elapsed() < Duration::from_secs(5), "open after {:?}", started.elapsed());
    assert!(got.is_empty() || text.starts_with("HTTP/1.1 408"), "{text}");

    // A body that stops arriving.
    let mut s = connect();
    let started = Instant::now();
    s.write_all(head(1000).as_bytes()).unwrap();
    s.write_all(&[0u8; 10]).unwrap();
    let mut status = String::new();
    BufReader::new(&s).read_line(&mut status).unwrap();
    assert!(status.starts_with("HTTP/1.1 408"), "{status}");
    assert!(started.elapsed() < Duration::from_secs(5), "answered after {:?}", started.elapsed());

    // A body that trickles in, one byte every 300 ms: under the body timeout, over the request's.
    let s = connect();
    let started = Instant::now();
    let mut w = s.try_clone().unwrap();
    w.write_all(head(100_000).as_bytes()).unwrap();
    let writer = std::thread::spawn(move || {
        for _ in 0..40 {
            std::thread::sleep(Duration::from_millis(300));
            if w.write_all(&[0]).is_err() {
                break;
            }
        }
    });
    let mut status = String::new();
    BufReader::new(&s).read_line(&mut status).unwrap();
    assert!(status.starts_with("HTTP/1.1 408"), "{status}");
    assert!(started.elapsed() < Duration::from_secs(6), "answered after {:?}", started.elapsed());
    drop(s);
    writer.join().unwrap();

    let photo = &test_photos(&t.data, 1)[0].0;
    let r = client().post(format!("{}/v1/predict", server.url)).header("Content-Type", "image/jpeg");
    assert_eq!(json(r.body(std::fs::read(photo).unwrap()).send().unwrap()).0, 200);
    let m = client().get(format!("{}/metrics", server.url)).send().unwrap().text().unwrap();
    assert!(m.contains("code=\"body_timeout\"} 1") && m.contains("code=\"request_timeout\"} 1"), "{m}");
    assert!(server.stop().success());
}

/// `footwear predict --format json` of `inputs` with `model`, under `wrapper` (a command the
/// binary runs through) when given: (exit code, stdout, stderr).
fn predict_json(model: &Path, inputs: &[PathBuf], wrapper: Option<&Path>) -> (Option<i32>, Value, String) {
    let mut cmd = match wrapper {
        Some(w) => {
            let mut c = Command::new(w);
            c.arg(footwear_bin());
            c
        }
        None => Command::new(footwear_bin()),
    };
    let out = cmd
        .args(["predict", "--format", "json", "--top-k", "3", "-m"])
        .arg(model)
        .arg("--ort-lib")
        .arg(ort_lib())
        .args(inputs)
        .output()
        .unwrap();
    let v = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.code(), v, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// int8 files run right on CPUs without VNNI: 7-bit weights (the default) give the same answers
/// through ONNX Runtime's AVX2 kernels as through its VNNI ones, and a file with 8-bit weights,
/// which those kernels would saturate, is refused there with the remedy. The CPU without VNNI is
/// this one with AVX-512 and VNNI hidden from CPUID (scripts/cpu-without-vnni), where Linux can
/// (the `cpuid_fault` flag); elsewhere only the part this CPU can show runs, saying so.
#[test]
fn int8_files_run_right_on_a_cpu_without_vnni() {
    use exporter::int8::{export_int8, Int8Options};
    let t = trained();
    let dir = t.dir.join("int8");
    std::fs::create_dir_all(&dir).unwrap();
    let options = |out: &Path| e2e::export_options(&t.dir.join("run"), out, 1, false);
    let q = Int8Options {
        calibration: exporter::calibrate::CalibrationOptions { count: 30, ..Default::default() },
        // 90 test photos through a small head-only model: int8 rounding flips a few borderline
        // ones (the full-size figures are in docs/benchmarks.md).
        min_agreement: 0.9,
        max_accuracy_drop: 0.05,
        ..Default::default()
    };
    assert_eq!(q.weight_bits, 7, "7-bit weights are the default");
    let seven = dir.join("model.int8.onnx");
    let (_, r) = export_int8(&options(&seven), &q).unwrap();
    assert!(r.unwrap().passed);
    let eight = dir.join("model.int8-8bit.onnx");
    let eight_bits = export_int8(&options(&eight), &Int8Options { weight_bits: 8, ..q.clone() });
    let m = inference::OnnxModel::load(
        &seven,
        &inference::SessionConfig { ort_lib: Some(ort_lib()), ..Default::default() },
    )
    .unwrap();
    assert_eq!(m.info.int8_weight_bits(), Some(7));
    assert_eq!(m.info.calibration.as_ref().unwrap()["weight_bits"], 7);
    drop(m);
    let photos: Vec<PathBuf> = ["boot", "sandal", "shoe"].iter().map(|c| t.data.join("test").join(c)).collect();

    let (code, here, err) = predict_json(&seven, &photos, None);
    assert_eq!(code, Some(0), "{err}");
    if inference::session::cpu_has_vnni() {
        let (e, r) = eight_bits.unwrap();
        assert!(r.unwrap().passed && e.bytes > 0);
        let (code, _, err) = predict_json(&eight, &photos, None);
        assert_eq!(code, Some(0), "8-bit weights on a CPU with VNNI: {err}");
    } else {
        // Without VNNI the exporter's own verification already loads the file: refused.
        let err = format!("{:#}", eight_bits.unwrap_err());
        assert!(err.contains("without VNNI") && err.contains("--weight-bits 7"), "{err}");
    }

    let cpuid_fault = std::fs::read_to_string("/proc/cpuinfo").unwrap().split_whitespace().any(|f| f == "cpuid_fault");
    if !cpuid_fault {
        eprintln!("no CPUID faulting on this machine (cpuid_fault): the run without VNNI is not shown here");
        return;
    }
    let avx2 = repo().join("scripts/cpu-without-vnni/run.sh");
    let (code, there, err) = predict_json(&seven, &photos, Some(&avx2));
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("as the command sees it:   avx2=1 avx512f=0 avx512bw=0 avx512_vnni=0 avx_vnni=0"), "{err}");
    let (a, b) = (here["predictions"].as_array().unwrap(), there["predictions"].as_array().unwrap());
    assert_eq!(a.len(), 90);
    assert_eq!(a.len(), b.len());
    let mut worst = 0f64;
    for (x, y) in a.iter().zip(b) {
        assert_eq!((&x["file"], &x["label"]), (&y["file"], &y["label"]), "another class without VNNI");
        for (p, q) in x["top_k"].as_array().unwrap().iter().zip(y["top_k"].as_array().unwrap()) {
            worst = worst.max((p["probability"].as_f64().unwrap() - q["probability"].as_f64().unwrap()).abs());
        }
    }
    println!("int8, 7-bit weights: AVX2 kernels vs this CPU's: largest probability difference {worst:.2e}");
    assert!(worst < 1e-3, "{worst}");

    // 8-bit weights where ONNX Runtime would saturate: refused, naming the remedy.
    if eight.exists() {
        let (code, _, err) = predict_json(&eight, &photos, Some(&avx2));
        assert_eq!(code, Some(1), "{err}");
        assert!(err.contains("without VNNI") && err.contains("--weight-bits 7"), "{err}");
    }
}
