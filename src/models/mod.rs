//! Model families, one file each, mirroring transformers.
//!
//! Every struct mirrors a transformers module and walks the checkpoint with
//! `vb.pp(..)` using the checkpoint's own tensor names, so a tensor in our code
//! can be found in the safetensors file by the same path. The layers come
//! from [`crate::nn`]; no model file names a CPU feature or picks a kernel.

pub mod bert;
pub mod blip;
pub mod blip2;
pub mod clip;
pub mod llama;
pub mod llava;
pub mod opt;
