//! Where each tensor of a `pytorch_model.bin` is, checked before anything is
//! read.
//!
//! `torch.save` (since torch 1.6) writes a zip archive: `<dir>/data.pkl`, a
//! pickle of the state dict in which each tensor is a call to
//! `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`
//! over a persistent id `("storage", torch.FloatStorage, key, location,
//! numel)`, and `<dir>/data/<key>`, each storage's raw little-endian bytes,
//! stored uncompressed. The pickle is read as data ([`super::pickle`]), and
//! every tensor's dtype, shape, strides and offset are checked against the
//! storage record the zip directory says is there: a file from any Hub
//! repository may claim a 550 GB tensor in a 1 MB archive, and must get an
//! error, not an allocation.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use anyhow::{bail, Context, Result};
use candle_core::DType;

use super::pickle::{Id, Object, Pickle};

/// One tensor whose bytes are known to lie inside its storage record.
#[derive(Debug)]
pub struct PthTensor {
    pub name: String,
    /// Where its first element is, from the start of the file.
    pub offset: u64,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Stored with its dimensions reversed (a transposed view, "Fortran
    /// order"): read with the shape reversed, then permuted back.
    pub column_major: bool,
}

/// The checkpoint's tensors: those we can read, and why we cannot read the
/// others (an error only if the model asks for one of them).
#[derive(Debug, Default)]
pub struct PthIndex {
    pub tensors: Vec<PthTensor>,
    pub unreadable: Vec<(String, String)>,
}

/// A state dict's pickle is a few hundred bytes per tensor (BLIP-2
/// OPT-6.7b's: under 1 MB); more than this is not a checkpoint.
const MAX_PICKLE_BYTES: u64 = 64 << 20;

/// An entry of the archive: where its bytes are, and whether they are the
/// entry's own (stored, as torch.save writes every entry) rather than
/// compressed or encrypted ones, which we do not read.
#[derive(Clone, Copy, Debug)]
struct Record {
    start: u64,
    len: u64,
    stored: bool,
}

/// Reads the archive's directory and pickle, and checks every tensor.
pub fn read_index(file: &File) -> Result<PthIndex> {
    let file_len = file.metadata()?.len();
    let records = read_records(file, file_len)?;
    // torch writes one `<dir>/data.pkl`; should a crafted file hold several,
    // the choice must not depend on hash order.
    let (dir, pickle_record) = records
        .iter()
        .filter_map(|(name, record)| {
            let dir = name.strip_suffix("data.pkl")?;
            (dir.is_empty() || dir.ends_with('/')).then_some((dir, *record))
        })
        .min_by_key(|(dir, _)| *dir)
        .context("the archive has no data.pkl (not a torch.save checkpoint)")?;
    anyhow::ensure!(
        pickle_record.stored,
        "its data.pkl is compressed or encrypted"
    );
    anyhow::ensure!(
        pickle_record.len <= MAX_PICKLE_BYTES,
        "its data.pkl claims {} bytes, more than the {} MiB a state dict needs",
        pickle_record.len,
        MAX_PICKLE_BYTES >> 20
    );
    check_byte_order(file, &records, dir)?;
    let pickle = read_bytes(file, pickle_record)?;
    let pickle = Pickle::parse(&pickle).context("reading data.pkl")?;
    let mut index = PthIndex::default();
    for (name, value) in state_dict(&pickle)? {
        let Some(args) = rebuild_args(&pickle, value) else {
            continue;
        };
        let info = TensorInfo::from_args(&pickle, args)
            .with_context(|| format!("tensor {name} has a malformed record"))?;
        match info.locate(&name, dir, &records)? {
            Ok(tensor) => index.tensors.push(tensor),
            Err(reason) => index.unreadable.push((name, reason)),
        }
    }
    Ok(index)
}

/// The zip directory: each stored entry's name and byte range, which must
/// lie inside the file.
fn read_records(file: &File, file_len: u64) -> Result<HashMap<String, Record>> {
    let mut archive = zip::ZipArchive::new(std::io::BufReader::new(file))
        .context("not a zip archive (checkpoints saved before torch 1.6 are not read)")?;
    let mut records = HashMap::with_capacity(archive.len());
    for index in 0..archive.len() {
        let entry = archive.by_index_raw(index)?;
        let name = entry.name()?.into_owned();
        let stored = entry.compression() == zip::CompressionMethod::Stored && !entry.encrypted();
        let start = entry.data_start().context("archive entry without data")?;
        let len = entry.compressed_size();
        anyhow::ensure!(
            start.checked_add(len).is_some_and(|end| end <= file_len),
            "archive entry {name} claims {len} bytes at {start}, past the end of the file"
        );
        records.insert(name, Record { start, len, stored });
    }
    Ok(records)
}

/// A record's bytes; its length was checked against the file and a cap.
fn read_bytes(mut file: &File, record: Record) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    file.seek(SeekFrom::Start(record.start))?;
    file.take(record.len).read_to_end(&mut bytes)?;
    anyhow::ensure!(
        bytes.len() as u64 == record.len,
        "an archive entry is cut short"
    );
    Ok(bytes)
}

/// The storages are little-endian, as we read them: torch records the
/// saving machine's byte order in `<dir>/byteorder` (older versions did not,
/// and were all little-endian in practice).
fn check_byte_order(file: &File, records: &HashMap<String, Record>, dir: &str) -> Result<()> {
    let Some(&record) = records.get(&format!("{dir}byteorder")) else {
        return Ok(());
    };
    let order = if record.stored && record.len <= 16 {
        read_bytes(file, record)?
    } else {
        Vec::new()
    };
    anyhow::ensure!(
        order == b"little",
        "its tensors are stored with byte order {:?}; caption reads \"little\"",
        String::from_utf8_lossy(&order)
    );
    Ok(())
}

/// The pickle's top-level dict, name by name. Entries whose key is not a
/// string cannot be asked for by name, and are left out.
fn state_dict(pickle: &Pickle) -> Result<Vec<(String, Id)>> {
    let Object::Dict(items) = pickle.get(pickle.root()) else {
        bail!("data.pkl holds no state dict (a dict of tensors)");
    };
    Ok(items
        .iter()
        .filter_map(|&(key, value)| Some((pickle.as_str(key)?.to_owned(), value)))
        .collect())
}

/// The arguments of the `_rebuild_tensor_v2(...)` call that `value` is,
/// seeing through the wrappers torch puts around parameters and tensor
/// subclasses; `None` for values that are not plain tensors (sparse and
/// quantized tensors, numbers), which the models never ask for.
fn rebuild_args(pickle: &Pickle, value: Id) -> Option<Id> {
    let Object::Call { callable, args } = pickle.get(value) else {
        return None;
    };
    let (mut callable, mut args) = (*callable, *args);
    // torch nests at most two wrappers; a longer chain is not a checkpoint
    // (and a loop, not recursion, so that no chain can exhaust the stack).
    for _ in 0..4 {
        match pickle.as_global(callable)? {
            ("torch._utils", "_rebuild_tensor_v2") => return Some(args),
            // _rebuild_parameter(data, requires_grad, backward_hooks)
            ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
                let data = *pickle.as_tuple(args)?.first()?;
                let Object::Call {
                    callable: c,
                    args: a,
                } = pickle.get(data)
                else {
                    return None;
                };
                (callable, args) = (*c, *a);
            }
            // _rebuild_from_type_v2(func, new_type, args, state) calls func(*args).
            ("torch._tensor", "_rebuild_from_type_v2") => {
                let wrapper = pickle.as_tuple(args)?;
                (callable, args) = (*wrapper.first()?, *wrapper.get(2)?);
            }
            _ => return None,
        }
    }
    None
}

/// `_rebuild_tensor_v2`'s arguments, as the pickle claims them.
struct TensorInfo {
    storage_class: String,
    storage_key: String,
    storage_numel: u64,
    offset: u64,
    shape: Vec<u64>,
    stride: Vec<u64>,
}

impl TensorInfo {
    /// `_rebuild_tensor_v2(storage, storage_offset, size, stride, ...)`.
    fn from_args(pickle: &Pickle, args: Id) -> Result<Self> {
        let args = pickle.as_tuple(args).context("arguments are not a tuple")?;
        let [storage, offset, size, stride, ..] = args else {
            bail!("{} arguments where torch writes at least 4", args.len());
        };
        let Object::PersistentId(storage) = pickle.get(*storage) else {
            bail!("its storage is not a persistent id");
        };
        // ("storage", storage_type, key, location, numel)
        let storage = pickle
            .as_tuple(*storage)
            .context("storage id is not a tuple")?;
        let [_, class, key, _, numel, ..] = storage else {
            bail!("storage id of {} items where torch writes 5", storage.len());
        };
        let (_, class) = pickle
            .as_global(*class)
            .context("storage type is not a class")?;
        Ok(Self {
            storage_class: class.to_owned(),
            storage_key: pickle
                .as_str(*key)
                .context("storage key is not a string")?
                .to_owned(),
            storage_numel: count(pickle, *numel, "storage size")?,
            offset: count(pickle, *offset, "storage offset")?,
            shape: counts(pickle, *size, "size")?,
            stride: counts(pickle, *stride, "stride")?,
        })
    }

    /// Checks the claims against the storage record (the outer error: the
    /// file is damaged) and says whether we can read the tensor (the inner
    /// one: a dtype or layout we do not read).
    fn locate(
        &self,
        name: &str,
        dir: &str,
        records: &HashMap<String, Record>,
    ) -> Result<std::result::Result<PthTensor, String>> {
        let Some(dtype) = storage_dtype(&self.storage_class) else {
            return Ok(Err(format!(
                "tensor {name} is stored as {}, which caption does not read",
                self.storage_class
            )));
        };
        anyhow::ensure!(
            self.shape.len() == self.stride.len(),
            "tensor {name} has {} dimensions but {} strides",
            self.shape.len(),
            self.stride.len()
        );
        let record_name = format!("{dir}data/{}", self.storage_key);
        let record = *records.get(&record_name).with_context(|| {
            format!("tensor {name}'s storage {record_name} is not in the archive")
        })?;
        anyhow::ensure!(
            record.stored,
            "tensor {name}'s storage {record_name} is compressed or encrypted"
        );
        let elements = self.check_extent(name, dtype, record)?;
        let Some(column_major) = self.order(elements) else {
            return Ok(Err(format!(
                "tensor {name} is a strided view (size {:?}, stride {:?}), which caption does not read",
                self.shape, self.stride
            )));
        };
        // check_extent proved offset·size + elements·size <= record.len for
        // a dense layout; an empty tensor reads nothing, wherever it claims to be.
        let offset = match elements {
            0 => 0,
            _ => self.offset * dtype.size_in_bytes() as u64,
        };
        Ok(Ok(PthTensor {
            name: name.to_owned(),
            offset: record.start + offset,
            dtype,
            shape: self.shape.iter().map(|&d| d as usize).collect(),
            column_major,
        }))
    }

    /// Every element the shape, strides and offset reach lies inside the
    /// storage, and the storage inside its record; all in checked
    /// arithmetic, since every number here is the file's claim. Returns
    /// the element count.
    fn check_extent(&self, name: &str, dtype: DType, record: Record) -> Result<u64> {
        let size = dtype.size_in_bytes() as u64;
        let elements = self.shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d));
        let Some(elements) = elements.filter(|n| n.checked_mul(size).is_some()) else {
            bail!(
                "tensor {name} claims a shape {:?} of more bytes than 64 bits count",
                self.shape
            );
        };
        let storage_bytes = self.storage_numel.checked_mul(size);
        if storage_bytes.is_none_or(|bytes| bytes > record.len) {
            bail!(
                "tensor {name}'s storage claims {} elements of {dtype:?} but its record holds {} bytes",
                self.storage_numel,
                record.len
            );
        }
        if elements == 0 {
            return Ok(0);
        }
        // The last element a strided view reaches: offset + Σ (dim - 1)·stride.
        let last = self
            .shape
            .iter()
            .zip(&self.stride)
            .try_fold(self.offset, |last, (&d, &s)| {
                (d - 1).checked_mul(s)?.checked_add(last)
            });
        if last.is_none_or(|last| last >= self.storage_numel) {
            bail!(
                "tensor {name} claims {elements} elements of {dtype:?} (shape {:?}, offset {}) but its storage holds {} bytes",
                self.shape,
                self.offset,
                record.len
            );
        }
        Ok(elements)
    }

    /// `Some(false)` for a row-major (contiguous) layout, `Some(true)` for
    /// a column-major one, `None` for any other strides.
    fn order(&self, elements: u64) -> Option<bool> {
        let dims = || self.shape.iter().zip(&self.stride);
        if elements <= 1 || dense(dims().rev()) {
            Some(false)
        } else if dense(dims()) {
            Some(true)
        } else {
            None
        }
    }
}

/// Whether `(size, stride)` pairs, innermost first, lay the elements out
/// one after another. Dimensions of size 1 may have any stride, as in
/// torch's own `is_contiguous`.
fn dense<'a>(mut dims: impl Iterator<Item = (&'a u64, &'a u64)>) -> bool {
    let mut expected = 1u64;
    dims.all(|(&size, &stride)| {
        let ok = size == 1 || stride == expected;
        expected = expected.saturating_mul(size);
        ok
    })
}

/// A non-negative integer from the pickle.
fn count(pickle: &Pickle, id: Id, what: &str) -> Result<u64> {
    pickle
        .as_int(id)
        .and_then(|n| u64::try_from(n).ok())
        .with_context(|| format!("its {what} is not a non-negative integer"))
}

/// A tuple of non-negative integers from the pickle (a size or a stride).
fn counts(pickle: &Pickle, id: Id, what: &str) -> Result<Vec<u64>> {
    let items = pickle
        .as_tuple(id)
        .with_context(|| format!("its {what} is not a tuple"))?;
    items
        .iter()
        .map(|&item| count(pickle, item, what))
        .collect()
}

/// The storage classes of the dtypes candle holds.
fn storage_dtype(class: &str) -> Option<DType> {
    Some(match class {
        "FloatStorage" => DType::F32,
        "DoubleStorage" => DType::F64,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        "ByteStorage" => DType::U8,
        "LongStorage" => DType::I64,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `torch.save(model.state_dict())` pickles an OrderedDict whose
    /// `_metadata` attribute comes after its items (BUILD): the entries are
    /// the items, the attribute is not one. Bytes from Python's
    /// `pickle.dumps(od, protocol=2)`, with two int values standing in for
    /// tensors.
    #[test]
    fn an_ordered_dict_with_metadata_is_a_state_dict() {
        let bytes = b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01(X\x08\x00\x00\x00a.weightq\x02K\x01X\x06\x00\x00\x00b.biasq\x03K\x02u}q\x04X\t\x00\x00\x00_metadataq\x05h\x00)Rq\x06X\x00\x00\x00\x00q\x07}q\x08X\x07\x00\x00\x00versionq\tK\x01sssb.";
        let pickle = Pickle::parse(bytes).unwrap();
        let names: Vec<String> = state_dict(&pickle)
            .unwrap()
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        assert_eq!(names, ["a.weight", "b.bias"]);
    }
}
