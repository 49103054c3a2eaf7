//! The float32 path every CPU without AVX-512 takes (candle's own matmul
//! and attention instead of the packed kernels of `caption-kernels`), on
//! the demo models: every greedy caption and answer transformers recorded
//! in float32 must come out the same. On this project's machines the
//! parity suites run the AVX-512 kernels, and CI runs them all again with
//! CAPTION_KERNELS=portable; this keeps the path tested by `cargo test`
//! alone too. A test binary of its own, because the switch is
//! process-wide.

mod common;

use caption::RuntimeOptions;
use common::demo_outputs::{disagreements, outcomes, Outcome};

#[test]
fn portable_kernels_give_the_float32_text_everywhere() {
    caption::nn::use_portable_kernels();
    assert!(!caption::nn::packed_kernels_available());
    let outcomes = outcomes(&RuntimeOptions::default());
    assert!(outcomes.len() > 300, "{} outputs", outcomes.len());
    assert_eq!(disagreements(&outcomes), Vec::<&Outcome>::new());
}
