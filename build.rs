//! Embeds the bundled demo models (`models/<name>/`, committed, a few MB) in
//! the library, so `--model demo` works on any machine with no download and
//! no checkout: `src/bundled.rs` writes them out to a cache folder on first use.
//!
//! Generates `$OUT_DIR/bundled_models.rs`: one `Bundle` per folder, its files
//! in name order, and a digest of their names and bytes that names the
//! extracted folder (a changed model never reuses a stale extraction).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn main() {
    let root = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let models = root.join("models");
    println!("cargo:rerun-if-changed=models");
    let mut code = String::from("pub static BUNDLED: &[Bundle] = &[\n");
    for folder in sorted_entries(&models).into_iter().filter(|p| p.is_dir()) {
        let name = folder.file_name().unwrap().to_str().unwrap().to_string();
        let files: Vec<PathBuf> = sorted_entries(&folder)
            .into_iter()
            .filter(|p| p.is_file())
            .collect();
        let mut digest = Fnv::default();
        let mut listing = String::new();
        for file in &files {
            let file_name = file.file_name().unwrap().to_str().unwrap();
            digest.update(file_name.as_bytes());
            digest.update(&std::fs::read(file).unwrap());
            writeln!(
                listing,
                "        ({file_name:?}, include_bytes!({:?})),",
                file.display().to_string()
            )
            .unwrap();
        }
        writeln!(
            code,
            "    Bundle {{\n        name: {name:?},\n        digest: \"{:016x}\",\n        files: &[\n{listing}        ],\n    }},",
            digest.0
        )
        .unwrap();
    }
    code.push_str("];\n");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap()).join("bundled_models.rs");
    std::fs::write(out, code).unwrap();
}

/// The entries of `dir` in name order (none when it does not exist).
fn sorted_entries(dir: &Path) -> Vec<PathBuf> {
    let Ok(read) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = read.map(|e| e.unwrap().path()).collect();
    paths.sort();
    paths
}

/// 64-bit FNV-1a: a stable content fingerprint (not a security measure).
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}
