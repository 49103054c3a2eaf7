//! Inputs for a run: paths, folders, standard input and URLs ([`inputs`],
//! [`fetch`]), split into shards.

pub mod fetch;
pub mod index;
pub mod inputs;
mod run;
pub mod schedulers;
pub mod webdataset;

pub use run::{load_image, load_input, skip_captioned, Batches, Ended, Progress, Silent, Work};
