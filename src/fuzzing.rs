//! Entry points for the fuzz targets in `fuzz/` (and for the test that
//! replays their findings and corpus, `tests/fuzz_inputs.rs`): each takes
//! arbitrary bytes to one of the places where a file from outside reaches
//! the program, through the same code a run takes, and must return (with an
//! error or without) for every input: no panic, no abort, no hang, no
//! allocation the input's size does not justify.
//!
//! Inputs that are files in a run (checkpoints, tokenizers, packs) are
//! written to a temporary folder first, so the readers see them exactly as
//! they would a user's.

use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::image::{LoadOptions, PreprocessConfig};

/// The largest image the image target decodes: the limit check itself is
/// what the fuzzer should reach, and a full-size allocation per input
/// (Pillow's limit is 179 million pixels) would slow it a hundredfold.
const FUZZ_MAX_PIXELS: u64 = 1 << 22;

/// An image file: decoded (EXIF rotation on, as a run does), then turned
/// into BLIP's 384×384 pixel values.
pub fn image(bytes: &[u8]) {
    let options = LoadOptions {
        max_pixels: FUZZ_MAX_PIXELS,
        ..LoadOptions::default()
    };
    if let Ok(rgb) = crate::image::decode_rgb8(bytes, &options) {
        let config = PreprocessConfig::from_json_str("{}").expect("the defaults parse");
        let values = crate::image::pixel_values(&rgb, &config);
        assert_eq!(values.len(), 3 * 384 * 384);
    }
}

/// A checkpoint file: the first byte says which format the rest is read as
/// (even: `model.safetensors`, odd: `pytorch_model.bin`); every tensor it
/// holds is then read.
pub fn checkpoint(bytes: &[u8]) {
    let Some((&format, contents)) = bytes.split_first() else {
        return;
    };
    let folder = Scratch::new();
    let weights = if format % 2 == 0 {
        let path = folder.write("model.safetensors", contents);
        crate::resolve::hub::WeightFiles::Safetensors(vec![path])
    } else {
        crate::resolve::hub::WeightFiles::PytorchBin(folder.write("pytorch_model.bin", contents))
    };
    let _ = crate::load::weights::read_every_tensor(&weights);
}

/// One of a model folder's JSON files, chosen by the first byte:
/// config.json (read as BLIP, then as BLIP-2, and each model built from
/// it as far as its first weight), the image processor's config,
/// generation_config.json, or tokenizer.json (then used both ways).
pub fn model_file(bytes: &[u8]) {
    let Some((&which, contents)) = bytes.split_first() else {
        return;
    };
    match which % 4 {
        0 => model_config(contents),
        1 => {
            if let Ok(text) = std::str::from_utf8(contents) {
                let _ = PreprocessConfig::from_json_str(text);
                let _ = PreprocessConfig::clip_from_json_str(text);
            }
        }
        2 => {
            let Ok(text) = std::str::from_utf8(contents) else {
                return;
            };
            if let Ok(defaults) = crate::generate::GenerationDefaults::from_generation_config(text)
            {
                let _ = defaults.resolve(0);
            }
        }
        _ => tokenizer(contents),
    }
}

/// config.json: parsed as each family's config, then each model built from
/// it with no weights at all, so every size derived from the config before
/// the first weight is asked for is computed.
fn model_config(contents: &[u8]) {
    use crate::models::{blip, blip2, clip};
    let Ok(text) = std::str::from_utf8(contents) else {
        return;
    };
    let no_weights = || VarBuilder::from_tensors(Default::default(), DType::F32, &Device::Cpu);
    if let Ok(config) = blip::BlipConfig::from_json(text) {
        let _ = blip::BlipForConditionalGeneration::new(config.clone(), no_weights());
        let _ = blip::BlipForQuestionAnswering::new(config, no_weights());
    }
    if let Ok(config) = blip2::Blip2Config::from_json(text) {
        let _ = blip2::Blip2ForConditionalGeneration::new(config, no_weights());
    }
    if let Ok(config) = clip::ClipConfig::from_json(text) {
        let _ = clip::ClipModel::new(&config, no_weights());
    }
}

/// A search index in the cache (`caption search`): opened as a search
/// opens it, for embeddings of the length the first byte says, and every
/// entry looked up.
pub fn search_index(bytes: &[u8]) {
    use crate::batch::index::EmbeddingIndex;
    let Some((&dim, contents)) = bytes.split_first() else {
        return;
    };
    let folder = Scratch::new();
    let dim = usize::from(dim);
    // Where the index of this identity lives: open once to learn the name.
    let (empty, _) = EmbeddingIndex::open(folder.path(), "fuzz", dim);
    let name = empty.path().file_name().expect("a file name").to_owned();
    folder.write(&name.to_string_lossy(), contents);
    let (index, _) = EmbeddingIndex::open(folder.path(), "fuzz", dim);
    assert!(index.len() <= contents.len());
}

/// tokenizer.json: loaded as a run loads it, then asked to encode a
/// question and to decode ids in and out of its vocabulary.
fn tokenizer(contents: &[u8]) {
    let folder = Scratch::new();
    let path = folder.write("tokenizer.json", contents);
    if let Ok(codec) = crate::load::tokenizer::TextCodec::load(&path, None) {
        let _ = codec.encode_with_special_tokens("what is in the picture? a [SEP] café");
        let _ = codec.encode_without_special_tokens("Question: how many? Answer:");
        let _ = codec.decode(&[0, 1, 2, 3, 101, 102, 30522, u32::MAX]);
    }
}

/// A models.toml (the built-in one or the user's): parsed, then each
/// alias's source and Hub model read.
pub fn models_toml(bytes: &[u8]) {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    if let Ok(registry) = crate::resolve::registry::Registry::parse(text) {
        for entry in registry.entries.values() {
            let _ = entry.source();
            let _ = entry.hub_model();
            let _ = entry.generation.resolve(0);
        }
    }
}

/// A pack-cache file: opened as a run opens it, and every layer it holds
/// multiplied by a vector, as if its checksums were right (a checksum keeps
/// out damage, not someone who can write the cache folder, so what such a
/// file can make us do is what is fuzzed).
pub fn pack(bytes: &[u8]) {
    let folder = Scratch::new();
    let path = folder.write("fuzz.pack", bytes);
    let _ = crate::load::weight_cache::use_unchecked_pack(&path);
}

/// A temporary folder, removed when dropped.
struct Scratch(tempfile::TempDir);

impl Scratch {
    fn new() -> Self {
        Self(tempfile::tempdir().expect("a temporary folder"))
    }

    fn write(&self, name: &str, contents: &[u8]) -> PathBuf {
        let path = self.path().join(name);
        let mut file = std::fs::File::create(&path).expect("a temporary file");
        file.write_all(contents).expect("writing a temporary file");
        path
    }

    fn path(&self) -> &Path {
        self.0.path()
    }
}
