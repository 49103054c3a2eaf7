//! A model's files → what runs: checkpoint tensors ([`weights`]; a
//! `pytorch_model.bin` through our own checked reader, `pytorch` over
//! `pickle`), the tokenizer ([`tokenizer`]), and the weight cache of
//! packed layers ([`weight_cache`]); [`regular_file`] opens files without
//! waiting on a named pipe or device put where a file should be.

pub mod chat_template;
pub mod memory;
mod pack_folder;
mod pickle;
mod pytorch;
pub mod regular_file;
pub mod tokenizer;
pub mod watched_map;
pub mod weight_cache;
pub mod weights;
