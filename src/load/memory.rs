//! Will the model fit? An estimate of the memory a checkpoint takes once
//! loaded in a given precision, checked against what the machine has
//! available before anything is read: a 7B model in f32 (28 GB) on a 16 GB
//! laptop should stop at once with a line that names the options that fit,
//! not be killed by the OOM killer halfway through loading.

use anyhow::Result;
use candle_core::DType;

use crate::resolve::hub::WeightFiles;

/// How linear layers' weights are held: the model's dtype, or one of
/// `--quantize`'s GGUF block formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinearFormat {
    Dense,
    /// 32 weights in 34 bytes (an f16 scale and 32 int8).
    Q8_0,
    /// 256 weights in 144 bytes.
    Q4K,
}

/// Parameters by how they are held: the linear layers' weight matrices
/// (which `--quantize` shrinks) and everything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ParameterCount {
    pub linear: u64,
    pub other: u64,
}

impl ParameterCount {
    /// Counts the checkpoint's tensors from their headers. A matrix named
    /// `*.weight` that is not an embedding table counts as a linear layer's.
    pub fn of(weights: &WeightFiles) -> Result<Self> {
        let mut count = Self::default();
        for (name, shape) in super::weights::tensor_shapes(weights)? {
            let elements = shape
                .iter()
                .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
                .unwrap_or(u64::MAX);
            let is_linear =
                shape.len() == 2 && name.ends_with(".weight") && !name.contains("embed");
            if is_linear {
                count.linear = count.linear.saturating_add(elements);
            } else {
                count.other = count.other.saturating_add(elements);
            }
        }
        Ok(count)
    }

    /// Bytes the loaded model takes in `dtype`, its linear weights in
    /// `quantization`'s block format if given.
    pub fn bytes(&self, dtype: DType, format: LinearFormat) -> u64 {
        let element = dtype.size_in_bytes() as f64;
        let linear = match format {
            LinearFormat::Q8_0 => 34.0 / 32.0,
            LinearFormat::Q4K => 144.0 / 256.0,
            LinearFormat::Dense => element,
        };
        (self.linear as f64 * linear + self.other as f64 * element) as u64
    }
}

/// What this process can still allocate: the least of what the kernel says
/// is available without swapping (`MemAvailable`), the room left under this
/// process's cgroup limit (a SLURM job's or a container's `--mem`), and
/// [`LIMIT_ENV`]. `None` where none of them is known.
pub fn available_bytes() -> Option<u64> {
    let limits = [meminfo_available(), cgroup_room(), env_limit()];
    limits.into_iter().flatten().min()
}

/// Set to a number of bytes (or with a K, M, G suffix) to load as if only
/// that much memory were available.
pub const LIMIT_ENV: &str = "CAPTION_MEMORY_LIMIT";

fn meminfo_available() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    meminfo.lines().find_map(|line| {
        let kib = line
            .strip_prefix("MemAvailable:")?
            .trim()
            .strip_suffix("kB")?;
        kib.trim().parse::<u64>().ok()?.checked_mul(1024)
    })
}

/// The cgroup's limit minus its usage: cgroup v2 (`memory.max`,
/// `memory.current`) or v1 (`memory.limit_in_bytes`, `memory.usage_in_bytes`).
fn cgroup_room() -> Option<u64> {
    let read = |path: String| -> Option<u64> {
        std::fs::read_to_string(path)
            .ok()?
            .trim()
            .parse::<u64>()
            .ok()
    };
    let membership = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    for line in membership.lines() {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        let (limit, usage) = if controllers.is_empty() {
            let dir = format!("/sys/fs/cgroup{path}");
            (
                read(format!("{dir}/memory.max")),
                read(format!("{dir}/memory.current")),
            )
        } else if controllers.split(',').any(|c| c == "memory") {
            let dir = format!("/sys/fs/cgroup/memory{path}");
            (
                read(format!("{dir}/memory.limit_in_bytes")),
                read(format!("{dir}/memory.usage_in_bytes")),
            )
        } else {
            continue;
        };
        // v1 writes "no limit" as a number near 2^63; v2 as "max" (no number).
        if let Some(limit) = limit.filter(|&l| l < 1 << 60) {
            return Some(limit.saturating_sub(usage.unwrap_or(0)));
        }
    }
    None
}

fn env_limit() -> Option<u64> {
    parse_size(&std::env::var(LIMIT_ENV).ok()?)
}

/// `123`, `512M`, `16G`, `1.5G` (powers of 1024) as bytes.
fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let (number, unit) = match text.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => (&text[..i], text[i..].trim_end_matches(['B', 'b', 'i'])),
        None => (text, ""),
    };
    let scale: f64 = match unit.to_ascii_uppercase().as_str() {
        "" => 1.0,
        "K" => 1024.0,
        "M" => 1024f64.powi(2),
        "G" => 1024f64.powi(3),
        "T" => 1024f64.powi(4),
        _ => return None,
    };
    let value: f64 = number.trim().parse().ok()?;
    (value.is_finite() && value >= 0.0).then_some((value * scale) as u64)
}

/// Set to load whatever the estimate says (swap, or a better guess).
pub const IGNORE_ENV: &str = "CAPTION_IGNORE_MEMORY";

/// Headroom beyond the weights: activations, the KV cache, the tokenizer,
/// the runtime. A tenth of the weights, and at least 256 MiB.
fn with_headroom(weights: u64) -> u64 {
    weights.saturating_add((weights / 10).max(256 << 20))
}

/// Fails, naming the options that would fit, when the model in `dtype`,
/// its linear layers in `format`, needs more than `available` bytes.
pub fn check_fits(
    model: &str,
    count: ParameterCount,
    dtype: DType,
    format: LinearFormat,
    available: u64,
) -> Result<()> {
    let needed = with_headroom(count.bytes(dtype, format));
    if needed <= available {
        return Ok(());
    }
    let options = [
        ("--dtype f32", DType::F32, LinearFormat::Dense),
        ("--dtype bf16", DType::BF16, LinearFormat::Dense),
        ("--quantize q8_0", DType::F32, LinearFormat::Q8_0),
        ("--quantize q4k", DType::F32, LinearFormat::Q4K),
    ];
    let fitting: Vec<String> = options
        .iter()
        .filter(|(_, d, q)| with_headroom(count.bytes(*d, *q)) <= available)
        .map(|(flag, d, q)| format!("{flag} ({})", gigabytes(count.bytes(*d, *q))))
        .collect();
    let advice = if fitting.is_empty() {
        "no precision we offer fits".to_string()
    } else {
        format!("{} would fit", fitting.join(", "))
    };
    anyhow::bail!(
        "{model} needs about {} of memory as loaded ({}) and this machine has {} available: \
         {advice} (set {IGNORE_ENV}=1 to try anyway)",
        gigabytes(needed),
        match format {
            LinearFormat::Q8_0 => "--quantize q8_0".to_string(),
            LinearFormat::Q4K => "--quantize q4k".to_string(),
            LinearFormat::Dense => format!("{dtype:?}").to_lowercase(),
        },
        gigabytes(available)
    )
}

fn gigabytes(bytes: u64) -> String {
    if bytes < 1_000_000_000 {
        format!("{} MB", bytes / 1_000_000)
    } else {
        format!("{:.1} GB", bytes as f64 / 1e9)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llava-1.5-7b's shape of parameters: ~6.6 B in linear layers, ~0.4 B
    /// elsewhere (embeddings, norms, the vision tower's small tensors).
    const LLAVA_7B: ParameterCount = ParameterCount {
        linear: 6_600_000_000,
        other: 460_000_000,
    };

    #[test]
    fn estimates_follow_the_formats() {
        assert_eq!(
            LLAVA_7B.bytes(DType::F32, LinearFormat::Dense),
            28_240_000_000
        );
        assert_eq!(
            LLAVA_7B.bytes(DType::BF16, LinearFormat::Dense),
            14_120_000_000
        );
        let q8 = LLAVA_7B.bytes(DType::F32, LinearFormat::Q8_0);
        assert!((8_800_000_000..8_900_000_000).contains(&q8), "{q8}");
        let q4 = LLAVA_7B.bytes(DType::F32, LinearFormat::Q4K);
        assert!((5_500_000_000..5_600_000_000).contains(&q4), "{q4}");
    }

    #[test]
    fn a_model_too_big_names_what_fits() {
        let err = check_fits(
            "llava-1.5-7b",
            LLAVA_7B,
            DType::F32,
            LinearFormat::Dense,
            16_000_000_000,
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("llava-1.5-7b needs about 31.1 GB"), "{err}");
        assert!(err.contains("--dtype bf16 (14.1 GB)"), "{err}");
        assert!(err.contains("--quantize q4k"), "{err}");
        assert!(!err.contains("--dtype f32 ("), "{err}");
        assert!(!err.contains('\n'));
        let none = check_fits(
            "m",
            LLAVA_7B,
            DType::F32,
            LinearFormat::Dense,
            1_000_000_000,
        )
        .unwrap_err();
        assert!(none.to_string().contains("no precision we offer fits"));
        check_fits(
            "m",
            LLAVA_7B,
            DType::BF16,
            LinearFormat::Dense,
            16_000_000_000,
        )
        .unwrap();
    }

    #[test]
    fn sizes_read_with_their_units() {
        assert_eq!(parse_size("123"), Some(123));
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("1.5G"), Some(3 << 29));
        assert_eq!(parse_size("16GiB"), Some(16 << 30));
        assert_eq!(parse_size("lots"), None);
        assert_eq!(parse_size("-1G"), None);
    }

    #[test]
    fn available_memory_is_read_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(available_bytes().unwrap() > 0);
        }
    }
}
