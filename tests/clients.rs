//! The server seen by the clients and habits of model-server users: NVIDIA's tritonclient over
//! HTTP (binary and JSON tensors) and gRPC, zero-downtime reload under load, TLS and CORS through
//! curl, base64 JSON, and the OpenAPI description checked by openapi-spec-validator.

use e2e::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The Python of the clients' venv (scripts/setup-python-clients.sh).
fn clients_python() -> PathBuf {
    let py = repo().join(".local/clients-venv/bin/python");
    assert!(py.exists(), "{} is missing: run scripts/setup-python-clients.sh (scripts/test.sh does)", py.display());
    py
}

fn model_name(onnx: &Path) -> String {
    let out =
        Command::new(footwear_bin()).args(["info", "--ort-lib"]).arg(ort_lib()).arg("-m").arg(onnx).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["name"].as_str().unwrap().to_string()
}

/// Photos decoded and resized as the server does it, uint8 [N, size, size, 3].
fn pixels(onnx: &Path, photos: &[PathBuf]) -> (Vec<u8>, usize) {
    let cfg = inference::SessionConfig { threads: 1, ort_lib: Some(ort_lib()), ..Default::default() };
    let model = inference::OnnxModel::load(onnx, &cfg).unwrap();
    let size = model.input_size();
    let sources: Vec<modelspec::preprocess::Source> =
        photos.iter().map(|p| modelspec::preprocess::Source::File(p.as_path())).collect();
    let d = modelspec::preprocess::decode_batch(
        &sources,
        size as u32,
        &model.info.description.preprocessing,
        &Default::default(),
    );
    assert!(d.failed.is_empty());
    (d.pixels, size)
}

/// The best class of a photo by /v1/predict (its top class: the label, unless the photo is
/// out of distribution), its probabilities by class name, and its `ood_score`.
fn predict_label(url: &str, photo: &Path) -> (String, Vec<f64>, Option<f64>) {
    let r = client().post(format!("{url}/v1/predict?top_k=3")).body(std::fs::read(photo).unwrap()).send().unwrap();
    let (status, v) = json(r);
    assert_eq!(status, 200, "{v}");
    let mut top: Vec<(String, f64)> = v["top_k"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["label"].as_str().unwrap().into(), t["probability"].as_f64().unwrap()))
        .collect();
    top.sort_by(|a, b| a.0.cmp(&b.0));
    let best = v["top_k"][0]["label"].as_str().unwrap().to_string();
    if v["reason"] != json!("out_of_distribution") {
        assert_eq!(v["label"].as_str(), Some(best.as_str()), "{v}");
    }
    (best, top.into_iter().map(|t| t.1).collect(), v["ood_score"].as_f64())
}

fn rows(v: &Value) -> Vec<Vec<f64>> {
    v.as_array().unwrap().iter().map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()).collect()
}

fn argmax(r: &[f64]) -> usize {
    (0..r.len()).max_by(|&a, &b| r[a].total_cmp(&r[b])).unwrap()
}

#[test]
fn triton_clients_over_http_binary_json_and_grpc_label_real_photos() {
    let t = trained();
    let server = Server::start(&t.onnx, &[]);
    let grpc = server.grpc.clone().expect("a gRPC endpoint");
    let photos: Vec<(PathBuf, String)> = test_photos(&t.data, 2);
    let files: Vec<PathBuf> = photos.iter().map(|p| p.0.clone()).collect();
    let (px, size) = pixels(&t.onnx, &files);
    let dir = testkit::tmp("clients", "triton");
    let (input, out) = (dir.join("images.u8"), dir.join("seen.json"));
    std::fs::write(&input, &px).unwrap();
    let name = model_name(&t.onnx);
    let run = Command::new(clients_python())
        .arg(repo().join("tests/clients/triton_clients.py"))
        .args(["--http", server.url.trim_start_matches("http://"), "--grpc", &grpc, "--model", &name])
        .arg("--pixels")
        .arg(&input)
        .args(["--n", &files.len().to_string(), "--size", &size.to_string(), "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}\n{}", String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    let seen: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    for k in ["http_live", "http_ready", "http_model_ready", "grpc_live", "grpc_ready", "grpc_model_ready"] {
        assert_eq!(seen[k], json!(true), "{k}");
    }
    for k in ["http_server_metadata", "grpc_server_metadata"] {
        let ext = seen[k]["extensions"].as_array().unwrap();
        for e in ["binary_tensor_data", "statistics", "model_repository", "model_configuration"] {
            assert!(ext.contains(&json!(e)), "{k}: {ext:?}");
        }
    }
    assert_eq!(seen["http_model_metadata"]["inputs"][0]["shape"], json!([-1, size, size, 3]));
    assert_eq!(seen["grpc_model_metadata"]["inputs"][0]["datatype"], json!("UINT8"));
    assert_eq!(seen["http_model_config"]["max_batch_size"], json!(16));
    assert_eq!(seen["http_model_config"]["input"][0]["dims"], json!([size, size, 3]));
    assert_eq!(seen["http_index"][0]["state"], json!("READY"));
    assert_eq!(seen["grpc_index"]["models"][0]["state"], json!("READY"));
    assert_eq!(seen["http_binary_response"]["id"], json!("r-True"));
    assert_eq!(seen["grpc_response"]["id"], json!("g-1"));
    assert_eq!(seen["grpc_response"]["model_version"], json!("7"));

    // The same probabilities whichever way they travel, and the labels /v1/predict gives.
    let reference = rows(&seen["http_json"]);
    for k in ["http_binary", "http_default_probabilities", "grpc", "grpc_typed"] {
        let got = rows(&seen[k]);
        assert_eq!(got.len(), files.len(), "{k}");
        for (g, r) in got.iter().zip(&reference) {
            for (a, b) in g.iter().zip(r) {
                assert!((a - b).abs() < 1e-6, "{k}: {g:?} vs {r:?}");
            }
        }
    }
    let logits = rows(&seen["grpc_default_logits"]);
    // The out-of-distribution output: listed by both protocols, one score per image, the same
    // through tritonclient's HTTP and gRPC as through /v1/predict.
    for k in ["http_model_metadata", "grpc_model_metadata"] {
        let names: Vec<&str> =
            seen[k]["outputs"].as_array().unwrap().iter().map(|o| o["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["logits", "probabilities", "ood_score"], "{k}");
    }
    let scores: Vec<Vec<f64>> = ["http_default_ood_score", "grpc_default_ood_score"]
        .iter()
        .map(|k| {
            seen[*k].as_array().unwrap_or_else(|| panic!("{k}: none")).iter().map(|x| x.as_f64().unwrap()).collect()
        })
        .collect();
    assert_eq!(scores[0].len(), files.len());
    assert_eq!(scores[0], scores[1]);
    let mut right = 0;
    for (i, (photo, class)) in photos.iter().enumerate() {
        let (label, probs, ood) = predict_label(&server.url, photo);
        let ood = ood.expect("an ood_score");
        assert!((ood - scores[0][i]).abs() <= 1e-5 * ood.abs().max(1.0), "{ood} vs {}", scores[0][i]);
        let classes = ["boot", "sandal", "shoe"];
        assert_eq!(classes[argmax(&reference[i])], label, "{}", photo.display());
        assert_eq!(argmax(&logits[i]), argmax(&reference[i]));
        for (a, b) in probs.iter().zip(&reference[i]) {
            assert!((a - b).abs() < 1e-5, "{probs:?} vs {:?}", reference[i]);
        }
        right += (label == *class) as usize;
    }
    assert!(right >= photos.len() - 1, "{right} of {} photos labelled right", photos.len());

    // Bad input: a clear error through each client.
    for k in ["http_bad_shape_error", "grpc_bad_shape_error"] {
        let e = seen[k].as_str().unwrap_or_else(|| panic!("{k}: no error"));
        assert!(e.contains("input shape [1, 7, 7, 3]") && e.contains(&format!("[N, {size}, {size}, 3]")), "{k}: {e}");
    }
    // Statistics: every inference above, counted per image and per batch.
    let st = &seen["grpc_stats"]["model_stats"][0];
    let n = files.len() as u64;
    // HTTP: 3 good requests of n images, 1 failed before inference; gRPC: 3 good ones (raw
    // twice, typed once).
    let count = |v: &Value| v.as_str().map(|s| s.parse::<u64>().unwrap()).or(v.as_u64()).unwrap_or(0);
    assert_eq!(count(&st["inference_count"]), 6 * n, "{st}");
    assert_eq!(count(&st["inference_stats"]["success"]["count"]), 6, "{st}");
    assert!(count(&st["execution_count"]) >= 6, "{st}");
    assert!(count(&st["inference_stats"]["compute_infer"]["ns"]) > 0, "{st}");
    let hs = &seen["http_stats"]["model_stats"][0];
    assert_eq!(hs["inference_count"], json!(3 * n), "{hs}");
    assert_eq!(hs["version"], json!("7"));
}

/// Several clients post real photos without pause while the model file is swapped (load
/// endpoint), replaced by a corrupt file (refused, the old one keeps serving), and swapped back
/// (SIGHUP): no request fails, and the version in the answers follows the swaps.
#[test]
fn reload_under_load_swaps_versions_without_a_failed_request_and_a_corrupt_file_keeps_the_old_model() {
    let t = trained();
    let dir = testkit::tmp("clients", "reload");
    let served = dir.join("served.onnx");
    let v8 = dir.join("v8.onnx");
    std::fs::copy(&t.onnx, &served).unwrap();
    export(&t.dir.join("run"), &v8, 8, false);
    let server = Server::start(&served, &["--max-inflight", "64", "--max-queue", "64"]);
    let name = model_name(&t.onnx);
    let photos: Vec<PathBuf> = test_photos(&t.data, 2).into_iter().map(|p| p.0).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let t0_all = Instant::now();
    // (when the request started, status, version answered)
    let seen = Arc::new(Mutex::new(Vec::<(Instant, u16, String)>::new()));
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let (stop, seen, url, photos) = (stop.clone(), seen.clone(), server.url.clone(), photos.clone());
            std::thread::spawn(move || {
                let http = client();
                let mut i = c;
                while !stop.load(Ordering::SeqCst) {
                    let body = std::fs::read(&photos[i % photos.len()]).unwrap();
                    i += 1;
                    let started = Instant::now();
                    let r = http.post(format!("{url}/v1/predict")).body(body).send();
                    let entry = match r {
                        Ok(r) => {
                            let (status, v) = json(r);
                            (status, v["model"]["version"].as_str().unwrap_or("?").to_string())
                        }
                        Err(e) => (0, e.to_string()),
                    };
                    seen.lock().unwrap().push((started, entry.0, entry.1));
                }
            })
        })
        .collect();
    let wait_for = |n: usize| {
        let t0 = Instant::now();
        while seen.lock().unwrap().len() < n {
            assert!(t0.elapsed() < Duration::from_secs(60), "the clients got no answers");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let load = |expect: u16| {
        let r = client().post(format!("{}/v2/repository/models/{name}/load", server.url)).body("{}").send().unwrap();
        let (status, v) = json(r);
        assert_eq!(status, expect, "{v}");
        v
    };
    let answered = |n: usize| seen.lock().unwrap().len() + n;
    wait_for(answered(8));
    // Swap to version 8: the operator replaces the file (rename), then asks for a load.
    let tmp = dir.join("incoming.onnx");
    std::fs::copy(&v8, &tmp).unwrap();
    std::fs::rename(&tmp, &served).unwrap();
    let before_swap = Instant::now();
    let v = load(200);
    let swapped = Instant::now();
    assert_eq!(v["version"], json!("8"), "{v}");
    wait_for(answered(8));
    // A corrupt file (truncated): refused, the answer says why, version 8 keeps serving.
    let bytes = std::fs::read(&v8).unwrap();
    std::fs::write(&tmp, &bytes[..bytes.len() / 3]).unwrap();
    std::fs::rename(&tmp, &served).unwrap();
    let v = load(400);
    let e = v["error"].as_str().unwrap();
    assert!(e.contains("version 8 keeps serving") && e.contains("served.onnx"), "{e}");
    assert_eq!(v["code"], json!("reload_failed"));
    let ready = client().get(format!("{}/v2/health/ready", server.url)).send().unwrap();
    assert_eq!(json(ready), (200, json!({"ready": true, "live_sessions": 1, "model_version": "8"})));
    wait_for(answered(8));
    // Back to version 7 with SIGHUP.
    std::fs::copy(&t.onnx, &tmp).unwrap();
    std::fs::rename(&tmp, &served).unwrap();
    let before_hup = Instant::now();
    Command::new("kill").args(["-HUP", &server.child.id().to_string()]).status().unwrap();
    let t0 = Instant::now();
    loop {
        let r = client().get(format!("{}/v2/models/{name}", server.url)).send().unwrap();
        if json(r).1["versions"] == json!(["7"]) {
            break;
        }
        // (a request started now could still meet version 8)
        assert!(t0.elapsed() < Duration::from_secs(60), "SIGHUP did not reload");
        std::thread::sleep(Duration::from_millis(50));
    }
    let back = Instant::now();
    wait_for(answered(8));
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().unwrap();
    }
    let seen = seen.lock().unwrap();
    let failed: Vec<_> = seen.iter().filter(|(_, s, _)| *s != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        seen.len(),
        &failed[..failed.len().min(5)]
    );
    // Each request answered by the model serving when it started: 7 before the load call, 8
    // from its answer to the SIGHUP (the corrupt file changed nothing), 7 once 7 was seen again.
    let during = |from: Instant, to: Instant| -> Vec<&str> {
        seen.iter().filter(|(t, _, _)| *t >= from && *t < to).map(|(_, _, v)| v.as_str()).collect()
    };
    let far = Instant::now() + Duration::from_secs(3600);
    let (v7, v8, v7_again) = (during(t0_all, before_swap), during(swapped, before_hup), during(back, far));
    assert!(!v7.is_empty() && v7.iter().all(|v| *v == "7"), "{v7:?}");
    assert!(v8.len() >= 16 && v8.iter().all(|v| *v == "8"), "{v8:?}");
    assert!(!v7_again.is_empty() && v7_again.iter().all(|v| *v == "7"), "{v7_again:?}");
    println!("{} requests, 0 failed; versions 7 -> 8 -> 7", seen.len());
    let metrics = client().get(format!("{}/metrics", server.url)).send().unwrap().text().unwrap();
    assert!(metrics.contains("footwear_model_reloads_total{result=\"ok\"} 2"), "{metrics}");
    assert!(metrics.contains("footwear_model_reloads_total{result=\"refused\"} 1"), "{metrics}");
}

/// The token of the TLS test's server.
const TOKEN: &str = "s3cret-token";

fn curl(args: &[&str]) -> (String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "30", "-H", &format!("Authorization: Bearer {TOKEN}")])
        .args(args)
        .output()
        .expect("curl");
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn tls_cors_and_base64_json_seen_by_curl() {
    let t = trained();
    let dir = testkit::tmp("clients", "tls");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let ok = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
        .args(["-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl");
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let (cert_s, key_s) = (cert.display().to_string(), key.display().to_string());
    let server = Server::start(
        &t.onnx,
        &["--tls-cert", &cert_s, "--tls-key", &key_s, "--cors-origin", "https://shop.example", "--token", TOKEN],
    );
    assert!(server.url.starts_with("https://"), "{}", server.url);
    let (photo, class) = test_photos(&t.data, 1)[0].clone();
    let photo_s = photo.display().to_string();
    let url = format!("{}/v1/predict", server.url);
    // HTTPS with the certificate trusted.
    let (body, err) =
        curl(&["--cacert", &cert_s, "--data-binary", &format!("@{photo_s}"), "-H", "Content-Type: image/jpeg", &url]);
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body} {err}"));
    assert_eq!(v["top_k"][0]["label"].as_str().unwrap(), class, "{v}");
    // Not trusted: curl refuses; plain HTTP on the TLS port gets no answer.
    let (_, err) = curl(&["--data-binary", &format!("@{photo_s}"), &url]);
    assert!(err.contains("certificate"), "{err}");
    let plain = format!("http://{}/v2", server.url.trim_start_matches("https://"));
    let (body, _) = curl(&[&plain]);
    assert!(!body.contains("footwear-runtime"), "plain HTTP answered on the TLS port: {body}");
    // base64 JSON, one image and a named list.
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(std::fs::read(&photo).unwrap());
    let one = dir.join("one.json");
    std::fs::write(&one, json!({"image": format!("data:image/jpeg;base64,{b64}")}).to_string()).unwrap();
    let (body, _) = curl(&[
        "--cacert",
        &cert_s,
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        &format!("@{}", one.display()),
        &url,
    ]);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["top_k"][0]["label"].as_str().unwrap(), class, "{v}");
    let two = dir.join("two.json");
    std::fs::write(&two, json!({"images": [{"name": "a.jpg", "b64": b64}, b64]}).to_string()).unwrap();
    let (body, _) = curl(&[
        "--cacert",
        &cert_s,
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        &format!("@{}", two.display()),
        &url,
    ]);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["predictions"][0]["file"], json!("a.jpg"), "{v}");
    assert_eq!(v["predictions"][1]["file"], json!("images[1]"), "{v}");
    let bad = dir.join("bad.json");
    std::fs::write(&bad, json!({"images": ["aGVsbG8=", "not base64!"]}).to_string()).unwrap();
    let (body, _) = curl(&[
        "--cacert",
        &cert_s,
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        &format!("@{}", bad.display()),
        &url,
    ]);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["code"], json!("bad_base64"), "{v}");
    assert!(v["error"].as_str().unwrap().starts_with("images[1]: not base64"), "{v}");
    // CORS: a browser's preflight from the allowed origin, and a request from another origin.
    let (headers, _) = curl(&[
        "--cacert",
        &cert_s,
        "-i",
        "-X",
        "OPTIONS",
        "-H",
        "Origin: https://shop.example",
        "-H",
        "Access-Control-Request-Method: POST",
        "-H",
        "Access-Control-Request-Headers: content-type",
        &url,
    ]);
    let lower = headers.to_ascii_lowercase();
    assert!(lower.starts_with("http/1.1 200"), "{headers}");
    assert!(lower.contains("access-control-allow-origin: https://shop.example"), "{headers}");
    assert!(lower.contains("access-control-allow-methods:") && lower.contains("post"), "{headers}");
    let (headers, _) =
        curl(&["--cacert", &cert_s, "-i", "-H", "Origin: https://evil.example", &format!("{}/v2", server.url)]);
    assert!(!headers.to_ascii_lowercase().contains("access-control-allow-origin"), "{headers}");
    let (headers, _) =
        curl(&["--cacert", &cert_s, "-i", "-H", "Origin: https://shop.example", &format!("{}/v2", server.url)]);
    assert!(headers.to_ascii_lowercase().contains("access-control-allow-origin: https://shop.example"), "{headers}");
    // gRPC over TLS too, with the token in the metadata (tritonclient).
    let grpc = server.grpc.clone().expect("a gRPC endpoint");
    let script = format!(
        r#"
import tritonclient.grpc as g
from tritonclient.utils import InferenceServerException
c = g.InferenceServerClient("{grpc}", ssl=True, root_certificates="{cert_s}")
print("live", c.is_server_live())
try:
    c.get_model_metadata("{name}")
    print("no token: answered")
except InferenceServerException as e:
    print("no token:", e)
m = c.get_model_metadata("{name}", headers={{"authorization": "Bearer {TOKEN}"}}, as_json=True)
print("metadata", m["name"], m["versions"])
"#,
        name = model_name(&t.onnx)
    );
    let out = Command::new(clients_python()).args(["-c", &script]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("live True"), "{text}");
    assert!(text.contains("no token:") && text.contains("UNAUTHENTICATED"), "{text}");
    assert!(text.contains("metadata footwear ['7']"), "{text}");
}

#[test]
fn openapi_description_is_valid_and_lists_every_route() {
    let t = trained();
    let server = Server::start(&t.onnx, &["--no-grpc"]);
    let r = client().get(format!("{}/openapi.json", server.url)).send().unwrap();
    let (status, doc) = json(r);
    assert_eq!(status, 200);
    let dir = testkit::tmp("clients", "openapi");
    let file = dir.join("openapi.json");
    std::fs::write(&file, doc.to_string()).unwrap();
    let out = Command::new(clients_python()).args(["-m", "openapi_spec_validator"]).arg(&file).output().unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // Every path it lists is served (no `not_found`), and the routes it does not list are not.
    let name = model_name(&t.onnx);
    let paths = doc["paths"].as_object().unwrap();
    for (path, ops) in paths {
        let url = format!("{}{}", server.url, path.replace("{name}", &name).replace("{version}", "7"));
        for method in ops.as_object().unwrap().keys() {
            let r = match method.as_str() {
                "get" => client().get(&url).send().unwrap(),
                "post" => client().post(&url).header("Content-Type", "application/json").body("{}").send().unwrap(),
                m => panic!("{path}: method {m}"),
            };
            let status = r.status().as_u16();
            let text = r.text().unwrap();
            assert!(!text.contains("\"not_found\""), "{method} {path}: {status} {text}");
        }
    }
    for extra in ["/v2/models/{name}/versions/{version}/infer", "/v2/repository/models/{name}/load"] {
        assert!(paths.contains_key(extra), "{extra}");
    }
}
