//! Hostile requests and good ones at the same time, at the server's default limits: 8 hostile
//! requests of every kind seen (a 40,000,000 x 1 PNG, an oversized ICC profile, an ICC profile
//! that inflates to 768 MiB, a legal 36-Mpixel PNG, a truncated JPEG, a body that stops, 100
//! multipart parts, JSON nested 100,000 deep) alongside 16 good photos. The server must stay up,
//! answer every good photo 200 and every hostile request with its JSON error, and keep its peak
//! resident memory (VmHWM) under 1.5 GB and under the bound its settings give
//! (docs/reliability.md).

use e2e::{client, json, test_photos, trained, Server};
use std::io::{BufRead, BufReader, Write};
use std::time::Duration;
use testkit::png::{black as png, chunk, zlib};

/// A `/proc/PID/status` figure (VmHWM, VmRSS), MiB.
fn proc_mib(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(key)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() / 1024
}

/// docs/reliability.md's bound for the server's default settings and a `size` px model, over
/// its resident memory once loaded.
fn bound_mib(size: usize) -> u64 {
    runtime::server::ServeConfig::default().memory_bound_bytes(size) >> 20
}

#[test]
fn eight_hostile_requests_and_sixteen_good_photos_at_once() {
    let t = trained();
    let server = Server::start(&t.onnx, &[]);
    let loaded_mib = proc_mib(server.child.id(), "VmRSS:");
    let url = format!("{}/v1/predict", server.url);
    let photos = test_photos(&t.data, 6);
    let good: Vec<Vec<u8>> = photos.iter().take(16).map(|(f, _)| std::fs::read(f).unwrap()).collect();
    assert_eq!(good.len(), 16);

    let iccp_big = chunk(b"iCCP", &[&b"big\0\0"[..], &vec![7u8; 3 << 19]].concat());
    let iccp_bomb = chunk(b"iCCP", &[&b"bomb\0\0"[..], &zlib(768 << 20, 0, 9)].concat());
    assert!(iccp_bomb.len() < 1 << 20, "the bomb must pass the stored-size check: {} bytes", iccp_bomb.len());
    let jpeg = &good[0];
    let hostile: Vec<(&str, Vec<u8>, &str, u16, &str)> = vec![
        ("40,000,000 x 1 PNG", png(40_000_000, 1, &[]), "image/png", 413, "image_too_large"),
        ("1.5 MiB ICC profile", png(8, 8, &iccp_big), "image/png", 413, "image_too_large"),
        ("ICC profile inflating to 768 MiB", png(8, 8, &iccp_bomb), "image/png", 200, ""),
        ("legal 36 Mpixel PNG", png(6000, 6000, &[]), "image/png", 200, ""),
        ("truncated JPEG", jpeg[..jpeg.len() / 2].to_vec(), "image/jpeg", 422, "invalid_image"),
    ];
    let multipart_100 = {
        let mut body = Vec::new();
        for i in 0..100 {
            write!(body, "--b\r\nContent-Disposition: form-data; name=\"p{i}\"; filename=\"{i}.jpg\"\r\n\r\nx\r\n")
                .unwrap();
        }
        body.extend_from_slice(b"--b--\r\n");
        body
    };
    let deep_json = format!("{{\"inputs\": {}{}}}", "[".repeat(100_000), "]".repeat(100_000));
    let c = client();
    std::thread::scope(|sc| {
        let mut handles = Vec::new();
        for (what, body, ctype, want, code) in &hostile {
            let (c, url) = (c.clone(), url.clone());
            handles.push(sc.spawn(move || {
                let (s, v) = json(c.post(&url).header("Content-Type", *ctype).body(body.clone()).send().unwrap());
                assert_eq!(s, *want, "{what}: {v}");
                if !code.is_empty() {
                    assert_eq!(v["code"], *code, "{what}: {v}");
                }
                println!("{what}: {s} {}", v["error"].as_str().or(v["label"].as_str()).unwrap_or(""));
            }));
        }
        let (c2, url2) = (c.clone(), url.clone());
        handles.push(sc.spawn(move || {
            let r = c2.post(&url2).header("Content-Type", "multipart/form-data; boundary=b").body(multipart_100);
            let (s, v) = json(r.send().unwrap());
            assert_eq!((s, v["code"].as_str()), (413, Some("too_many_images")), "{v}");
        }));
        let (c3, infer) = (c.clone(), format!("{}/v2/models/footwear/infer", server.url));
        handles.push(sc.spawn(move || {
            let r = c3.post(&infer).header("Content-Type", "application/json").body(deep_json);
            let (s, v) = json(r.send().unwrap());
            assert_eq!((s, v["code"].as_str()), (400, Some("malformed_json")), "{v}");
        }));
        // A body that stops half way: answered 408 after the body timeout (10 s by default).
        let addr = server.url.trim_start_matches("http://").to_string();
        handles.push(sc.spawn(move || {
            let mut s = std::net::TcpStream::connect(&addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            write!(s, "POST /v1/predict HTTP/1.1\r\nHost: {addr}\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n")
                .unwrap();
            s.write_all(&[0u8; 50_000]).unwrap();
            let mut status = String::new();
            BufReader::new(&s).read_line(&mut status).unwrap();
            assert!(status.starts_with("HTTP/1.1 408"), "{status}");
        }));
        for (i, body) in good.iter().enumerate() {
            let (c, url) = (c.clone(), url.clone());
            handles.push(sc.spawn(move || {
                let (s, v) = json(c.post(&url).header("Content-Type", "image/jpeg").body(body.clone()).send().unwrap());
                assert_eq!(s, 200, "good photo {i}: {v}");
            }));
        }
        for h in handles {
            h.join().unwrap();
        }
    });
    assert_eq!(json(client().get(format!("{}/v2/health/ready", server.url)).send().unwrap()).0, 200);
    let peak_mib = proc_mib(server.child.id(), "VmHWM:");
    let bound = loaded_mib + bound_mib(96);
    println!("server resident memory: {loaded_mib} MiB loaded, peak (VmHWM) {peak_mib} MiB; bound {bound} MiB");
    assert!(peak_mib <= 1536, "peak resident memory {peak_mib} MiB");
    assert!(peak_mib <= bound, "peak resident memory {peak_mib} MiB over the settings' bound {bound} MiB");
    assert!(server.stop().success());
}
