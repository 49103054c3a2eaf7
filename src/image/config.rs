//! `preprocessor_config.json` for BLIP's and CLIP's image processors.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{Map, Value};

use super::Resample;

/// transformers' `OPENAI_CLIP_MEAN`, BLIP's default `image_mean`.
pub const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
/// transformers' `OPENAI_CLIP_STD`, BLIP's default `image_std`.
pub const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// What `BlipImageProcessor` or `CLIPImageProcessor` does to an RGB image: resize (to `width` x
/// `height`, or so that the shorter side is `shortest_edge`), center-crop to `crop_size` when
/// there is one, multiply by `rescale_factor`, subtract `image_mean` and divide by `image_std`.
///
/// `image_mean`/`image_std` are `f32` because transformers converts them to the image's dtype
/// (float32) before normalising; `rescale_factor` stays `f64` because the rescale is done in
/// float64 and only then cast to float32.
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessConfig {
    /// The exact resize target, used when `shortest_edge` is `None`.
    pub height: u32,
    pub width: u32,
    /// Resize keeping the aspect ratio so that the shorter side has this length (CLIP's
    /// `{"shortest_edge": n}`, or an integer `size` where `default_to_square` is false).
    pub shortest_edge: Option<u32>,
    pub do_resize: bool,
    /// `(height, width)` of the center crop after the resize (`do_center_crop` with
    /// `crop_size`); `None` without one.
    pub crop_size: Option<(u32, u32)>,
    pub resample: Resample,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    /// Recorded for completeness; loading always produces RGB (a BLIP vision tower cannot take
    /// anything else), so `false` changes nothing.
    pub do_convert_rgb: bool,
}

impl Default for PreprocessConfig {
    /// `BlipImageProcessor`'s class defaults.
    fn default() -> Self {
        PreprocessConfig {
            height: 384,
            width: 384,
            shortest_edge: None,
            do_resize: true,
            crop_size: None,
            resample: Resample::Bicubic,
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: OPENAI_CLIP_MEAN.map(|v| v as f32),
            image_std: OPENAI_CLIP_STD.map(|v| v as f32),
            do_convert_rgb: true,
        }
    }
}

/// What a processor class assumes for keys its saved config leaves out.
struct ClassDefaults {
    config: PreprocessConfig,
    default_to_square: bool,
}

impl PreprocessConfig {
    /// `CLIPImageProcessor`'s class defaults: the shorter side to 224 px with bicubic, then
    /// the central 224 x 224.
    pub fn clip_default() -> Self {
        PreprocessConfig {
            height: 224,
            width: 224,
            shortest_edge: Some(224),
            crop_size: Some((224, 224)),
            ..PreprocessConfig::default()
        }
    }

    /// The `(height, width)` of every image this config produces; `None` where it keeps the
    /// image's own size (no resize and no crop), or its aspect ratio (a shortest-edge resize
    /// without a crop).
    pub fn output_size(&self) -> Option<(u32, u32)> {
        match (self.crop_size, self.do_resize, self.shortest_edge) {
            (Some(crop), _, _) => Some(crop),
            (None, true, None) => Some((self.height, self.width)),
            _ => None,
        }
    }
}

/// Prefix marking a JSON number we turned into a string, see [`quote_numbers`]: U+0001, which
/// no real config string starts with, written as a JSON escape in the rewritten text.
const NUM: &str = "\u{1}num:";
const NUM_ESCAPED: &str = "\\u0001num:";

impl PreprocessConfig {
    /// Parse a `preprocessor_config.json` of a BLIP model. Keys that are missing or `null`
    /// take `BlipImageProcessor`'s defaults; keys we do not use are ignored.
    ///
    /// `size` may be an integer (a square, since BLIP has `default_to_square = True`),
    /// `{"height": h, "width": w}`, `{"shortest_edge": n}` or a `[h, w]` list; `crop_size` an
    /// integer, `{"height", "width"}` or a list. Sizes that leave the output's size to the
    /// image (a shortest edge without a crop, `longest_edge`, `max_height`/`max_width`) are
    /// rejected: a ViT needs the fixed size it was trained on.
    pub fn from_json_str(json: &str) -> Result<Self> {
        Self::parse_over(
            json,
            ClassDefaults {
                config: PreprocessConfig::default(),
                default_to_square: true,
            },
        )
    }

    /// [`Self::from_json_str`] for a CLIP model, whose processor class defaults differ: an
    /// integer `size` is the shortest edge (`default_to_square = False`, as the openai
    /// checkpoints' legacy `"size": 224` relies on) and the center crop is on.
    pub fn clip_from_json_str(json: &str) -> Result<Self> {
        Self::parse_over(
            json,
            ClassDefaults {
                config: PreprocessConfig::clip_default(),
                default_to_square: false,
            },
        )
    }

    fn parse_over(json: &str, class: ClassDefaults) -> Result<Self> {
        let value: Value = serde_json::from_str(&quote_numbers(json))
            .context("preprocessor config is not valid JSON")?;
        let obj = value
            .as_object()
            .ok_or_else(|| anyhow!("preprocessor config must be a JSON object"))?;
        let mut cfg = class.config;

        let default_to_square =
            get_bool(obj, "default_to_square")?.unwrap_or(class.default_to_square);
        if let Some(size) = present(obj, "size") {
            match parse_size(size, default_to_square)? {
                Size::Exact(height, width) => {
                    (cfg.height, cfg.width) = (height, width);
                    cfg.shortest_edge = None;
                }
                Size::ShortestEdge(n) => cfg.shortest_edge = Some(n),
            }
        }
        let mut crop_size = cfg.crop_size;
        if let Some(size) = present(obj, "crop_size") {
            crop_size = match parse_size(size, true)? {
                Size::Exact(height, width) => Some((height, width)),
                Size::ShortestEdge(_) => bail!("crop_size must be a height and a width"),
            };
        }
        if let Some(code) = present(obj, "resample") {
            let code = integer(code).ok_or_else(|| anyhow!("resample must be an integer"))?;
            cfg.resample = Resample::from_pil_code(code).ok_or_else(|| {
                anyhow!(
                    "unsupported resample filter {code} (supported: 0 nearest, 1 lanczos, \
                     2 bilinear, 3 bicubic, 4 box, 5 hamming)"
                )
            })?;
        }
        if let Some(v) = get_bool(obj, "do_resize")? {
            cfg.do_resize = v;
        }
        if let Some(v) = get_bool(obj, "do_rescale")? {
            cfg.do_rescale = v;
        }
        if let Some(v) = get_bool(obj, "do_normalize")? {
            cfg.do_normalize = v;
        }
        if let Some(v) = get_bool(obj, "do_convert_rgb")? {
            cfg.do_convert_rgb = v;
        }
        let do_center_crop = get_bool(obj, "do_center_crop")?.unwrap_or(cfg.crop_size.is_some());
        cfg.crop_size = match (do_center_crop, crop_size) {
            (false, _) => None,
            (true, Some(crop)) => Some(crop),
            (true, None) => bail!("do_center_crop is set but there is no crop_size"),
        };
        if cfg.do_resize && cfg.shortest_edge.is_some() && cfg.crop_size.is_none() {
            bail!(
                "a shortest_edge resize without a center crop keeps each image's aspect ratio; \
                 the vision model needs one fixed size"
            );
        }
        if let Some(v) = present(obj, "rescale_factor") {
            cfg.rescale_factor =
                number(v).ok_or_else(|| anyhow!("rescale_factor must be a number"))?;
        }
        if let Some(v) = present(obj, "image_mean") {
            cfg.image_mean = per_channel(v, "image_mean")?;
        }
        if let Some(v) = present(obj, "image_std") {
            cfg.image_std = per_channel(v, "image_std")?;
        }
        if cfg.image_std.contains(&0.0) {
            bail!("image_std must not contain 0");
        }
        Ok(cfg)
    }

    /// Read and parse a `preprocessor_config.json` file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = crate::load::regular_file::read_text(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Self::from_json_str(&text).with_context(|| format!("in {}", path.display()))
    }
}

/// serde_json (without its `float_roundtrip` feature, which we do not control) may round a
/// number with 17 significant digits to a neighbouring `f64`, while Python's `json` is exact.
/// `rescale_factor` and the mean/std must be exactly Python's values, so every number outside a
/// string is wrapped into a marked string and later parsed with Rust's correctly rounded
/// `str::parse`. JSON punctuation is ASCII and never occurs inside a UTF-8 multi-byte sequence,
/// so scanning bytes is safe.
fn quote_numbers(json: &str) -> String {
    let bytes = json.as_bytes();
    let mut out = String::with_capacity(json.len() + 64);
    let mut start = 0; // start of the not yet copied input
    let mut i = 0;
    let mut in_string = false;
    let mut escaped = false;
    while i < bytes.len() {
        let b = bytes[i];
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            i += 1;
        } else if b == b'"' {
            in_string = true;
            i += 1;
        } else if b == b'-' || b.is_ascii_digit() {
            let end = bytes[i..]
                .iter()
                .position(|c| !matches!(c, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'))
                .map_or(bytes.len(), |n| i + n);
            out.push_str(&json[start..i]);
            out.push('"');
            out.push_str(NUM_ESCAPED);
            out.push_str(&json[i..end]);
            out.push('"');
            start = end;
            i = end;
        } else {
            i += 1;
        }
    }
    out.push_str(&json[start..]);
    out
}

/// The value of `key`, treating `null` as absent (transformers falls back to the class default).
fn present<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

fn get_bool(obj: &Map<String, Value>, key: &str) -> Result<Option<bool>> {
    match present(obj, key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => bail!("{key} must be true or false"),
    }
}

fn number(v: &Value) -> Option<f64> {
    let text = v.as_str()?.strip_prefix(NUM)?;
    text.parse::<f64>().ok().filter(|x| x.is_finite())
}

fn integer(v: &Value) -> Option<i64> {
    v.as_str()?.strip_prefix(NUM)?.parse::<i64>().ok()
}

fn dimension(v: &Value, what: &str) -> Result<u32> {
    let n = integer(v).ok_or_else(|| anyhow!("{what} must be an integer"))?;
    u32::try_from(n)
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| anyhow!("{what} must be a positive integer, got {n}"))
}

/// A `size` in one of transformers' `get_size_dict` forms.
enum Size {
    /// `(height, width)`.
    Exact(u32, u32),
    ShortestEdge(u32),
}

/// `size` or `crop_size` from transformers' `get_size_dict` forms.
fn parse_size(size: &Value, default_to_square: bool) -> Result<Size> {
    match size {
        Value::Object(map) => {
            let mut keys: Vec<&str> = map.keys().map(String::as_str).collect();
            keys.sort_unstable();
            match keys.as_slice() {
                ["height", "width"] => Ok(Size::Exact(
                    dimension(&map["height"], "size.height")?,
                    dimension(&map["width"], "size.width")?,
                )),
                ["shortest_edge"] => Ok(Size::ShortestEdge(dimension(
                    &map["shortest_edge"],
                    "size.shortest_edge",
                )?)),
                _ => bail!(
                    "unsupported size {size}: expected {{\"height\", \"width\"}} or \
                     {{\"shortest_edge\"}}; sizes that depend on the image (longest_edge, \
                     max_height/max_width) are not supported"
                ),
            }
        }
        Value::Array(items) if items.len() == 2 => Ok(Size::Exact(
            dimension(&items[0], "size[0]")?,
            dimension(&items[1], "size[1]")?,
        )),
        v if integer(v).is_some() => {
            let n = dimension(v, "size")?;
            Ok(if default_to_square {
                Size::Exact(n, n)
            } else {
                Size::ShortestEdge(n)
            })
        }
        _ => bail!("size must be an integer, a [height, width] list or {{\"height\", \"width\"}}"),
    }
}

/// A per-channel constant given either as a list of three numbers or a single number.
/// Rounded to `f32` as numpy does when it builds the mean/std array in the image's dtype.
fn per_channel(v: &Value, what: &str) -> Result<[f32; 3]> {
    let err = || anyhow!("{what} must be a number or a list of 3 numbers");
    if let Some(x) = number(v) {
        return Ok([x as f32; 3]);
    }
    let items = v.as_array().ok_or_else(err)?;
    if items.len() != 3 {
        bail!(
            "{what} must have 3 values (one per RGB channel), got {}",
            items.len()
        );
    }
    let mut out = [0f32; 3];
    for (o, item) in out.iter_mut().zip(items) {
        *o = number(item).ok_or_else(err)? as f32;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blip_hub_config() {
        let json = r#"{
          "do_normalize": true,
          "do_resize": true,
          "image_mean": [0.48145466, 0.4578275, 0.40821073],
          "image_processor_type": "BlipImageProcessor",
          "image_std": [0.26862954, 0.26130258, 0.27577711],
          "processor_class": "BlipProcessor",
          "resample": 3,
          "rescale_factor": 0.00392156862745098,
          "size": {"height": 384, "width": 384}
        }"#;
        let cfg = PreprocessConfig::from_json_str(json).unwrap();
        assert_eq!(cfg, PreprocessConfig::default());
        assert_eq!(cfg.rescale_factor, 1.0 / 255.0);
    }

    #[test]
    fn size_forms() {
        let parse = |s: &str| PreprocessConfig::from_json_str(s).map(|c| (c.height, c.width));
        assert_eq!(parse(r#"{"size": 224}"#).unwrap(), (224, 224));
        assert_eq!(
            parse(r#"{"size": {"width": 97, "height": 61}}"#).unwrap(),
            (61, 97)
        );
        assert_eq!(parse(r#"{"size": [61, 97]}"#).unwrap(), (61, 97));
        assert_eq!(parse(r#"{"size": null}"#).unwrap(), (384, 384));
        assert_eq!(parse(r#"{}"#).unwrap(), (384, 384));
        // A shortest edge needs a crop to give a fixed size.
        let err = parse(r#"{"size": {"shortest_edge": 384}}"#).unwrap_err();
        assert!(err.to_string().contains("shortest_edge"), "{err}");
        assert!(parse(r#"{"size": 384, "default_to_square": false}"#).is_err());
        assert!(parse(r#"{"size": {"longest_edge": 384}}"#).is_err());
        assert!(parse(r#"{"size": {"height": 0, "width": 3}}"#).is_err());
        assert!(parse(r#"{"size": {"height": 384}}"#).is_err());
        assert!(parse(r#"{"size": "big"}"#).is_err());
        assert!(parse(r#"{"size": 384.5}"#).is_err());
    }

    #[test]
    fn scalars_and_defaults() {
        let cfg = PreprocessConfig::from_json_str(
            r#"{"image_mean": 0.5, "image_std": [0.5, 0.25, 2], "resample": 2,
                "do_rescale": false, "do_convert_rgb": null, "note": "a \"quoted\" 1.5 -2"}"#,
        )
        .unwrap();
        assert_eq!(cfg.image_mean, [0.5; 3]);
        assert_eq!(cfg.image_std, [0.5, 0.25, 2.0]);
        assert_eq!(cfg.resample, Resample::Bilinear);
        assert!(!cfg.do_rescale);
        assert!(cfg.do_convert_rgb);
        assert!(PreprocessConfig::from_json_str(r#"{"resample": 7}"#).is_err());
        assert!(PreprocessConfig::from_json_str(r#"{"image_mean": [0.5, 0.5]}"#).is_err());
        // BLIP's processor has no crop_size to crop to.
        assert!(PreprocessConfig::from_json_str(r#"{"do_center_crop": true}"#).is_err());
        assert!(PreprocessConfig::from_json_str("[1, 2]").is_err());
        assert!(PreprocessConfig::from_json_str("{").is_err());
    }

    #[test]
    fn clip_configs_resize_the_shortest_edge_then_crop() {
        // openai/clip-vit-base-patch32's legacy file: integer sizes.
        let legacy = PreprocessConfig::clip_from_json_str(
            r#"{"crop_size": 224, "do_center_crop": true, "do_normalize": true,
                "do_resize": true, "feature_extractor_type": "CLIPFeatureExtractor",
                "resample": 3, "size": 224}"#,
        )
        .unwrap();
        assert_eq!(legacy, PreprocessConfig::clip_default());
        assert_eq!(legacy.output_size(), Some((224, 224)));
        // transformers 5's form, and a crop apart from the resize.
        let cfg = PreprocessConfig::clip_from_json_str(
            r#"{"size": {"shortest_edge": 256}, "crop_size": {"height": 200, "width": 180}}"#,
        )
        .unwrap();
        assert_eq!(cfg.shortest_edge, Some(256));
        assert_eq!(cfg.output_size(), Some((200, 180)));
        // An exact resize, then a crop.
        let cfg = PreprocessConfig::clip_from_json_str(
            r#"{"size": {"height": 240, "width": 240}, "crop_size": [224, 224]}"#,
        )
        .unwrap();
        assert_eq!((cfg.shortest_edge, cfg.height), (None, 240));
        assert_eq!(cfg.output_size(), Some((224, 224)));
        // Without the crop, a shortest edge leaves the size to the image.
        assert!(PreprocessConfig::clip_from_json_str(r#"{"do_center_crop": false}"#).is_err());
        let square = PreprocessConfig::clip_from_json_str(
            r#"{"do_center_crop": false, "size": {"height": 64, "width": 64}}"#,
        )
        .unwrap();
        assert_eq!(square.output_size(), Some((64, 64)));
    }

    #[test]
    fn numbers_are_parsed_exactly() {
        // A 17-significant-digit value for which serde_json's default parser (digits rounded
        // to f64, then divided by 10^19: two roundings) is one ulp off; Rust's parser and
        // Python's json round once.
        let text = "0.0040257678620673558";
        let exact = text.parse::<f64>().unwrap();
        // (Without the `float_roundtrip` feature, `serde_json::from_str::<f64>(text)` gives the
        // neighbouring f64 here.)
        let cfg =
            PreprocessConfig::from_json_str(&format!(r#"{{"rescale_factor": {text}}}"#)).unwrap();
        assert_eq!(cfg.rescale_factor, exact);
        assert_eq!(
            quote_numbers(r#"{"a": -1.5e-3, "b": "x\"9", "c": [1,2]}"#),
            r#"{"a": "\u0001num:-1.5e-3", "b": "x\"9", "c": ["\u0001num:1","\u0001num:2"]}"#
        );
    }
}
