//! ONNX Runtime throughput of model files, side by side in one sitting: every (batch, threads)
//! configuration runs each file in turn, for several rounds, and the median of the rounds is
//! reported (img/s), with the ratio of each file to the first.
//!
//!   cargo run --release -p inference --example throughput -- \
//!       runs/footwear/model.onnx runs/footwear/model.int8.onnx --batch 1,32 --threads 1,2
//!
//! Inputs are fixed pseudo-random pixels (speed does not depend on them).

use inference::{OnnxModel, SessionConfig};
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn list(args: &[String], flag: &str, default: &[usize]) -> Vec<usize> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.split(',').map(|x| x.parse().expect("a number")).collect())
        .unwrap_or_else(|| default.to_vec())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut files = Vec::new();
    let mut i = 0;
    while i < args.len() {
        if args[i].starts_with("--") {
            i += 2;
        } else {
            files.push(PathBuf::from(&args[i]));
            i += 1;
        }
    }
    assert!(!files.is_empty(), "usage: throughput FILE... [--batch 1,32] [--threads 1,2] [--rounds 3] [--seconds 4]");
    let batches = list(&args, "--batch", &[1, 32]);
    let threads = list(&args, "--threads", &[1, 2]);
    let rounds = list(&args, "--rounds", &[3])[0];
    let seconds = list(&args, "--seconds", &[4])[0] as u64;
    println!("| batch | threads | {} |", files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(" | "));
    println!("|---|---|{}", "---|".repeat(files.len()));
    for &t in &threads {
        let cfg = SessionConfig { threads: t, ..Default::default() };
        let mut models: Vec<OnnxModel> = files.iter().map(|f| OnnxModel::load(f, &cfg).expect("loads")).collect();
        for &b in &batches {
            let mut rates: Vec<Vec<f64>> = vec![Vec::new(); files.len()];
            for _ in 0..rounds {
                for (m, r) in models.iter_mut().zip(rates.iter_mut()) {
                    let s = m.input_size();
                    let mut state = 0x2545_f491_4f6c_dd1du64;
                    let pixels: Vec<u8> = (0..b * s * s * 3)
                        .map(|_| {
                            state ^= state << 13;
                            state ^= state >> 7;
                            state ^= state << 17;
                            (state >> 56) as u8
                        })
                        .collect();
                    m.run(pixels.clone(), b).expect("warm-up run");
                    let (start, mut n) = (Instant::now(), 0usize);
                    while start.elapsed() < Duration::from_secs(seconds) {
                        m.run(pixels.clone(), b).expect("runs");
                        n += b;
                    }
                    r.push(n as f64 / start.elapsed().as_secs_f64());
                }
            }
            let medians: Vec<f64> = rates
                .iter_mut()
                .map(|r| {
                    r.sort_by(f64::total_cmp);
                    r[r.len() / 2]
                })
                .collect();
            let cells: Vec<String> = medians
                .iter()
                .map(|m| if files.len() > 1 { format!("{m:.1} ({:.2}x)", m / medians[0]) } else { format!("{m:.1}") })
                .collect();
            println!("| {b} | {t} | {} |", cells.join(" | "));
        }
    }
}
