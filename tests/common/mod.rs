//! Helpers the parity tests share: where the fixtures are and how to load them
//! the way `caption --model DIR` does.
#![allow(dead_code)] // each test binary uses its own subset

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use caption::hub::{self, ModelSource};
use caption::image::LoadOptions;
use caption::{Captioner, RuntimeOptions};

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

/// A fixture model, loaded through `hub::fetch` on its folder.
pub fn load(name: &str) -> Captioner {
    let files = hub::fetch(&ModelSource::Folder(fixtures().join("models").join(name))).unwrap();
    Captioner::load(&files, &RuntimeOptions::default()).unwrap()
}

/// A fixture image as transformers sees it: PIL ignores EXIF orientation.
pub fn image(name: &str) -> image::RgbImage {
    let options = LoadOptions {
        exif_rotate: false,
        ..LoadOptions::default()
    };
    caption::image::load_rgb8(&fixtures().join("images").join(name), &options).unwrap()
}
