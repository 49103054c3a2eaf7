//! A model's files → what runs: checkpoint tensors ([`weights`]), the
//! tokenizer ([`tokenizer`]), and the weight cache of packed layers
//! ([`weight_cache`]).

pub mod tokenizer;
pub mod weight_cache;
pub mod weights;
