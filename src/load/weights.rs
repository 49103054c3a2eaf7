//! Checkpoint files → a candle `VarBuilder`.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use super::pytorch;
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
            let files = CheckpointFiles::open_safetensors(paths)?;
            Ok(VarBuilder::from_backend(
                Box::new(files),
                dtype,
                device.clone(),
            ))
        }
        // Not candle's `VarBuilder::from_pth`: its reader allocates a tensor
        // from the shape the pickle claims before comparing it with the file
        // (a 550 GB claim aborted the process), and panics on short records.
        WeightFiles::PytorchBin(path) => {
            let files = CheckpointFiles::open_pytorch(path)
                .with_context(|| format!("reading PyTorch weights {}", path.display()))?;
            Ok(VarBuilder::from_backend(
                Box::new(files),
                dtype,
                device.clone(),
            ))
        }
    }
}

/// The name and shape of every tensor the files hold, from their headers
/// (safetensors) or pickles, without reading any tensor's data.
pub fn tensor_shapes(weights: &WeightFiles) -> Result<Vec<(String, Vec<usize>)>> {
    let files = match weights {
        WeightFiles::Safetensors(paths) => CheckpointFiles::open_safetensors(paths)?,
        WeightFiles::PytorchBin(path) => CheckpointFiles::open_pytorch(path)?,
    };
    Ok(files
        .tensors
        .into_iter()
        .map(|(name, slot)| (name, slot.shape))
        .collect())
}

/// Reads every tensor the files hold (as F32, as a model would ask), and
/// says how many could be read: the fuzz target's way through the reader,
/// having no model to ask for tensors by name.
#[doc(hidden)]
pub fn read_every_tensor(weights: &WeightFiles) -> Result<usize> {
    let files = match weights {
        WeightFiles::Safetensors(paths) => CheckpointFiles::open_safetensors(paths)?,
        WeightFiles::PytorchBin(path) => CheckpointFiles::open_pytorch(path)?,
    };
    let names = files.tensors.keys().chain(files.unreadable.keys());
    Ok(names
        .filter(|name| files.get_unchecked(name, DType::F32, &Device::Cpu).is_ok())
        .count())
}

/// Checkpoint files read tensor by tensor, with plain reads, from where
/// their headers (safetensors) or pickles (`pytorch_model.bin`) say each
/// tensor is; every such place is checked against the file when it is
/// opened, so no claim in a damaged or hostile file is ever allocated.
///
/// candle's `MmapedSafetensors` maps the files and copies each tensor out of
/// the map; the pages it touched stay counted in the process's memory until
/// the map goes, so loading a 15 GB checkpoint peaked at the file plus the
/// model (20 GB RSS for BLIP-2 OPT-2.7b in bf16, measured). Reading each
/// tensor into its own buffer instead peaks at the model plus one tensor.
struct CheckpointFiles {
    files: Vec<(PathBuf, Mutex<File>)>,
    tensors: HashMap<String, TensorSlot>,
    /// Tensors in a dtype or layout we do not read, and why: an error only
    /// if the model asks for one.
    unreadable: HashMap<String, String>,
}

/// Where one tensor's bytes are: which file, at what offset, and its layout.
struct TensorSlot {
    file: usize,
    offset: u64,
    dtype: DType,
    shape: Vec<usize>,
    /// Stored with its dimensions reversed (a transposed tensor saved by
    /// torch): read with the shape reversed, then permuted back.
    column_major: bool,
}

impl CheckpointFiles {
    fn open_safetensors(paths: &[PathBuf]) -> Result<Self> {
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
        Ok(Self {
            files,
            tensors,
            unreadable: HashMap::new(),
        })
    }

    fn open_pytorch(path: &Path) -> Result<Self> {
        let file = File::open(path)?;
        let index = pytorch::read_index(&file)?;
        let tensors = index
            .tensors
            .into_iter()
            .map(|tensor| {
                let slot = TensorSlot {
                    file: 0,
                    offset: tensor.offset,
                    dtype: tensor.dtype,
                    shape: tensor.shape,
                    column_major: tensor.column_major,
                };
                (tensor.name, slot)
            })
            .collect();
        Ok(Self {
            files: vec![(path.to_path_buf(), Mutex::new(file))],
            tensors,
            unreadable: index
                .unreadable
                .into_iter()
                .map(|(name, reason)| (name, format!("{}: {reason}", path.display())))
                .collect(),
        })
    }

    fn load(&self, name: &str, device: &Device) -> candle_core::Result<Tensor> {
        if let Some(reason) = self.unreadable.get(name) {
            return Err(candle_core::Error::Msg(reason.clone()));
        }
        let slot = self
            .tensors
            .get(name)
            .ok_or_else(|| candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            })?;
        if slot.column_major {
            return self.load_column_major(name, slot, device);
        }
        self.read(name, slot, &slot.shape, device)
    }

    /// A transposed tensor: its storage is the reversed shape, row-major.
    fn load_column_major(
        &self,
        name: &str,
        slot: &TensorSlot,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let reversed: Vec<usize> = slot.shape.iter().rev().copied().collect();
        let dims: Vec<usize> = (0..slot.shape.len()).rev().collect();
        self.read(name, slot, &reversed, device)?.permute(dims)
    }

    /// Reads `slot`'s bytes as a row-major tensor of `shape`; the open
    /// checked that they lie inside the file.
    fn read(
        &self,
        name: &str,
        slot: &TensorSlot,
        shape: &[usize],
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let (path, file) = &self.files[slot.file];
        let count = shape.iter().product::<usize>();
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
        // (both formats are little-endian, like the machines we run on): one
        // allocation and one copy from the page cache, where going through
        // a byte buffer took two of each (BLIP-base, 896 MB of f32: load 0.77 -> 0.55 s).
        match slot.dtype {
            DType::F32 if cfg!(target_endian = "little") => {
                read_floats(vec![0f32; count], read, shape, device)
            }
            DType::F16 if cfg!(target_endian = "little") => {
                read_floats(vec![half::f16::ZERO; count], read, shape, device)
            }
            DType::BF16 if cfg!(target_endian = "little") => {
                read_floats(vec![half::bf16::ZERO; count], read, shape, device)
            }
            dtype => {
                let mut buffer = vec![0u8; count * dtype.size_in_bytes()];
                read(&mut buffer)?;
                Tensor::from_raw_buffer(&buffer, dtype, shape, device)
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
    let header = read_header_json(file, file_len)?;
    let data_start = 8 + header.len() as u64;
    let header: HashMap<String, serde_json::Value> =
        serde_json::from_slice(&header).context("the header is not JSON")?;
    let mut slots = Vec::with_capacity(header.len());
    let mut ranges = Vec::with_capacity(header.len());
    for (name, info) in header {
        if name == "__metadata__" {
            continue;
        }
        let (range, dtype, shape) = header_entry(&name, info, file_len - data_start)?;
        let slot = TensorSlot {
            file: index,
            offset: data_start + range.start,
            dtype,
            shape,
            column_major: false,
        };
        ranges.push((range, name.clone()));
        slots.push((name, slot));
    }
    check_no_overlaps(&mut ranges)?;
    Ok(slots)
}

/// A header larger than this is no checkpoint's (BLIP-2 OPT-6.7b's, some
/// 1,000 tensors, is under 200 KB), and would be read whole into memory.
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// The header's JSON bytes, once its claimed length is known to be sane.
fn read_header_json(file: &mut File, file_len: u64) -> Result<Vec<u8>> {
    let mut len = [0u8; 8];
    file.read_exact(&mut len).context("no header")?;
    let header_len = u64::from_le_bytes(len);
    anyhow::ensure!(
        header_len <= MAX_HEADER_BYTES,
        "its header claims {header_len} bytes, more than the {} MB a header may have",
        MAX_HEADER_BYTES >> 20
    );
    anyhow::ensure!(
        header_len + 8 <= file_len,
        "the header runs past the end of the file"
    );
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header)?;
    Ok(header)
}

/// One tensor's header entry, checked: a dtype we read, a byte range inside
/// the data region (`data_len` bytes) that holds exactly shape × dtype size.
/// Every number is the file's claim, so the arithmetic is checked.
fn header_entry(
    name: &str,
    info: serde_json::Value,
    data_len: u64,
) -> Result<(std::ops::Range<u64>, DType, Vec<usize>)> {
    let entry: HeaderEntry = serde_json::from_value(info)
        .with_context(|| format!("tensor {name} has a malformed header entry"))?;
    let dtype = safetensors_dtype(&entry.dtype)
        .with_context(|| format!("tensor {name} has dtype {}", entry.dtype))?;
    let [start, end] = entry.data_offsets;
    anyhow::ensure!(
        start <= end && end <= data_len,
        "tensor {name}'s byte range {start}..{end} does not fit the file's {data_len} bytes of data"
    );
    let bytes = entry
        .shape
        .iter()
        .try_fold(dtype.size_in_bytes() as u64, |n, &d| {
            n.checked_mul(d as u64)
        });
    anyhow::ensure!(
        bytes == Some(end - start),
        "tensor {name} claims shape {:?} of {dtype:?} but its byte range {start}..{end} does not fit it ({} bytes)",
        entry.shape,
        end - start
    );
    Ok((start..end, dtype, entry.shape))
}

/// No two tensors share bytes: a file whose tensors alias each other is
/// damaged or crafted (safetensors itself refuses to write one).
fn check_no_overlaps(ranges: &mut [(std::ops::Range<u64>, String)]) -> Result<()> {
    ranges.sort_by_key(|(range, _)| (range.start, range.end));
    // Sorted by start, two ranges overlap only if some neighbours do.
    let mut nonempty = ranges.iter().filter(|(range, _)| !range.is_empty());
    let Some(mut previous) = nonempty.next() else {
        return Ok(());
    };
    for next in nonempty {
        anyhow::ensure!(
            next.0.start >= previous.0.end,
            "tensors {} and {} overlap (bytes {:?} and {:?})",
            previous.1,
            next.1,
            previous.0,
            next.0
        );
        previous = next;
    }
    Ok(())
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

impl SimpleBackend for CheckpointFiles {
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
        self.tensors.contains_key(name) || self.unreadable.contains_key(name)
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
        let ours = CheckpointFiles::open_safetensors(&paths).unwrap();
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
        let err = CheckpointFiles::open_safetensors(std::slice::from_ref(&cut))
            .err()
            .unwrap();
        let text = format!("{err:#}");
        assert!(
            text.contains("model.safetensors") && text.contains("does not fit"),
            "{text}"
        );
    }

    /// Our `.bin` reader gives candle's reader's tensors on an undamaged file.
    #[test]
    fn reads_the_same_pytorch_tensors_as_candle() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/models/blip-tiny-bin/pytorch_model.bin");
        let ours = CheckpointFiles::open_pytorch(&path).unwrap();
        let theirs = candle_core::pickle::read_all(&path).unwrap();
        assert_eq!(ours.tensors.len(), theirs.len());
        assert!(ours.unreadable.is_empty());
        for (name, want) in &theirs {
            let got = ours.load(name, &Device::Cpu).unwrap();
            assert_eq!(got.shape(), want.shape(), "{name}");
            assert_eq!(got.dtype(), want.dtype(), "{name}");
            let diff = (got.to_dtype(DType::F64).unwrap() - want.to_dtype(DType::F64).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert_eq!(diff, 0.0, "{name}");
        }
    }

    /// A one-tensor `pytorch_model.bin` as torch.save writes it: `t`, of
    /// storage class `class`, shape (2, 3) with `stride`, over the six
    /// values 0..6.
    fn tiny_bin(dir: &Path, class: &str, stride: [u8; 2]) -> PathBuf {
        use std::io::Write;
        let mut pickle = b"\x80\x02}(X\x01\x00\x00\x00tctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\n".to_vec();
        pickle.extend_from_slice(class.as_bytes());
        pickle.extend_from_slice(
            b"\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x06tQK\x00K\x02K\x03\x86K",
        );
        pickle.extend_from_slice(&[stride[0], b'K', stride[1], 0x86]);
        pickle.extend_from_slice(b"\x89ccollections\nOrderedDict\n)RtRu.");
        let values: Vec<u8> = (0..6).flat_map(|v| (v as f32).to_le_bytes()).collect();
        let path = dir.join("pytorch_model.bin");
        let mut zip = zip::ZipWriter::new(File::create(&path).unwrap());
        let stored = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        zip.start_file("archive/data.pkl", stored).unwrap();
        zip.write_all(&pickle).unwrap();
        zip.start_file("archive/data/0", stored).unwrap();
        zip.write_all(&values).unwrap();
        zip.finish().unwrap();
        path
    }

    /// A transposed tensor (column-major strides) reads as candle reads it.
    #[test]
    fn reads_a_column_major_pytorch_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let path = tiny_bin(dir.path(), "FloatStorage", [1, 2]);
        let got = CheckpointFiles::open_pytorch(&path)
            .unwrap()
            .load("t", &Device::Cpu)
            .unwrap();
        let values = got.to_vec2::<f32>().unwrap();
        assert_eq!(values, [[0.0, 2.0, 4.0], [1.0, 3.0, 5.0]]);
        let theirs = candle_core::pickle::read_all(&path).unwrap();
        assert_eq!(theirs[0].1.to_vec2::<f32>().unwrap(), values);
    }

    /// A dtype or a layout we do not read opens, and is an error naming the
    /// tensor only when asked for; nothing is allocated for it.
    #[test]
    fn an_unreadable_pytorch_tensor_is_an_error_when_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        for (class, stride, reason) in [
            ("BoolStorage", [3, 1], "stored as BoolStorage"),
            ("FloatStorage", [2, 0], "strided view"),
        ] {
            let path = tiny_bin(dir.path(), class, stride);
            let files = CheckpointFiles::open_pytorch(&path).unwrap();
            assert!(files.contains_tensor("t"));
            let err = files.load("t", &Device::Cpu).unwrap_err().to_string();
            assert!(err.contains("tensor t") && err.contains(reason), "{err}");
        }
    }

    /// A safetensors file of `header` followed by `data_len` zero bytes.
    fn safetensors_file(dir: &Path, header: &serde_json::Value, data_len: usize) -> PathBuf {
        let header = serde_json::to_vec(header).unwrap();
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(&header);
        bytes.resize(bytes.len() + data_len, 0);
        let path = dir.join("model.safetensors");
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn f32_entry(shape: serde_json::Value, start: u64, end: u64) -> serde_json::Value {
        serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [start, end]})
    }

    /// Each lie a header can tell about where a tensor is: refused with the
    /// file and the reason, before anything is read or allocated from it.
    #[test]
    fn safetensors_headers_that_lie_are_refused() {
        use serde_json::json;
        let dir = tempfile::tempdir().unwrap();
        let huge = json!([1u64 << 32, 1u64 << 32, 1u64 << 32]);
        let cases = [
            (
                "past the end",
                json!({"a": f32_entry(json!([4]), 0, 16)}),
                8,
                "does not fit the file",
            ),
            (
                "overflowing range",
                json!({"a": f32_entry(json!([2]), u64::MAX - 8, u64::MAX)}),
                8,
                "does not fit the file",
            ),
            (
                "begin after end",
                json!({"a": f32_entry(json!([4]), 8, 4)}),
                16,
                "does not fit the file",
            ),
            (
                "length mismatch",
                json!({"a": f32_entry(json!([4]), 0, 12)}),
                16,
                "does not fit it",
            ),
            (
                "overflowing shape",
                json!({"a": f32_entry(huge, 0, 0)}),
                16,
                "does not fit it",
            ),
            (
                "overlap",
                json!({"a": f32_entry(json!([4]), 0, 16), "b": f32_entry(json!([4]), 8, 24)}),
                24,
                "overlap",
            ),
            (
                "dtype",
                json!({"a": {"dtype": "BOOL", "shape": [1], "data_offsets": [0, 1]}}),
                1,
                "dtype BOOL",
            ),
        ];
        for (what, header, data_len, reason) in cases {
            let path = safetensors_file(dir.path(), &header, data_len);
            let err = CheckpointFiles::open_safetensors(&[path]).err();
            let text = format!("{:#}", err.unwrap_or_else(|| panic!("{what}: accepted")));
            assert!(text.contains("model.safetensors"), "{what}: {text}");
            assert!(
                text.contains(reason) && text.contains("tensor"),
                "{what}: {text}"
            );
        }
    }

    /// Tensors that touch, and empty ones anywhere, share no bytes.
    #[test]
    fn adjacent_and_empty_safetensors_tensors_are_not_overlaps() {
        use serde_json::json;
        let dir = tempfile::tempdir().unwrap();
        let header = json!({
            "a": f32_entry(json!([4]), 0, 16),
            "b": f32_entry(json!([2]), 16, 24),
            "empty_inside_a": f32_entry(json!([0]), 4, 4),
            "empty_at_end": f32_entry(json!([2, 0]), 24, 24),
        });
        let path = safetensors_file(dir.path(), &header, 24);
        let files = CheckpointFiles::open_safetensors(&[path]).unwrap();
        let empty = files.load("empty_inside_a", &Device::Cpu).unwrap();
        assert_eq!(empty.dims(), [0]);
        assert_eq!(files.load("b", &Device::Cpu).unwrap().dims(), [2]);
    }

    /// A header length of 200 MB inside a (sparse) file that long is
    /// refused before 200 MB is allocated to read it.
    #[test]
    fn a_huge_safetensors_header_is_refused_unread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let claimed: u64 = 200 << 20;
        std::fs::write(&path, claimed.to_le_bytes()).unwrap();
        let file = File::options().write(true).open(&path).unwrap();
        file.set_len(claimed + 8).unwrap();
        let err = CheckpointFiles::open_safetensors(&[path]).err().unwrap();
        let text = format!("{err:#}");
        assert!(
            text.contains("model.safetensors") && text.contains("header claims 209715200 bytes"),
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
