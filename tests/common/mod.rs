//! Helpers the tests share: where the fixtures are, how to load them the way
//! `caption --model DIR` does, and how to run the binary in a clean
//! environment.
#![allow(dead_code)] // each test binary uses its own subset

mod command;
pub mod demo_outputs;

#[allow(unused_imports)] // as above
pub use command::{caption_command, CLEARED_VARS, KEPT_VARS};

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use caption::image::LoadOptions;
use caption::resolve::hub::{self, ModelSource};
use caption::{Captioner, RuntimeOptions};
use serde::Deserialize;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A recorded JSON file and the tensors beside it, from tests/fixtures/reference.
pub fn reference_json(name: &str) -> String {
    std::fs::read_to_string(fixtures().join("reference").join(name)).unwrap()
}

pub fn reference_tensors(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("reference").join(name), &Device::Cpu).unwrap()
}

/// Where the parity tests run their models: the CPU, or what
/// `CAPTION_TEST_DEVICE` names (`cuda`, `cuda:N`; bench/gpu.sh sets it on a
/// GPU machine, so the same tests, with the same tolerances, check the
/// GPU's answers).
pub fn device() -> Device {
    let spec = std::env::var("CAPTION_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    caption::captioner::parse_device(&spec).expect("CAPTION_TEST_DEVICE names a usable device")
}

/// A fixture model, loaded through `hub::fetch` on its folder.
pub fn load(name: &str) -> Captioner {
    load_as(name, None)
}

/// [`load`] with the weights in `dtype` (`None`: the default, f32 on CPU).
pub fn load_as(name: &str, dtype: Option<DType>) -> Captioner {
    let files = hub::fetch(&ModelSource::Folder(fixtures().join("models").join(name))).unwrap();
    let runtime = RuntimeOptions {
        device: device(),
        dtype,
        quantization: None,
        pack_cache: None,
        ..RuntimeOptions::default()
    };
    Captioner::load(&files, &runtime).unwrap()
}

/// Lays `folder` out as huggingface_hub does in `$HF_HOME/hub`: a blob per
/// file, a snapshot of links per commit, and `refs/main` naming the commit.
pub fn populate_hub_cache(hf_home: &Path, repo: &str, commit: &str, folder: &Path) {
    let repo_dir = hf_home
        .join("hub")
        .join(format!("models--{}", repo.replace('/', "--")));
    let snapshot = repo_dir.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo_dir.join("blobs")).unwrap();
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    std::fs::write(repo_dir.join("refs/main"), commit).unwrap();
    for entry in std::fs::read_dir(folder).unwrap() {
        let entry = entry.unwrap();
        let blob = repo_dir.join("blobs").join(entry.file_name());
        std::fs::copy(entry.path(), &blob).unwrap();
        std::os::unix::fs::symlink(&blob, snapshot.join(entry.file_name())).unwrap();
    }
}

/// A fixture image as transformers sees it: PIL ignores EXIF orientation.
pub fn image(name: &str) -> image::RgbImage {
    let options = LoadOptions {
        exif_rotate: false,
        ..LoadOptions::default()
    };
    caption::image::load_rgb8(&fixtures().join("images").join(name), &options).unwrap()
}

/// A fixture script's JSON: the smallest top-1/top-2 margin of any recorded
/// greedy step, and the cases.
#[derive(Debug, Deserialize)]
pub struct Reference<C> {
    pub min_margin: f64,
    pub cases: Vec<C>,
}

/// Largest absolute elementwise difference, computed in f64.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let diff = (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap();
    max_abs(&diff)
}

/// Largest absolute value, in f64.
pub fn max_abs(a: &Tensor) -> f64 {
    a.to_dtype(DType::F64)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// A recorded tensor of one case (`KEY.NAME`), with a batch axis of one.
pub fn tensor(tensors: &HashMap<String, Tensor>, key: &str, name: &str) -> Tensor {
    tensors[&format!("{key}.{name}")].unsqueeze(0).unwrap()
}

/// transformers' defaults with `num_beams=3`.
pub fn beams3() -> caption::generate::GenerationConfig {
    caption::generate::GenerationDefaults {
        num_beams: Some(3),
        ..Default::default()
    }
    .resolve(0)
}

/// The demo world's committed pictures (examples/ and the evaluation set,
/// 44 PNGs) copied into a new folder `at`, numbered so that names stay
/// unique; how many.
pub fn demo_picture_folder(at: &Path) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::create_dir(at).unwrap();
    let mut n = 0;
    for folder in ["examples", "tests/fixtures/demo/eval"] {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(root.join(folder))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "png"))
            .collect();
        paths.sort();
        for path in paths {
            let name = path.file_name().unwrap().to_str().unwrap();
            std::fs::copy(&path, at.join(format!("{n:02}-{name}"))).unwrap();
            n += 1;
        }
    }
    n
}

/// jsonl lines by their `path`; a path seen twice fails the test.
pub fn jsonl_by_path(text: &str, into: &mut std::collections::BTreeMap<String, String>) {
    for line in text.lines() {
        let value: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a jsonl record ({e}): {line:?}"));
        let path = value["path"].as_str().unwrap().to_string();
        assert!(
            into.insert(path.clone(), line.to_string()).is_none(),
            "{path} written twice"
        );
    }
}

/// The rows of a Parquet file as JSON objects of their non-null columns
/// (read with the `parquet` crate's row reader, not the writer's code);
/// the `labels` column, JSON text, parsed.
pub fn parquet_rows(path: &Path) -> Vec<serde_json::Map<String, serde_json::Value>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::record::Field;
    let reader = SerializedFileReader::new(std::fs::File::open(path).unwrap()).unwrap();
    reader
        .get_row_iter(None)
        .unwrap()
        .map(|row| {
            let row = row.unwrap();
            let mut object = serde_json::Map::new();
            for (name, field) in row.get_column_iter() {
                let value = match field {
                    Field::Null => continue,
                    Field::Str(s) if name == "labels" => serde_json::from_str(s).unwrap(),
                    Field::Str(s) => serde_json::Value::from(s.as_str()),
                    Field::Int(i) => serde_json::Value::from(*i),
                    Field::Float(f) => serde_json::Value::from(*f),
                    other => panic!("{name}: unexpected {other:?}"),
                };
                object.insert(name.clone(), value);
            }
            object
        })
        .collect()
}
