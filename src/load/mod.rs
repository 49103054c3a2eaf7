//! A model's files → what runs: checkpoint tensors ([`weights`]), the
//! tokenizer ([`tokenizer`]), and the weight cache of packed layers
//! ([`weight_cache`]); [`regular_file`] opens files without waiting on a
//! named pipe or device put where a file should be.

pub mod regular_file;
pub mod tokenizer;
pub mod weight_cache;
pub mod weights;
