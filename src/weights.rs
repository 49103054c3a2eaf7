//! Checkpoint files → a candle `VarBuilder`.

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::hub::WeightFiles;

/// Opens the weights for reading by tensor name, converting each tensor to
/// `dtype` on `device` as the model asks for it.
pub fn var_builder(
    weights: &WeightFiles,
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    match weights {
        WeightFiles::Safetensors(paths) => {
            // SAFETY: the files are memory-mapped read-only. They sit in a model
            // folder or the Hugging Face cache, which nothing rewrites in place
            // while we run (hf-hub writes new blobs to temporary files and
            // renames them). If another program truncated one anyway, reading a
            // tensor could fault; every loader that maps checkpoints accepts the same.
            unsafe { VarBuilder::from_mmaped_safetensors(paths, dtype, device) }.with_context(
                || {
                    format!(
                        "reading safetensors weights {}",
                        paths
                            .iter()
                            .map(|p| p.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                },
            )
        }
        // candle's pickle reader only understands the tensor-storage opcodes of
        // a PyTorch checkpoint; it never imports or calls anything, so a hostile
        // file cannot run code the way `torch.load` can.
        WeightFiles::PytorchBin(path) => VarBuilder::from_pth(path, dtype, device)
            .with_context(|| format!("reading PyTorch weights {}", path.display())),
    }
}

/// The dtype config.json says the checkpoint was saved in (`dtype` in
/// transformers 5, `torch_dtype` before), if it names one candle has.
pub fn checkpoint_dtype(config_json: &serde_json::Value) -> Option<DType> {
    let name = config_json
        .get("dtype")
        .or_else(|| config_json.get("torch_dtype"))?
        .as_str()?;
    match name {
        "float32" => Some(DType::F32),
        "float16" => Some(DType::F16),
        "bfloat16" => Some(DType::BF16),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_dtype_keys() {
        let v5 = serde_json::json!({"dtype": "bfloat16"});
        let v4 = serde_json::json!({"torch_dtype": "float16"});
        assert_eq!(checkpoint_dtype(&v5), Some(DType::BF16));
        assert_eq!(checkpoint_dtype(&v4), Some(DType::F16));
        assert_eq!(checkpoint_dtype(&serde_json::json!({})), None);
    }
}
