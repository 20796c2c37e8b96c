//! Structure-aware fuzzing of the weight readers, on stable Rust inside `cargo test` (proptest):
//! safetensors files with forged headers (any length field, dtypes, shapes, offsets) through
//! `weights::read_checked`, and `.keras` zips (members of any name and size, deflate bombs,
//! HDF5-looking payloads, cut anywhere) through `keras_import::import`.
//!
//! The global allocator of this test binary refuses any single allocation over
//! [`MAX_ALLOCATION`]: a reader that tried to allocate more aborts the binary (the test fails)
//! instead of taking the machine. The files are small and the import's member limit is set to
//! [`MEMBER_LIMIT`], so anything near the bound is a bug.

use candle_core::Device;
use models::keras_import::{import, ImportOptions};
use models::layers::{TensorSpec, Transform};
use models::weights::read_checked;
use proptest::prelude::*;
use std::io::Write;
use testkit::alloc::assert_nothing_refused;

/// The largest member a fuzzed `.keras` import may inflate.
const MEMBER_LIMIT: u64 = 4 << 20;
const MAX_ALLOCATION: usize = 32 << 20;

#[global_allocator]
static GLOBAL: testkit::alloc::Bounded = testkit::alloc::Bounded(MAX_ALLOCATION);

/// A file in this test's scratch folder, named by the case so that parallel cases do not clash.
fn scratch(name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("models-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let id = std::thread::current().id();
    let p = dir.join(format!("{id:?}-{name}").replace(['(', ')'], ""));
    std::fs::write(&p, bytes).unwrap();
    p
}

/// What `read_checked` is asked for.
fn expected() -> Vec<TensorSpec> {
    let spec = |name: &str, shape: Vec<usize>| TensorSpec {
        name: name.into(),
        shape,
        keras_var: 0,
        transform: Transform::Reshape,
    };
    vec![spec("a.kernel", vec![3, 4]), spec("b.bias", vec![5])]
}

/// One tensor entry of a forged safetensors header.
#[derive(Debug, Clone)]
struct Entry {
    name: String,
    dtype: String,
    shape: Vec<u64>,
    offsets: (u64, u64),
}

fn entry() -> impl Strategy<Value = Entry> {
    (
        prop::sample::select(vec!["a.kernel", "b.bias", "c", "__metadata__"]),
        prop::sample::select(vec!["F32", "F16", "I64", "U8", "BOOL", "F99"]),
        prop::collection::vec(prop_oneof![0u64..8, any::<u64>(), Just(1u64 << 40)], 0..4),
        (prop_oneof![0u64..128, any::<u64>()], prop_oneof![0u64..128, any::<u64>()]),
    )
        .prop_map(|(name, dtype, shape, offsets)| Entry { name: name.into(), dtype: dtype.into(), shape, offsets })
}

/// A safetensors file: an 8-byte header length (true or forged), a JSON header of entries (or
/// garbage), and a payload.
fn safetensors() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::collection::vec(entry(), 0..4),
        prop::option::of(prop_oneof![any::<u64>(), Just(u64::MAX), 0u64..64]),
        prop::collection::vec(any::<u8>(), 0..256),
        any::<bool>(),
    )
        .prop_map(|(entries, forged_len, payload, garbage)| {
            let header = if garbage {
                String::from_utf8_lossy(&payload).into_owned()
            } else {
                let items: Vec<String> = entries
                    .iter()
                    .map(|e| {
                        format!(
                            r#""{}": {{"dtype": "{}", "shape": {:?}, "data_offsets": [{}, {}]}}"#,
                            e.name, e.dtype, e.shape, e.offsets.0, e.offsets.1
                        )
                    })
                    .collect();
                format!("{{{}}}", items.join(", "))
            };
            let len = forged_len.unwrap_or(header.len() as u64);
            [&len.to_le_bytes()[..], header.as_bytes(), &payload].concat()
        })
}

/// One member of a forged `.keras` zip: a name, and contents (raw, HDF5-looking, or `n` zeros
/// that deflate to almost nothing).
#[derive(Debug, Clone)]
enum Member {
    Raw(&'static str, Vec<u8>),
    Hdf5(Vec<u8>),
    Zeros(&'static str, usize),
}

fn member() -> impl Strategy<Value = Member> {
    let names = prop::sample::select(vec!["model.weights.h5", "config.json", "metadata.json", "other"]);
    prop_oneof![
        (names.clone(), prop::collection::vec(any::<u8>(), 0..512)).prop_map(|(n, d)| Member::Raw(n, d)),
        prop::collection::vec(any::<u8>(), 0..2048).prop_map(Member::Hdf5),
        (names, 0usize..(64 << 20)).prop_map(|(n, k)| Member::Zeros(n, k)),
    ]
}

fn keras_zip() -> impl Strategy<Value = Vec<u8>> {
    (prop::collection::vec(member(), 0..4), any::<u16>()).prop_map(|(members, cut)| {
        let mut out = std::io::Cursor::new(Vec::new());
        {
            let mut z = zip::ZipWriter::new(&mut out);
            let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
            for (i, m) in members.iter().enumerate() {
                let name = match m {
                    Member::Raw(n, _) | Member::Zeros(n, _) => n.to_string(),
                    Member::Hdf5(_) => "model.weights.h5".into(),
                };
                // A name may repeat; the writer refuses duplicates, so they get a suffix.
                if z.start_file(name.clone(), opts).is_err() {
                    z.start_file(format!("{name}.{i}"), opts).unwrap();
                }
                match m {
                    Member::Raw(_, d) => z.write_all(d).unwrap(),
                    Member::Hdf5(d) => {
                        z.write_all(b"\x89HDF\r\n\x1a\n").unwrap();
                        z.write_all(d).unwrap();
                    }
                    Member::Zeros(_, k) => {
                        let block = vec![0u8; 1 << 20];
                        let mut left = *k;
                        while left > 0 {
                            let c = left.min(block.len());
                            z.write_all(&block[..c]).unwrap();
                            left -= c;
                        }
                    }
                }
            }
            z.finish().unwrap();
        }
        let mut bytes = out.into_inner();
        if cut % 3 == 0 && !bytes.is_empty() {
            let n = bytes.len();
            bytes.truncate(n - (cut as usize) % n);
        }
        bytes
    })
}

proptest! {
    #[test]
    fn safetensors_files(bytes in safetensors()) {
        let path = scratch("model.safetensors", &bytes);
        if let Ok(t) = read_checked(&path, &expected(), &Device::Cpu) {
            prop_assert_eq!(t.len(), 2);
        }
        assert_nothing_refused();
    }

    #[test]
    fn keras_files(bytes in keras_zip()) {
        let path = scratch("model.keras", &bytes);
        let opts = ImportOptions {
            name: "fuzz".into(),
            input_size: 150,
            classes: None,
            base_only: true,
            max_member_bytes: MEMBER_LIMIT,
        };
        // No forged file is a real Xception: every one is an error (never a panic or a bomb).
        prop_assert!(import(&path, &opts).is_err());
        assert_nothing_refused();
    }
}
