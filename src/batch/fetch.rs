//! Images given as `http(s)://` addresses: fetched with a time limit and a
//! size cap, then decoded from memory like a file.

use std::io::Read;
use std::time::Duration;

use crate::image::{ImageError, LoadOptions};

/// Longest a download may take, connection included.
pub const TIMEOUT: Duration = Duration::from_secs(30);
/// Largest body accepted: far above any photo, far below what would hurt.
pub const MAX_BYTES: u64 = 64 * 1024 * 1024;

/// Downloads `url` and decodes it as [`crate::image::load_rgb8`] would a file.
pub fn load_url(url: &str, opts: &LoadOptions) -> Result<image::RgbImage, ImageError> {
    let bytes = download(url, MAX_BYTES).map_err(ImageError::Unsupported)?;
    if bytes.is_empty() {
        return Err(ImageError::Empty);
    }
    crate::image::decode_rgb8(&bytes, opts)
}

/// The body of `url`, at most `limit` bytes; errors are one-line reasons.
pub fn download(url: &str, limit: u64) -> Result<Vec<u8>, String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(TIMEOUT))
        .build()
        .into();
    let response = agent
        .get(url)
        .call()
        .map_err(|e| format!("cannot download: {e}"))?;
    let mut bytes = Vec::new();
    response
        .into_body()
        .into_reader()
        .take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot download: {e}"))?;
    if bytes.len() as u64 > limit {
        return Err(format!("download is larger than {limit} bytes"));
    }
    Ok(bytes)
}
