//! What this CPU can run, detected once for the process.
//!
//! The binary is built for baseline x86-64 (or any other target), so each
//! fast path checks at run time that its instructions exist; every check
//! reads [`features`], filled on first use. [`use_portable_kernels`] (or
//! `CAPTION_KERNELS=portable` in the environment) turns the packed
//! AVX-512 and AMX products off, so callers take their portable paths as
//! on a CPU without them: the tests and CI run the parity suite that way.
//! `CAPTION_KERNELS=generic` turns every kernel here off ([`generic`]),
//! for the code a GPU runs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

/// The instruction-set extensions the kernels use, as this CPU (and, for
/// AMX, the operating system) offers them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Features {
    /// AVX2 and FMA: the element-wise kernels' vector bodies.
    pub avx2_fma: bool,
    /// AVX-512F: the float32 product and the fused attention.
    pub avx512f: bool,
    /// AVX-512BW and VL (every AVX-512 server CPU): the bf16 and q8_0 products.
    pub avx512bw_vl: bool,
    /// AVX512-BF16 (`VDPBF16PS`): the bf16 dot-product kernel.
    pub avx512_bf16: bool,
    /// AVX512-VNNI (`VPDPBUSD`): the q8_0 product.
    pub avx512_vnni: bool,
    /// AMX-TILE and AMX-BF16, and Linux granted this process the tile state.
    pub amx_bf16: bool,
    /// The vendor string is Intel's (its cores run `VDPBF16PS` at half rate).
    pub intel: bool,
}

/// This CPU's features, detected on the first call.
pub fn features() -> &'static Features {
    static DETECTED: OnceLock<Features> = OnceLock::new();
    DETECTED.get_or_init(detect)
}

/// Whether the packed products are turned off: [`use_portable_kernels`]
/// was called, or `CAPTION_KERNELS` is `portable` (or `generic`, which
/// turns off more, see [`generic`]).
pub fn portable() -> bool {
    FORCE_PORTABLE.load(Ordering::Relaxed)
        || matches!(kernels_variable(), Some("portable" | "generic"))
}

/// Whether none of these kernels is to run at all (`CAPTION_KERNELS=generic`):
/// callers then take the operations of their tensor library, as they do
/// off the CPU. That is how the code a GPU runs is tested on a CPU.
pub fn generic() -> bool {
    kernels_variable() == Some("generic")
}

/// `CAPTION_KERNELS`, read once.
fn kernels_variable() -> Option<&'static str> {
    static FROM_ENVIRONMENT: OnceLock<Option<String>> = OnceLock::new();
    FROM_ENVIRONMENT
        .get_or_init(|| std::env::var("CAPTION_KERNELS").ok())
        .as_deref()
}

/// From now on, callers take their portable paths, as on a CPU without
/// AVX-512 (matrices already packed keep working). For tests of those
/// paths, and for comparing the two.
pub fn use_portable_kernels() {
    FORCE_PORTABLE.store(true, Ordering::Relaxed);
}

static FORCE_PORTABLE: AtomicBool = AtomicBool::new(false);

#[cfg(target_arch = "x86_64")]
fn detect() -> Features {
    use std::arch::is_x86_feature_detected as has;
    let avx512f = has!("avx512f");
    let avx512bw_vl = avx512f && has!("avx512bw") && has!("avx512vl");
    Features {
        avx2_fma: has!("avx2") && has!("fma"),
        avx512f,
        avx512bw_vl,
        avx512_bf16: avx512bw_vl && has!("avx512bf16"),
        avx512_vnni: avx512bw_vl && has!("avx512vnni"),
        amx_bf16: avx512bw_vl && cpu_has_amx_bf16() && request_tile_state(),
        intel: vendor_is_intel(),
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Features {
    Features::default()
}

/// CPUID leaf 7, subleaf 0: EDX bit 22 is AMX-BF16, bit 24 AMX-TILE.
#[cfg(target_arch = "x86_64")]
fn cpu_has_amx_bf16() -> bool {
    // Rust 1.94 made `__cpuid_count` safe; older compilers need the block.
    #[allow(unused_unsafe)]
    // SAFETY: CPUID leaf 7 exists on every AVX-512 CPU, which the caller
    // checked first.
    let leaf = unsafe { std::arch::x86_64::__cpuid_count(7, 0) };
    leaf.edx & (1 << 22) != 0 && leaf.edx & (1 << 24) != 0
}

/// Asks Linux for the tile data state (XFEATURE_XTILEDATA, 18) for the
/// whole process; true when granted.
#[cfg(target_arch = "x86_64")]
fn request_tile_state() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: arch_prctl with this request only changes which state
        // the kernel saves for the process; it reads no memory of ours.
        let status = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        };
        status == 0
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Whether the CPU's vendor string is Intel's.
#[cfg(target_arch = "x86_64")]
fn vendor_is_intel() -> bool {
    #[allow(unused_unsafe)]
    // SAFETY: CPUID leaf 0 exists on every x86-64 CPU.
    let leaf = unsafe { std::arch::x86_64::__cpuid(0) };
    // Leaf 0 gives the vendor in ebx, edx, ecx ("Genu" "ineI" "ntel").
    [leaf.ebx, leaf.edx, leaf.ecx] == [0x756e_6547, 0x4965_6e69, 0x6c65_746e]
}
