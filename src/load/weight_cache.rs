//! The pack cache: linear-layer weights packed for our CPU kernels (or
//! quantized, under `--quantize`), saved once and mapped read-only by every
//! later run.
//!
//! Packing itself is cheap; the memory it fills is not. Every packed byte
//! lands on a fresh page the kernel must zero, and on the VMs we measure on
//! first-touch zeroing runs at 0.4-2 GB/s: it was 65% of BLIP-base's load
//! (perf, Zen 4). A cache file's pages are already in the page cache, so
//! mapping it costs page-table entries only: BLIP-base loads in 0.1 s
//! instead of 0.5-0.7 s, and processes running at once share one copy.
//! q8_0 layers packed for our VNNI kernel are mapped in place like the
//! rest; candle's quantized blocks (q4_K, and q8_0 where our kernel does
//! not run) are copied out of the file (candle's quantized tensors own
//! their storage), which still saves the quantizing: 2.4 s of k-quants
//! search for BLIP-base at q4_K.
//!
//! A file holds every packed layer of one model, loaded at one dtype with
//! one quantization setting, and says which source files (path, size,
//! modification time), which config and which kernels it was packed from;
//! a file that disagrees with the model being loaded, or is damaged, is
//! ignored and written anew. Damage inside the data, which the header
//! cannot show, is caught by a checksum of each layer's bytes (xxh3,
//! recorded when the file is written, checked when it is opened: a damaged
//! layer would otherwise give wrong answers on every run until the file is
//! deleted). The run that writes a file packs its layers
//! straight into it (see `panels::PanelFile`): the file's pages are
//! that run's panels, so saving costs no second copy of the weights. Files
//! are completed under a temporary name, flushed to disk, and renamed into
//! place (the folder flushed after), so neither a reader nor a power loss
//! leaves half of one under the cache's name, and are
//! never changed in place (a file changed under a mapping would change the
//! weights of a running model).
//!
//! Layout: `MAGIC`, [`FORMAT`] (u32 LE), then each matrix's panel bytes and
//! bias at page-aligned offsets, then the JSON header (what each layer is,
//! where its bytes lie, and their checksum), then the header's
//! offset and length (u64 LE each) and `MAGIC` again.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use caption_kernels::bf16_panels::{Bf16Panels, PackedMatrixBf16};
use caption_kernels::gemm_f32::{F32Panels, PackedMatrix};
use caption_kernels::gemm_q8::{PackedMatrixQ8, Q8Panels};
use caption_kernels::{PackedLinear, PanelFile};

pub use super::pack_folder::remove_temp_files;
use super::pack_folder::{
    disk_space, evict_least_recently_used, leaves_room, remove_abandoned_temp_files, reserve,
    ListedTempFile, ABANDONED_AFTER, TEMP_PREFIX,
};
use super::{regular_file, watched_map};

const MAGIC: &[u8; 8] = b"CAPTPACK";
/// Bumped whenever a kernel's panel layout, or this file's, changes.
/// 2: each entry's checksum.
const FORMAT: u32 = 2;
/// Where each matrix starts: a page, so the mapping's rows are aligned.
const ALIGN: u64 = 4096;
/// Header offset, header length, magic.
const TRAILER: u64 = 8 + 8 + 8;

/// The pack cache of one model being loaded: the packed layers a valid
/// file holds, and the ones packed afresh, to be written by [`Self::finish`].
pub struct WeightCache {
    path: PathBuf,
    identity: String,
    file: Option<CacheFile>,
    /// Why an existing file could not be used.
    rejected: Option<String>,
    state: Mutex<State>,
    /// The file being written, made when the first layer is packed without
    /// the cache (`None` inside: it could not be made).
    writing: std::sync::OnceLock<Option<Writing>>,
    /// What the folder's packs may take together ([`Self::with_size_limit`]).
    size_limit: u64,
}

/// The folder's default size limit: a few models at a few settings
/// (BLIP-base f32 packs to 0.9 GB, BLIP-2 OPT-2.7b bf16 to 7 GB).
pub const DEFAULT_SIZE_LIMIT: u64 = 20 << 30;

/// A cache file in the making: a temporary file beside the cache's path
/// that layers are packed into, renamed there once whole.
struct Writing {
    file: Arc<PanelFile>,
    temp: Mutex<Option<tempfile::TempPath>>,
    _listed: ListedTempFile,
}

struct CacheFile {
    map: Arc<memmap2::Mmap>,
    entries: HashMap<String, Entry>,
}

#[derive(Default)]
struct State {
    /// Every packed layer of this load, in load order, from the file or packed now.
    layers: Vec<(String, PackedLayer)>,
    /// Whether any layer had to be packed now.
    packed_now: bool,
}

/// One linear layer's weight as the kernels hold it, and its bias: what
/// the cache saves and gives back.
#[derive(Clone)]
pub enum PackedLayer {
    F32(Arc<PackedLinear<F32Panels>>),
    Bf16(Arc<PackedLinear<Bf16Panels>>),
    Q8(Arc<PackedLinear<Q8Panels>>),
    /// `--quantize`: candle's blocks (copied out of the file: candle's
    /// quantized tensors own their storage), the bias beside them.
    Blocks {
        weight: Arc<QTensor>,
        bias: Option<Tensor>,
    },
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Header {
    identity: String,
    entries: Vec<Entry>,
}

#[derive(serde::Serialize, serde::Deserialize, Clone)]
struct Entry {
    name: String,
    kind: Kind,
    /// Output and input widths: the weight is `[n, k]`.
    n: usize,
    k: usize,
    /// Byte ranges in the file.
    panels: [u64; 2],
    bias: Option<[u64; 2]>,
    /// [`checksum`] of the panel and bias bytes.
    xxh3: u64,
}

#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Kind {
    F32,
    Bf16,
    /// candle's q8_0 blocks, where [`gemm_q8`](super::gemm_q8) does not run.
    Q8_0,
    Q4K,
    /// q8_0 packed for [`gemm_q8`](super::gemm_q8)'s kernel.
    #[serde(rename = "q8_0-panels")]
    Q8_0Panels,
}

impl Entry {
    /// Whether the entry's bytes in `map` have its checksum (false when
    /// they do not lie in it).
    fn intact(&self, map: &[u8]) -> bool {
        let bytes = |[start, end]: [u64; 2]| {
            map.get(usize::try_from(start).ok()?..usize::try_from(end).ok()?)
        };
        let panels = bytes(self.panels);
        let bias = match self.bias {
            Some(range) => bytes(range),
            None => Some(&[][..]),
        };
        matches!((panels, bias), (Some(panels), Some(bias)) if checksum(panels, bias) == self.xxh3)
    }
}

/// A layer's checksum: xxh3 (64 bits) of the xxh3 of its panel bytes and
/// that of its bias's. xxh3 because it runs at memory bandwidth (checking
/// costs a fraction of the load it guards) and catches any few changed
/// bytes; it is no defence against someone forging a file, who needs
/// write access to the cache anyway.
fn checksum(panels: &[u8], bias: &[u8]) -> u64 {
    use xxhash_rust::xxh3::xxh3_64;
    let parts = [xxh3_64(panels), xxh3_64(bias)];
    xxh3_64(&parts.map(u64::to_le_bytes).concat())
}

/// What [`WeightCache::finish`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every packed layer came from this file.
    Used(PathBuf),
    /// The file was written; `replaced` says why an existing one was not used.
    Written {
        path: PathBuf,
        bytes: u64,
        replaced: Option<String>,
    },
    /// No layer was packed or quantized: nothing to save.
    NothingPacked,
}

/// What the packed weights are packed from: a file made from anything
/// else is not used.
pub struct Source<'a> {
    /// Which model this is (a Hub repository id, a folder's full path):
    /// names the file, one per model and settings.
    pub label: &'a str,
    pub weights: &'a [PathBuf],
    pub config_json: &'a str,
    /// The dtype, quantization and kernels: anything else that changes
    /// which layers are packed, or how.
    pub settings: &'a str,
}

impl std::fmt::Debug for WeightCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WeightCache({})", self.path.display())
    }
}

impl WeightCache {
    /// The cache for `source` in folder `dir`, with the file found there if
    /// it is whole and made from the same source; a missing or unusable file
    /// is written anew by [`Self::finish`]. Fails only where the weight
    /// files cannot be read.
    pub fn open(dir: &Path, source: &Source) -> Result<Self> {
        let identity = identity(source)?;
        let path = dir.join(file_name(source));
        let opened = CacheFile::open(&path, &identity)
            .and_then(|file| file.map(|file| file.verified(&path)).transpose());
        let (file, rejected) = match opened {
            Ok(file) => (file, None),
            Err(err) => (None, Some(format!("{err:#}"))),
        };
        Ok(Self {
            path,
            identity,
            file,
            rejected,
            state: Mutex::default(),
            writing: std::sync::OnceLock::new(),
            size_limit: DEFAULT_SIZE_LIMIT,
        })
    }

    /// Keeps the folder's packs under `bytes` together: after each load,
    /// the least recently used others are deleted until they fit (the one
    /// this load uses always stays, whatever its size). A pack another run
    /// has mapped is unaffected by its deletion (its pages stay until that
    /// run ends).
    pub fn with_size_limit(mut self, bytes: u64) -> Self {
        self.size_limit = bytes;
        self
    }

    /// The layer `name` (its weight tensor's name), `[n, k]`, in a model
    /// of `dtype`, when the file holds it.
    pub fn layer(&self, name: &str, n: usize, k: usize, dtype: DType) -> Option<PackedLayer> {
        let file = self.file.as_ref()?;
        let entry = file.entries.get(name)?;
        if (entry.n, entry.k) != (n, k) {
            return None;
        }
        let packed = file.packed(entry, dtype)?;
        self.state().layers.push((name.to_string(), packed.clone()));
        Some(packed)
    }

    /// Where layers packed now should go: the file being written, when
    /// there was no usable cache file (after a partial hit, layers missing
    /// from the file pack into memory and are copied at the end).
    pub fn panel_file(&self) -> Option<&Arc<PanelFile>> {
        if self.file.is_some() {
            return None;
        }
        self.writing().map(|writing| &writing.file)
    }

    fn writing(&self) -> Option<&Writing> {
        self.writing
            .get_or_init(|| Writing::new(self.path.parent()?).ok())
            .as_ref()
    }

    /// Whether the file holds layer `name` packed for our kernels (not
    /// quantized): a table tied to it can be read out of it.
    pub fn holds_packed(&self, name: &str) -> bool {
        self.file
            .as_ref()
            .and_then(|file| file.entries.get(name))
            .is_some_and(|entry| matches!(entry.kind, Kind::F32 | Kind::Bf16))
    }

    /// Offers a layer loaded without the cache: a packed or quantized one
    /// is saved by [`Self::finish`].
    pub fn remember(&self, name: &str, packed: PackedLayer) {
        let mut state = self.state();
        state.layers.push((name.to_string(), packed));
        state.packed_now = true;
    }

    /// Saves the layers packed during this load, unless the file already
    /// held them all.
    pub fn finish(&self) -> Result<Outcome> {
        let state = self.state();
        if state.layers.is_empty() {
            return Ok(Outcome::NothingPacked);
        }
        if !state.packed_now {
            evict_least_recently_used(&self.path, self.size_limit);
            return Ok(Outcome::Used(self.path.clone()));
        }
        let replaced = match (&self.file, &self.rejected) {
            (Some(_), _) => Some("it lacked layers this model has".to_string()),
            (None, Some(reason)) if self.path.exists() => Some(reason.clone()),
            (None, _) => None,
        };
        let bytes = match self.writing() {
            Some(writing) => write(&self.path, &self.identity, &state.layers, writing),
            None => Writing::new(self.path.parent().context("the cache file has no folder")?)
                .and_then(|writing| write(&self.path, &self.identity, &state.layers, &writing)),
        }
        .with_context(|| format!("writing the pack cache {}", self.path.display()))?;
        evict_least_recently_used(&self.path, self.size_limit);
        Ok(Outcome::Written {
            path: self.path.clone(),
            bytes,
            replaced,
        })
    }

    /// Each layer of this load and where its panels lie in the file being
    /// written (`None` when they are not in it): for the tests of packing
    /// straight into that file.
    #[cfg(test)]
    pub(crate) fn packed_ranges(&self) -> Vec<(String, Option<[u64; 2]>)> {
        let file = self.panel_file();
        self.state()
            .layers
            .iter()
            .map(|(name, packed)| (name.clone(), file.and_then(|file| packed.range_in(file))))
            .collect()
    }

    /// The file this cache reads or writes.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl PackedLayer {
    /// Where the panels lie in `file`, when they were packed into it.
    fn range_in(&self, file: &Arc<PanelFile>) -> Option<[u64; 2]> {
        match self {
            Self::F32(p) => p.weight.range_in(file),
            Self::Bf16(p) => p.weight.range_in(file),
            Self::Q8(p) => p.weight.range_in(file),
            Self::Blocks { .. } => None,
        }
    }

    /// What the file records of this layer.
    fn parts(&self) -> Result<Parts<'_>> {
        Ok(match self {
            Self::F32(p) => Parts {
                kind: Kind::F32,
                n: p.weight.n(),
                k: p.weight.k(),
                weight: Cow::Borrowed(p.weight.panel_bytes()),
                bias: p.bias.clone(),
            },
            Self::Bf16(p) => Parts {
                kind: Kind::Bf16,
                n: p.weight.n(),
                k: p.weight.k(),
                weight: Cow::Borrowed(p.weight.panel_bytes()),
                bias: p.bias.clone(),
            },
            Self::Q8(p) => Parts {
                kind: Kind::Q8_0Panels,
                n: p.weight.n(),
                k: p.weight.k(),
                weight: Cow::Borrowed(p.weight.panel_bytes()),
                bias: p.bias.clone(),
            },
            Self::Blocks { weight, bias } => {
                let kind = match weight.dtype() {
                    GgmlDType::Q8_0 => Kind::Q8_0,
                    GgmlDType::Q4K => Kind::Q4K,
                    other => anyhow::bail!("no cache format for {other:?} blocks"),
                };
                let (n, k) = weight.shape().dims2()?;
                let bias = match bias {
                    Some(bias) => Some(bias.to_dtype(DType::F32)?.to_vec1::<f32>()?),
                    None => None,
                };
                Parts {
                    kind,
                    n,
                    k,
                    weight: weight.data()?,
                    bias,
                }
            }
        })
    }
}

/// One layer as the file records it: kind, `[n, k]`, the weight's bytes
/// and the bias in f32.
struct Parts<'a> {
    kind: Kind,
    n: usize,
    k: usize,
    weight: Cow<'a, [u8]>,
    bias: Option<Vec<f32>>,
}

impl CacheFile {
    /// The file at `path`, if there is one, it is whole, and it was made
    /// from `identity`; `Ok(None)` when there is none.
    fn open(path: &Path, identity: &str) -> Result<Option<Self>> {
        // A named pipe or device under the file's name is unusable, not
        // waited on: the file is written anew over it.
        let (mut file, meta) = match regular_file::open(path) {
            Ok(opened) => opened,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(err).with_context(|| format!("cannot read {}", path.display())),
        };
        let len = meta.len();
        let header = read_header(&mut file, len).map_err(|err| {
            match err.downcast_ref::<OtherFormat>() {
                // Not damage: a file an older (or newer) caption wrote.
                Some(other) => anyhow::anyhow!("{} {other}", path.display()),
                None => err.context(format!("{} is damaged", path.display())),
            }
        })?;
        anyhow::ensure!(
            header.identity == identity,
            "{} was packed from other weights, config or settings",
            path.display()
        );
        let data_end = len - TRAILER;
        for entry in &header.entries {
            let ranges = std::iter::once(entry.panels).chain(entry.bias);
            for [start, end] in ranges {
                anyhow::ensure!(
                    start <= end && end <= data_end && start % ALIGN == 0,
                    "{} is damaged: {} lies outside its data",
                    path.display(),
                    entry.name
                );
            }
        }
        // Its last use, for eviction: the access time alone (the
        // modification time is how runs mapping it notice a change). Where
        // the file system refuses, it ages by its last write instead.
        let _ =
            file.set_times(std::fs::FileTimes::new().set_accessed(std::time::SystemTime::now()));
        // Watched: another program that truncates or rewrites the file
        // while we use it makes the next batch fail (see `watched_map`).
        let map = watched_map::map(file, path)
            .with_context(|| format!("cannot map {}", path.display()))?;
        populate_huge(&map);
        let entries = header
            .entries
            .into_iter()
            .map(|entry| (entry.name.clone(), entry))
            .collect();
        Ok(Some(Self { map, entries }))
    }

    /// The file, if every layer's bytes still have the checksum they were
    /// written with. All of them are checked now, in parallel, rather than
    /// each when first used: the mapping is read in whole at open anyway
    /// (`populate_huge`), and a damaged file is then rejected before any of
    /// its layers is in the model. Measured (`time_verifying_a_pack`):
    /// a few hundredths of a second per 500 MB.
    fn verified(self, path: &Path) -> Result<Self> {
        use rayon::prelude::*;
        let damaged = self
            .entries
            .par_iter()
            .find_any(|(_, entry)| !entry.intact(&self.map));
        match damaged {
            Some((name, _)) => anyhow::bail!(
                "{} is damaged: the data of {name} does not match its checksum",
                path.display()
            ),
            None => Ok(self),
        }
    }

    fn packed(&self, entry: &Entry, dtype: DType) -> Option<PackedLayer> {
        let [start, end] = entry.panels;
        let (offset, bytes) = (start as usize, (end - start) as usize);
        let bias = entry.bias.map(|[start, end]| {
            self.map[start as usize..end as usize]
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect::<Vec<f32>>()
        });
        if bias.as_ref().is_some_and(|b| b.len() != entry.n) {
            return None;
        }
        let map = self.map.clone();
        Some(match entry.kind {
            Kind::F32 => PackedLayer::F32(Arc::new(PackedLinear {
                weight: PackedMatrix::from_cache(map, offset, bytes, entry.k, entry.n)?,
                bias,
            })),
            Kind::Bf16 => PackedLayer::Bf16(Arc::new(PackedLinear {
                weight: PackedMatrixBf16::from_cache(map, offset, bytes, entry.k, entry.n)?,
                bias,
            })),
            Kind::Q8_0Panels => PackedLayer::Q8(Arc::new(PackedLinear {
                weight: PackedMatrixQ8::from_cache(map, offset, bytes, entry.k, entry.n)?,
                bias,
            })),
            Kind::Q8_0 | Kind::Q4K => {
                let ggml = match entry.kind {
                    Kind::Q8_0 => GgmlDType::Q8_0,
                    _ => GgmlDType::Q4K,
                };
                let elements = entry.n.checked_mul(entry.k)?;
                let whole = elements.is_multiple_of(ggml.block_size())
                    && bytes == elements / ggml.block_size() * ggml.type_size();
                let raw = &self.map[offset..offset + bytes];
                let weight = whole
                    .then(|| qtensor_from_ggml(ggml, raw, vec![entry.n, entry.k], &Device::Cpu))?
                    .ok()?;
                // The blocks were copied: unmap their file pages, which
                // would otherwise count twice in our memory (they stay in
                // the page cache for the next run).
                #[cfg(unix)]
                // SAFETY: a read-only private file mapping: dropping its pages
                // only means they are read from the file again if touched,
                // and nothing here touches these bytes again.
                let _ = unsafe {
                    self.map.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        offset,
                        bytes,
                    )
                };
                let bias = match bias {
                    Some(bias) => Some(
                        Tensor::from_vec(bias, entry.n, &Device::Cpu)
                            .and_then(|b| b.to_dtype(dtype))
                            .ok()?,
                    ),
                    None => None,
                };
                PackedLayer::Blocks {
                    weight: Arc::new(weight),
                    bias,
                }
            }
        })
    }
}

/// Opens the pack at `path` as a run does, but with its checksums taken as
/// right, and multiplies every layer it holds (at each dtype a model asks
/// for) by a vector of zeros: for the fuzz target. A checksum keeps out
/// damage, not someone who can write the cache folder, so whatever such a
/// file says must still be refused or read safely. Returns how many layers
/// were used.
#[doc(hidden)]
pub fn use_unchecked_pack(path: &Path) -> Result<usize> {
    let identity = {
        let (mut file, meta) = regular_file::open(path)?;
        read_header(&mut file, meta.len())?.identity
    };
    let Some(file) = CacheFile::open(path, &identity)? else {
        return Ok(0);
    };
    let mut used = 0;
    for entry in file.entries.values() {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            if let Some(layer) = file.packed(entry, dtype) {
                layer.multiply_zeros()?;
                used += 1;
            }
        }
    }
    Ok(used)
}

impl PackedLayer {
    /// One row of zeros through the layer, touching every weight byte.
    fn multiply_zeros(&self) -> Result<()> {
        fn product<L: caption_kernels::PackedProduct>(layer: &PackedLinear<L>)
        where
            L::Value: Default,
        {
            if L::available() {
                let x = vec![L::Value::default(); layer.weight.k()];
                let mut c = vec![L::Value::default(); layer.weight.n()];
                L::product(&layer.weight, &x, 1, layer.bias.as_deref(), &mut c);
            }
        }
        match self {
            Self::F32(layer) => product(layer),
            Self::Bf16(layer) => product(layer),
            Self::Q8(layer) => product(layer),
            Self::Blocks { weight, .. } => {
                let (_, k) = weight.shape().dims2()?;
                let x = Tensor::zeros((1, k), DType::F32, &Device::Cpu)?;
                let matmul = candle_core::quantized::QMatMul::from_arc(weight.clone())?;
                candle_core::Module::forward(&matmul, &x)?;
            }
        }
        Ok(())
    }
}

/// Reads the whole mapping in now rather than page by page in the kernels,
/// asking for huge pages first: pages the file's readahead brings in then
/// come as 2 MiB folios (see [`HugePageChunks`] for those already cached).
/// Both are requests; a kernel that refuses them leaves the pages to fault
/// in on first use.
fn populate_huge(map: &memmap2::Mmap) {
    #[cfg(target_os = "linux")]
    {
        let _ = map.advise(memmap2::Advice::HugePage);
        let _ = map.advise(memmap2::Advice::PopulateRead);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = map;
}

/// A cache file in another version of the format: rebuilt, not damaged.
#[derive(Debug, thiserror::Error)]
#[error("was written in cache format {found}, and this build reads format {FORMAT}")]
struct OtherFormat {
    found: u32,
}

fn read_header(file: &mut File, len: u64) -> Result<Header> {
    anyhow::ensure!(len >= 12 + TRAILER, "too short");
    let mut start = [0u8; 12];
    file.read_exact(&mut start)?;
    anyhow::ensure!(&start[..8] == MAGIC, "not a pack-cache file");
    let format = u32::from_le_bytes(start[8..].try_into().unwrap());
    if format != FORMAT {
        return Err(OtherFormat { found: format }.into());
    }
    let mut trailer = [0u8; TRAILER as usize];
    file.seek(SeekFrom::Start(len - TRAILER))?;
    file.read_exact(&mut trailer)?;
    anyhow::ensure!(&trailer[16..] == MAGIC, "cut short");
    let offset = u64::from_le_bytes(trailer[..8].try_into().unwrap());
    let header_len = u64::from_le_bytes(trailer[8..16].try_into().unwrap());
    anyhow::ensure!(
        offset.checked_add(header_len) == Some(len - TRAILER),
        "its header is out of place"
    );
    let mut header = vec![0u8; header_len as usize];
    file.seek(SeekFrom::Start(offset))?;
    file.read_exact(&mut header)?;
    serde_json::from_slice(&header).context("its header is not valid")
}

impl Writing {
    /// A new temporary file in `dir`, its magic and format written.
    fn new(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        remove_abandoned_temp_files(dir, ABANDONED_AFTER);
        let (file, temp) = tempfile::Builder::new()
            .prefix(TEMP_PREFIX)
            .tempfile_in(dir)?
            .into_parts();
        // Held until this process ends or closes the file: the lock, not
        // the file's age, tells another run that the file is being written
        // (a lock dies with its process, however that ends). Where the file
        // system has no locks, the age rule alone decides.
        let _ = file.try_lock();
        let listed = ListedTempFile::new(temp.to_path_buf());
        let dir = dir.to_path_buf();
        let room = move |bytes| {
            disk_space(&dir).is_none_or(|(available, total)| leaves_room(bytes, available, total))
        };
        let file = PanelFile::new(file, Box::new(room));
        file.append(MAGIC, false)?;
        file.append(&FORMAT.to_le_bytes(), false)?;
        Ok(Self {
            file: Arc::new(file),
            temp: Mutex::new(Some(temp)),
            _listed: listed,
        })
    }
}

/// Completes `writing` with `layers` (those packed into it already stay
/// where they are; the rest are appended), then renames it to `path`;
/// returns the file's size.
fn write(
    path: &Path,
    identity: &str,
    layers: &[(String, PackedLayer)],
    writing: &Writing,
) -> Result<u64> {
    let file = &writing.file;
    let mut needed = 0;
    for (_, packed) in layers {
        let parts = packed.parts()?;
        let bias = parts.bias.map_or(0, |b| 4 * b.len() as u64);
        let weight = match packed.range_in(file) {
            Some(_) => 0,
            None => parts.weight.len() as u64,
        };
        needed += weight + bias + 2 * ALIGN;
    }
    if let Some((available, total)) = path.parent().and_then(disk_space) {
        anyhow::ensure!(
            leaves_room(needed, available, total),
            "it needs {} MB more and the disk has {} MB free; a cache may not take the last {} MB",
            needed.div_ceil(1_000_000),
            available / 1_000_000,
            reserve(total) / 1_000_000
        );
    }
    let mut entries = Vec::with_capacity(layers.len());
    for (name, packed) in layers {
        let Parts {
            kind,
            n,
            k,
            weight,
            bias,
        } = packed.parts()?;
        let panels = match packed.range_in(file) {
            Some(range) => range,
            None => file.append(&weight, true)?,
        };
        let bias_bytes: Vec<u8> = bias
            .iter()
            .flatten()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let bias = match bias {
            Some(_) => Some(file.append(&bias_bytes, true)?),
            None => None,
        };
        entries.push(Entry {
            name: name.clone(),
            kind,
            n,
            k,
            panels,
            bias,
            xxh3: checksum(&weight, &bias_bytes),
        });
    }
    let header = serde_json::to_vec(&Header {
        identity: identity.to_string(),
        entries,
    })?;
    let [offset, _] = file.append(&header, false)?;
    file.append(&offset.to_le_bytes(), false)?;
    file.append(&(header.len() as u64).to_le_bytes(), false)?;
    file.append(MAGIC, false)?;
    file.trim()?;
    let temp = writing
        .temp
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .context("the cache file was already written")?;
    persist_synced(|| file.sync(), temp, path)?;
    Ok(file.bytes_so_far())
}

/// Renames `temp` to `path` once `sync` has put the file's bytes on disk,
/// then flushes the folder: the rename is an entry there. Without the
/// first, a power loss could leave a whole-looking file of zeros or stale
/// pages under the cache's name (the checksum would catch it, at the cost
/// of a rebuild); without the second, the rename itself could be lost. A
/// failed sync renames nothing (and `temp`, dropped, is deleted).
fn persist_synced(
    sync: impl FnOnce() -> std::io::Result<()>,
    temp: tempfile::TempPath,
    path: &Path,
) -> Result<()> {
    sync().context("flushing it to disk")?;
    temp.persist(path)?;
    sync_folder(path.parent().unwrap_or(Path::new(".")))
}

/// Flushes `dir`'s entries to disk. Some file systems cannot sync a folder
/// (EINVAL): there the file, already on disk, is all we can make durable.
#[cfg(unix)]
fn sync_folder(dir: &Path) -> Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    match File::open(dir).and_then(|dir| dir.sync_all()) {
        Err(err) if err.kind() != std::io::ErrorKind::InvalidInput => {
            Err(err).with_context(|| format!("flushing the folder {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// Windows cannot open a folder as a file to flush it; NTFS journals the
/// rename itself.
#[cfg(not(unix))]
fn sync_folder(_dir: &Path) -> Result<()> {
    Ok(())
}

/// What a file must have been made from: the source files as they are on
/// disk now, the config, the settings and this build's format.
fn identity(source: &Source) -> Result<String> {
    let weights = source
        .weights
        .iter()
        .map(|path| {
            let meta =
                std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
            let modified = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_nanos());
            let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.clone());
            Ok(serde_json::json!({
                "path": path,
                "bytes": meta.len(),
                "modified_ns": modified.map(|ns| ns.to_string()),
            }))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(serde_json::json!({
        "format": FORMAT,
        "settings": source.settings,
        "weights": weights,
        "config": source.config_json,
    })
    .to_string())
}

/// `<label>-<hash of label and settings>.pack`: one file per model and
/// setting, replaced when the model changes (a new revision from the Hub
/// included), so old versions do not pile up.
fn file_name(source: &Source) -> String {
    let label: String = source
        .label
        .chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_' => c,
            _ => '-',
        })
        .collect();
    // The end of a long path says the most (the model folder's name).
    let label = &label[label.len().saturating_sub(60)..];
    let label = label.trim_matches(|c| c == '-' || c == '.');
    let key = format!("{}\0{}", source.label, source.settings);
    format!("{label}-{:016x}.pack", fnv1a(key.as_bytes()))
}

/// FNV-1a, 64-bit: a stable hash for file names (std's hasher may change
/// between Rust releases). Collisions only cost a rewrite: the header says
/// what the file was made from.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::pack_folder::{remove_listed_temp_files, temp_files};

    fn cache(dir: &Path, weights: &[PathBuf], settings: &str) -> WeightCache {
        let source = Source {
            label: "test-model",
            weights,
            config_json: "{}",
            settings,
        };
        WeightCache::open(dir, &source).unwrap()
    }

    /// A file an older build wrote (another format number) is rebuilt and
    /// said to be of another format, not to be damaged.
    #[test]
    fn a_file_of_another_format_is_old_not_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let weights = [dir.path().join("model.safetensors")];
        std::fs::write(&weights[0], b"weights").unwrap();
        let path = cache(dir.path(), &weights, "a").path().to_path_buf();
        let mut old = MAGIC.to_vec();
        old.extend((FORMAT - 1).to_le_bytes());
        old.resize(4096, 0);
        std::fs::write(&path, old).unwrap();
        let reason = cache(dir.path(), &weights, "a").rejected.unwrap();
        assert!(
            reason.contains("format") && !reason.contains("damaged"),
            "{reason}"
        );
    }

    /// A named pipe under the cache file's name used to block the load for
    /// ever in its open: now it is unusable, and replaced by the file.
    #[cfg(unix)]
    #[test]
    fn a_named_pipe_in_place_of_the_file_is_replaced_not_waited_on() {
        let dir = tempfile::tempdir().unwrap();
        let weights = vec![dir.path().join("model.safetensors")];
        std::fs::write(&weights[0], b"weights").unwrap();
        let path = dir.path().join(file_name(&Source {
            label: "test-model",
            weights: &weights,
            config_json: "{}",
            settings: "a",
        }));
        let made = std::process::Command::new("mkfifo")
            .arg(&path)
            .status()
            .unwrap();
        assert!(made.success());
        let (done, opened) = std::sync::mpsc::channel();
        let folder = dir.path().to_path_buf();
        std::thread::spawn(move || {
            let _ = done.send(cache(&folder, &weights, "a"));
        });
        // The blocked thread, if any, dies with the test process.
        let pipe = opened
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("opening the cache blocked on a named pipe");
        assert_eq!(pipe.path, path);
        assert!(pipe.file.is_none());
        let weight = Tensor::randn(0f32, 1.0, (40, 512), &Device::Cpu).unwrap();
        let layer = PackedLayer::Blocks {
            weight: Arc::new(QTensor::quantize(&weight, GgmlDType::Q8_0).unwrap()),
            bias: None,
        };
        pipe.remember("layer.weight", layer);
        let Outcome::Written { replaced, .. } = pipe.finish().unwrap() else {
            panic!("not written");
        };
        assert!(
            replaced
                .as_deref()
                .is_some_and(|why| why.ends_with("not a regular file")),
            "{replaced:?}"
        );
        assert!(std::fs::metadata(&path).unwrap().is_file());
    }

    /// What a Ctrl-C during loading relies on: the file being written is
    /// listed, deleted on request, and unlisted once the load is over.
    #[test]
    fn temporary_files_being_written_can_be_removed() {
        let dir = tempfile::tempdir().unwrap();
        let weights = [dir.path().join("model.safetensors")];
        std::fs::write(&weights[0], b"weights").unwrap();
        let temp_files_here = || -> Vec<PathBuf> {
            std::fs::read_dir(dir.path())
                .unwrap()
                .map(|entry| entry.unwrap())
                .filter(|entry| entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX))
                .map(|entry| entry.path())
                .collect()
        };
        let listed_here = || {
            temp_files()
                .iter()
                .filter(|p| p.starts_with(dir.path()))
                .count()
        };
        let loading = cache(dir.path(), &weights, "a");
        // The file is made by the first layer packed into it; on a CPU
        // without our kernels nothing is packed, and finish() makes it.
        let _ = loading.writing();
        assert_eq!(temp_files_here().len(), 1);
        assert_eq!(listed_here(), 1);
        // Other tests' files, in other folders, are left to them.
        remove_listed_temp_files(|path| path.starts_with(dir.path()));
        assert_eq!(temp_files_here(), Vec::<PathBuf>::new());
        assert_eq!(listed_here(), 0);
        drop(loading);
        // A load that ends (here without saving) unlists and deletes its file.
        let abandoned = cache(dir.path(), &weights, "a");
        let _ = abandoned.writing();
        assert_eq!(listed_here(), 1);
        drop(abandoned);
        assert_eq!(listed_here(), 0);
        assert_eq!(temp_files_here(), Vec::<PathBuf>::new());
    }

    /// Four bytes changed inside the data region (a layer's panels, its
    /// bias) are caught by the checksum: the file is not used, and is
    /// written anew, saying why.
    #[test]
    fn damaged_data_fails_its_checksum_and_the_file_is_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let weights = [dir.path().join("model.safetensors")];
        std::fs::write(&weights[0], b"weights").unwrap();
        // candle's q8_0 blocks: saved on every CPU.
        let weight = Tensor::randn(0f32, 1.0, (40, 512), &Device::Cpu).unwrap();
        let layer = PackedLayer::Blocks {
            weight: Arc::new(QTensor::quantize(&weight, GgmlDType::Q8_0).unwrap()),
            bias: Some(Tensor::randn(0f32, 1.0, 40, &Device::Cpu).unwrap()),
        };
        let first = cache(dir.path(), &weights, "a");
        first.remember("layer.weight", layer.clone());
        let Outcome::Written { path, .. } = first.finish().unwrap() else {
            panic!("not written");
        };
        let whole = std::fs::read(&path).unwrap();
        let header = read_header(&mut File::open(&path).unwrap(), whole.len() as u64).unwrap();
        let [entry] = &header.entries[..] else {
            panic!("{} entries", header.entries.len());
        };
        let [panels, _] = entry.panels;
        let [bias, _] = entry.bias.unwrap();
        // The reproduction: offset 4096, the first layer's panels.
        assert_eq!(panels, 4096);
        for (what, at) in [("panels", panels), ("bias", bias + 4)] {
            let mut damaged = whole.clone();
            for byte in &mut damaged[at as usize..at as usize + 4] {
                *byte ^= 0xff;
            }
            std::fs::write(&path, &damaged).unwrap();
            let reopened = cache(dir.path(), &weights, "a");
            assert!(
                reopened
                    .layer("layer.weight", 40, 512, DType::F32)
                    .is_none(),
                "{what}: damaged data used"
            );
            reopened.remember("layer.weight", layer.clone());
            let Outcome::Written { replaced, .. } = reopened.finish().unwrap() else {
                panic!("{what}: not rewritten");
            };
            assert!(
                replaced
                    .as_deref()
                    .is_some_and(|why| why.contains("damaged") && why.contains("checksum")),
                "{what}: {replaced:?}"
            );
            assert_eq!(
                std::fs::read(&path).unwrap(),
                whole,
                "{what}: rewritten whole"
            );
            let rewritten = cache(dir.path(), &weights, "a");
            assert!(rewritten
                .layer("layer.weight", 40, 512, DType::F32)
                .is_some());
        }
    }

    /// A file whose flush to disk failed is not renamed into place (a
    /// power loss could leave it damaged), nor left behind.
    #[test]
    fn a_failed_sync_renames_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model-0123.pack");
        let temp = tempfile::Builder::new()
            .prefix(TEMP_PREFIX)
            .tempfile_in(dir.path())
            .unwrap()
            .into_temp_path();
        let temp_path = temp.to_path_buf();
        let failed = || Err(std::io::Error::other("EIO"));
        let err = persist_synced(failed, temp, &path).unwrap_err();
        assert!(format!("{err:#}").contains("EIO"), "{err:#}");
        assert!(!path.exists());
        assert!(!temp_path.exists());
        let temp = tempfile::NamedTempFile::new_in(dir.path())
            .unwrap()
            .into_temp_path();
        persist_synced(|| Ok(()), temp, &path).unwrap();
        assert!(path.exists());
    }

    /// A pack of `layers` layers of `bytes` each, written as `write` lays
    /// them out, with their checksums.
    fn synthetic_pack(path: &Path, identity: &str, layers: usize, bytes: usize) {
        use std::io::Write;
        let mut file = std::io::BufWriter::new(File::create(path).unwrap());
        file.write_all(MAGIC).unwrap();
        file.write_all(&FORMAT.to_le_bytes()).unwrap();
        file.write_all(&[0; ALIGN as usize - 12]).unwrap();
        let mut entries = Vec::new();
        let mut offset = ALIGN;
        for layer in 0..layers {
            let panels = vec![layer as u8; bytes];
            file.write_all(&panels).unwrap();
            let end = offset + bytes as u64;
            entries.push(Entry {
                name: format!("layer.{layer}.weight"),
                kind: Kind::F32,
                n: bytes / 4,
                k: 1,
                panels: [offset, end],
                bias: None,
                xxh3: checksum(&panels, &[]),
            });
            let padding = end.next_multiple_of(ALIGN) - end;
            file.write_all(&vec![0; padding as usize]).unwrap();
            offset = end + padding;
        }
        let header = serde_json::to_vec(&Header {
            identity: identity.to_string(),
            entries,
        })
        .unwrap();
        file.write_all(&header).unwrap();
        file.write_all(&offset.to_le_bytes()).unwrap();
        file.write_all(&(header.len() as u64).to_le_bytes())
            .unwrap();
        file.write_all(MAGIC).unwrap();
    }

    /// What checking the checksums adds to a load from the cache: opening
    /// a 500 MB pack (header, mapping, reading it in: the load before
    /// checksums) against checking it; one thread's checksum rate and the
    /// flush to disk (what writing a pack adds). Its pages are in the page
    /// cache, as a cache hit's are. Run with
    /// `cargo test --lib time_verifying_a_pack -- --ignored --nocapture`
    /// (the hashing loop is xxhash-rust's, optimised in test builds too).
    #[test]
    #[ignore = "a timing, not a check: writes 500 MB"]
    fn time_verifying_a_pack() {
        const BYTES: usize = 768 * 3072 * 4; // BLIP-base's MLP weights in f32
        const LAYERS: usize = 53; // 500 MB
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("synthetic.pack");
        synthetic_pack(&path, "synthetic", LAYERS, BYTES);
        // What the first run's flush before the rename costs: all of the
        // file's pages are dirty then, as here.
        let start = std::time::Instant::now();
        File::open(&path).unwrap().sync_all().unwrap();
        let flushing = start.elapsed().as_secs_f64();
        let best = |f: &dyn Fn()| {
            (0..5)
                .map(|_| {
                    let start = std::time::Instant::now();
                    f();
                    start.elapsed().as_secs_f64()
                })
                .fold(f64::INFINITY, f64::min)
        };
        let open = || CacheFile::open(&path, "synthetic").unwrap().unwrap();
        let opening = best(&|| drop(open()));
        let file = open();
        let checking = best(&|| {
            let damaged = file.entries.values().any(|entry| !entry.intact(&file.map));
            assert!(!damaged);
        });
        let opening_checked = best(&|| drop(open().verified(&path).unwrap()));
        let in_memory = file.map.to_vec();
        let hashing = best(&|| assert_ne!(checksum(&in_memory, &[]), 0));
        let mb = (LAYERS * BYTES) as f64 / 1e6;
        println!(
            "{mb:.0} MB pack, {} threads: open {:.1} ms; open and verify {:.1} ms; \
             checksums on one thread {:.1} ms ({:.1} GB/s; {:.1} GB/s of memory already faulted in); \
             flushing it to disk once written {:.0} ms",
            rayon::current_num_threads(),
            opening * 1e3,
            opening_checked * 1e3,
            checking * 1e3,
            mb / 1e3 / checking,
            mb / 1e3 / hashing,
            flushing * 1e3,
        );
    }

    /// A file made under other settings is not used, and says why.
    #[test]
    fn other_settings_are_another_file_and_a_stale_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let weights = [dir.path().join("model.safetensors")];
        std::fs::write(&weights[0], b"weights").unwrap();
        // candle's q8_0 blocks, as a CPU without our q8_0 kernel holds them.
        let weight = Tensor::randn(0f32, 1.0, (40, 512), &Device::Cpu).unwrap();
        let layer = PackedLayer::Blocks {
            weight: Arc::new(QTensor::quantize(&weight, GgmlDType::Q8_0).unwrap()),
            bias: None,
        };
        let first = cache(dir.path(), &weights, "a");
        first.remember("layer.weight", layer.clone());
        let Outcome::Written { path, .. } = first.finish().unwrap() else {
            panic!("not written");
        };
        assert_ne!(cache(dir.path(), &weights, "b").path, path);
        std::fs::write(&weights[0], b"other weights").unwrap();
        let stale = cache(dir.path(), &weights, "a");
        assert!(stale.layer("layer.weight", 40, 512, DType::F32).is_none());
        stale.remember("layer.weight", layer);
        let Outcome::Written { replaced, .. } = stale.finish().unwrap() else {
            panic!("not rewritten");
        };
        assert!(
            replaced
                .as_deref()
                .is_some_and(|why| why.contains("other weights")),
            "{replaced:?}"
        );
    }
}
