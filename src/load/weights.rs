//! Checkpoint files → a candle `VarBuilder`.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::resolve::hub::WeightFiles;

/// Opens the weights for reading by tensor name, converting each tensor to
/// `dtype` on `device` as the model asks for it.
pub fn var_builder(
    weights: &WeightFiles,
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    match weights {
        WeightFiles::Safetensors(paths) => {
            let files = SafetensorsFiles::open(paths)?;
            Ok(VarBuilder::from_backend(
                Box::new(files),
                dtype,
                device.clone(),
            ))
        }
        // candle's pickle reader only understands the tensor-storage opcodes of
        // a PyTorch checkpoint; it never imports or calls anything, so a hostile
        // file cannot run code the way `torch.load` can.
        WeightFiles::PytorchBin(path) => VarBuilder::from_pth(path, dtype, device)
            .with_context(|| format!("reading PyTorch weights {}", path.display())),
    }
}

/// Safetensors checkpoints read tensor by tensor, with plain reads.
///
/// candle's `MmapedSafetensors` maps the files and copies each tensor out of
/// the map; the pages it touched stay counted in the process's memory until
/// the map goes, so loading a 15 GB checkpoint peaked at the file plus the
/// model (20 GB RSS for BLIP-2 OPT-2.7b in bf16, measured). Reading each
/// tensor into its own buffer instead peaks at the model plus one tensor.
struct SafetensorsFiles {
    files: Vec<(PathBuf, Mutex<File>)>,
    tensors: HashMap<String, TensorSlot>,
}

/// Where one tensor's bytes are: which file, at what offset, and its layout.
struct TensorSlot {
    file: usize,
    offset: u64,
    dtype: DType,
    shape: Vec<usize>,
}

impl SafetensorsFiles {
    fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut tensors = HashMap::new();
        for (index, path) in paths.iter().enumerate() {
            let mut file = File::open(path)
                .with_context(|| format!("reading safetensors weights {}", path.display()))?;
            for (name, slot) in read_header(&mut file, index)
                .with_context(|| format!("{} is not a valid safetensors file", path.display()))?
            {
                tensors.insert(name, slot);
            }
            files.push((path.clone(), Mutex::new(file)));
        }
        Ok(Self { files, tensors })
    }

    fn load(&self, name: &str, device: &Device) -> candle_core::Result<Tensor> {
        let slot = self
            .tensors
            .get(name)
            .ok_or_else(|| candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            })?;
        let (path, file) = &self.files[slot.file];
        let count = slot.shape.iter().product::<usize>();
        let mut file = file.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut read = |bytes: &mut [u8]| {
            file.seek(SeekFrom::Start(slot.offset))
                .and_then(|_| file.read_exact(bytes))
                .map_err(|err| {
                    candle_core::Error::Msg(format!(
                        "reading {name} from {}: {err}",
                        path.display()
                    ))
                })
        };
        // The float types are read straight into the tensor's own buffer
        // (safetensors is little-endian, like the machines we run on): one
        // allocation and one copy from the page cache, where going through
        // a byte buffer took two of each (BLIP-base, 896 MB of f32: load 0.77 -> 0.55 s).
        match slot.dtype {
            DType::F32 if cfg!(target_endian = "little") => {
                read_floats(vec![0f32; count], read, &slot.shape, device)
            }
            DType::F16 if cfg!(target_endian = "little") => {
                read_floats(vec![half::f16::ZERO; count], read, &slot.shape, device)
            }
            DType::BF16 if cfg!(target_endian = "little") => {
                read_floats(vec![half::bf16::ZERO; count], read, &slot.shape, device)
            }
            dtype => {
                let mut buffer = vec![0u8; count * dtype.size_in_bytes()];
                read(&mut buffer)?;
                Tensor::from_raw_buffer(&buffer, dtype, &slot.shape, device)
            }
        }
    }
}

/// Fills `values` with the file's bytes and makes it a tensor, without a copy.
fn read_floats<T: candle_core::WithDType>(
    mut values: Vec<T>,
    read: impl FnOnce(&mut [u8]) -> candle_core::Result<()>,
    shape: &[usize],
    device: &Device,
) -> candle_core::Result<Tensor> {
    let len = std::mem::size_of_val(values.as_slice());
    // SAFETY: T is f32, f16 or bf16: initialised, no padding, and every bit
    // pattern is a valid value, so viewing its storage as bytes and writing
    // any bytes there is sound.
    let bytes = unsafe { std::slice::from_raw_parts_mut(values.as_mut_ptr().cast::<u8>(), len) };
    advise_huge_pages(bytes);
    read(bytes)?;
    Tensor::from_vec(values, shape, device)
}

/// Asks for `buffer`'s untouched pages to be faulted in 2 MB at a time.
///
/// A tensor over glibc's mmap threshold (32 MB) gets a fresh, zeroed mapping
/// that `read` then faults in 4 KB at a time; for BLIP-2 OPT-2.7b's 11 GB of
/// such tensors those faults were most of the load's system time. Only the
/// whole huge pages inside the buffer are advised; a hint, ignored where the
/// kernel has no transparent huge pages.
fn advise_huge_pages(buffer: &mut [u8]) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const HUGE_PAGE: usize = 2 * 1024 * 1024;
        let start = (buffer.as_ptr() as usize).next_multiple_of(HUGE_PAGE);
        let end = (buffer.as_ptr() as usize + buffer.len()) / HUGE_PAGE * HUGE_PAGE;
        if end > start {
            // SAFETY: the range lies inside `buffer`, which we own; MADV_HUGEPAGE
            // changes how its pages are backed, never their contents.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = buffer;
}

/// The header of a safetensors file: an 8-byte little-endian length, then
/// that much JSON mapping each tensor name to its dtype, shape and byte range
/// (relative to the end of the header).
fn read_header(file: &mut File, index: usize) -> Result<Vec<(String, TensorSlot)>> {
    let file_len = file.metadata()?.len();
    let mut len = [0u8; 8];
    file.read_exact(&mut len).context("no header")?;
    let header_len = u64::from_le_bytes(len);
    anyhow::ensure!(
        header_len.saturating_add(8) <= file_len,
        "the header runs past the end of the file"
    );
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header)?;
    let header: HashMap<String, serde_json::Value> =
        serde_json::from_slice(&header).context("the header is not JSON")?;
    let data_start = 8 + header_len;
    let mut slots = Vec::with_capacity(header.len());
    for (name, info) in header {
        if name == "__metadata__" {
            continue;
        }
        let entry: HeaderEntry = serde_json::from_value(info)
            .with_context(|| format!("tensor {name} has a malformed header entry"))?;
        let dtype = safetensors_dtype(&entry.dtype)
            .with_context(|| format!("tensor {name} has dtype {}", entry.dtype))?;
        let [start, end] = entry.data_offsets;
        let bytes = entry.shape.iter().product::<usize>() as u64 * dtype.size_in_bytes() as u64;
        anyhow::ensure!(
            end >= start && end - start == bytes && data_start + end <= file_len,
            "tensor {name}'s byte range {start}..{end} does not fit its shape {:?} or the file",
            entry.shape
        );
        slots.push((
            name,
            TensorSlot {
                file: index,
                offset: data_start + start,
                dtype,
                shape: entry.shape,
            },
        ));
    }
    Ok(slots)
}

#[derive(serde::Deserialize)]
struct HeaderEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

/// The safetensors dtype names candle can hold.
fn safetensors_dtype(name: &str) -> Option<DType> {
    Some(match name {
        "F64" => DType::F64,
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "I64" => DType::I64,
        "U32" => DType::U32,
        "U8" => DType::U8,
        _ => return None,
    })
}

impl SimpleBackend for SafetensorsFiles {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.get_unchecked(name, dtype, device)?;
        if tensor.shape() != &shape {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: shape,
                got: tensor.shape().clone(),
            }
            .bt());
        }
        Ok(tensor)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.load(name, device)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
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
    use std::path::Path;

    use super::*;

    /// Our reader gives candle's reader's tensors, in the file's dtype and
    /// converted, from a sharded checkpoint.
    #[test]
    fn reads_the_same_tensors_as_candle() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/models/blip2-opt-tiny-legacy");
        let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        paths.sort();
        assert!(paths.len() >= 3);
        let ours = SafetensorsFiles::open(&paths).unwrap();
        let theirs = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&paths) }.unwrap();
        let names: Vec<String> = theirs.tensors().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names.len(), ours.tensors.len());
        for name in &names {
            let expected = theirs.load(name, &Device::Cpu).unwrap();
            for dtype in [DType::F32, DType::BF16] {
                let got = ours.get_unchecked(name, dtype, &Device::Cpu).unwrap();
                let want = expected.to_dtype(dtype).unwrap();
                assert_eq!(got.shape(), want.shape(), "{name}");
                let diff = (got.to_dtype(DType::F64).unwrap() - want.to_dtype(DType::F64).unwrap())
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                assert_eq!(diff, 0.0, "{name} {dtype:?}");
            }
        }
        let err = ours.load("no.such.tensor", &Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("no.such.tensor"), "{err}");
    }

    #[test]
    fn a_truncated_file_is_named_in_the_error() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/models/blip2-opt-tiny/model.safetensors");
        let bytes = std::fs::read(src).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cut = dir.path().join("model.safetensors");
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        let err = SafetensorsFiles::open(std::slice::from_ref(&cut))
            .err()
            .unwrap();
        let text = format!("{err:#}");
        assert!(
            text.contains("model.safetensors") && text.contains("does not fit"),
            "{text}"
        );
    }

    #[test]
    fn reads_both_dtype_keys() {
        let v5 = serde_json::json!({"dtype": "bfloat16"});
        let v4 = serde_json::json!({"torch_dtype": "float16"});
        assert_eq!(checkpoint_dtype(&v5), Some(DType::BF16));
        assert_eq!(checkpoint_dtype(&v4), Some(DType::F16));
        assert_eq!(checkpoint_dtype(&serde_json::json!({})), None);
    }
}
