//! `caption`: caption images and answer questions about them with BLIP and
//! BLIP-2, label, embed and search them with CLIP, run natively with candle,
//! with the same results as transformers.
//!
//! Open a model by alias, Hub id or folder and caption pictures with the
//! model's own decoding defaults:
//!
//! ```
//! use caption::{Captioner, Options};
//!
//! # fn main() -> anyhow::Result<()> {
//! // `demo` is a tiny model built into the library: no download needed.
//! let captioner = Captioner::open("demo", &Options::default())?;
//! let captions = captioner.caption_paths(["examples/shapes_1.png"])?;
//! assert_eq!(captions[0][0].text, "a small yellow square on a gray background");
//! # Ok(())
//! # }
//! ```
//!
//! A CLIP model ([`Embedder`]) scores labels and embeds images and texts:
//!
//! ```
//! use caption::{Embedder, RuntimeOptions};
//!
//! # fn main() -> anyhow::Result<()> {
//! let clip = Embedder::open("demo-clip", &RuntimeOptions::default())?;
//! let image = caption::image::load_rgb8(
//!     std::path::Path::new("examples/shapes_4.png"),
//!     &Default::default(),
//! )?;
//! let labels = clip.label_set(
//!     &["circle".into(), "square".into(), "triangle".into()],
//!     caption::captioner::embed::DEFAULT_LABEL_TEMPLATE,
//! )?;
//! let scores = clip.score_labels(&clip.embed_images(&[image])?, &labels)?;
//! assert_eq!(scores[0][0].label, "circle");
//! # Ok(())
//! # }
//! ```
//!
//! The pipeline, one module per stage: [`resolve`] turns a model reference
//! into local files, [`load`] reads them (checkpoint tensors, tokenizer,
//! the weight cache), [`image`] decodes and preprocesses pictures exactly
//! as transformers does, [`nn`] holds the layers (and picks the CPU
//! kernels of `caption-kernels`), [`models`] the model families,
//! [`generate`] the decoding loop, [`captioner`] a loaded model behind one
//! interface, [`batch`] runs it over many inputs and [`output`] writes the
//! results. The `caption` binary is a thin CLI over this library.

pub mod batch;
pub mod captioner;
#[doc(hidden)]
pub mod fuzzing;
pub mod generate;
pub mod image;
pub mod load;
pub mod models;
pub mod nn;
pub mod output;
pub mod resolve;

pub use captioner::chat::{Conversation, Reply, Turn};
pub use captioner::embed::{Embedder, LabelScore, TextSet};
pub use captioner::{Answer, Caption, CaptionRequest, Captioner, Options, RuntimeOptions};

pub use resolve::resolve_model;

/// Tells the allocator to keep freed memory for reuse. Every tensor op
/// allocates its output; glibc maps blocks past its mmap threshold (at most
/// 32 MB) fresh from the kernel and hands freed heap tops back, so the same
/// few hundred MB per encoder layer were page-faulted in again for every
/// image: 2.25 M page faults for 10 BLIP-base images, 0.27 M with this;
/// vision encoder at batch 8: 1.08 -> 0.92 s per image. The price: memory
/// freed during a run is not returned to the system until it ends (the
/// peak is unchanged). Call once, before the model loads.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before other
    // threads allocate.
    unsafe {
        // The largest threshold glibc accepts (HEAP_MAX_SIZE / 2 = 32 MB on
        // 64-bit); blocks below it come from the heap and are reused.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 * 1024 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
