//! A model's files → what runs: checkpoint tensors ([`weights`]; a
//! `pytorch_model.bin` through our own checked reader, `pytorch` over
//! `pickle`), the tokenizer ([`tokenizer`]), and the weight cache of
//! packed layers ([`weight_cache`]).

mod pickle;
mod pytorch;
pub mod tokenizer;
pub mod weight_cache;
pub mod weights;
