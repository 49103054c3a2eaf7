//! Files Pillow opens that the `image` crate refuses as they are: what we
//! do first so that they decode as transformers (through Pillow) sees them.
//!
//! - A PNG without its end chunk (IEND): Pillow stops reading once the
//!   image data is complete and never looks for it; the `png` crate asks
//!   for it and reports the file as cut short.
//! - An ICO as Pillow writes it: each size a PNG in the image's own mode
//!   (RGB for a photo). The `image` crate's ICO decoder takes only RGBA
//!   PNGs inside an icon; Pillow reads any PNG there.

use super::limits::ImageError;

const PNG_MAGIC: &[u8; 8] = b"\x89PNG\r\n\x1a\n";
/// An empty IEND chunk: length 0, type, CRC of the type.
const IEND: [u8; 12] = [0, 0, 0, 0, b'I', b'E', b'N', b'D', 0xAE, 0x42, 0x60, 0x82];

/// The PNG `bytes` with an end chunk where it has none (`None` when it
/// has one, or does not end on a chunk boundary: data cut short stays
/// cut short).
pub fn with_end_chunk(bytes: &[u8]) -> Option<Vec<u8>> {
    let mut at = PNG_MAGIC.len();
    if !bytes.starts_with(PNG_MAGIC) {
        return None;
    }
    // Walk the chunks: length (4), type (4), data, CRC (4).
    while at < bytes.len() {
        let header = bytes.get(at..at + 8)?;
        let len = u32::from_be_bytes(header[..4].try_into().ok()?) as usize;
        if &header[4..] == b"IEND" {
            return None;
        }
        at = at.checked_add(12)?.checked_add(len)?;
    }
    (at == bytes.len()).then(|| [bytes, &IEND].concat())
}

/// The icon Pillow shows for an ICO file: the largest, and among equally
/// large ones the lowest colour depth (`IcoFile.__init__` sorts them so
/// and loads the first), as the bytes of a PNG when it is one. `None` for
/// an entry in the older BMP form, or a directory that does not fit the
/// file, which the `image` crate's decoder then reads (or refuses).
pub fn largest_png_icon(bytes: &[u8]) -> Result<Option<&[u8]>, ImageError> {
    let count = match bytes.get(4..6) {
        Some(n) => u16::from_le_bytes([n[0], n[1]]) as usize,
        None => return Ok(None),
    };
    let mut best: Option<(u32, u32, &[u8])> = None;
    for index in 0..count {
        let Some(entry) = bytes.get(6 + 16 * index..6 + 16 * (index + 1)) else {
            return Ok(None);
        };
        let side = |b: u8| if b == 0 { 256 } else { u32::from(b) };
        let square = side(entry[0]) * side(entry[1]);
        let colours = entry[2];
        let bpp = u16::from_le_bytes([entry[6], entry[7]]);
        // Pillow: bpp, else log2 of the palette size rounded up, else 256.
        let depth = match (bpp, colours) {
            (0, 0) => 256,
            (0, n) => u32::from(n).next_power_of_two().trailing_zeros(),
            (bpp, _) => u32::from(bpp),
        };
        let size = u32::from_le_bytes(entry[8..12].try_into().unwrap()) as usize;
        let offset = u32::from_le_bytes(entry[12..16].try_into().unwrap()) as usize;
        let Some(data) = offset
            .checked_add(size)
            .and_then(|end| bytes.get(offset..end))
        else {
            return Ok(None);
        };
        let better = match best {
            None => true,
            Some((best_square, best_depth, _)) => {
                square > best_square || (square == best_square && depth < best_depth)
            }
        };
        if better {
            best = Some((square, depth, data));
        }
    }
    Ok(best
        .map(|(_, _, data)| data)
        .filter(|data| data.starts_with(PNG_MAGIC)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_end_chunk_is_added_only_where_one_is_missing() {
        let mut png = Vec::new();
        image::RgbImage::new(3, 2)
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        assert!(png.ends_with(&IEND));
        assert_eq!(with_end_chunk(&png), None, "whole");
        let without = &png[..png.len() - IEND.len()];
        assert_eq!(with_end_chunk(without).as_deref(), Some(&png[..]));
        assert_eq!(
            with_end_chunk(&without[..without.len() - 1]),
            None,
            "cut short"
        );
        assert_eq!(with_end_chunk(b"GIF89a"), None);
    }

    #[test]
    fn pillow_picks_the_largest_icon_then_the_lowest_depth() {
        // Three entries: 16x16 and 32x32 at 32 bpp, 32x32 at 8 bpp.
        let png = [&PNG_MAGIC[..], b"rest"].concat();
        let mut ico = vec![0, 0, 1, 0, 3, 0];
        let entries = [(16u8, 32u16, 0u8), (32, 32, 0), (32, 8, 0)];
        let first_data = 6 + 16 * entries.len();
        for (i, (side, bpp, colours)) in entries.into_iter().enumerate() {
            let offset = (first_data + i * png.len()) as u32;
            ico.extend([side, side, colours, 0, 1, 0]);
            ico.extend(bpp.to_le_bytes());
            ico.extend((png.len() as u32).to_le_bytes());
            ico.extend(offset.to_le_bytes());
        }
        for i in 0..entries.len() {
            let mut data = png.clone();
            data[8] = i as u8; // tell them apart
            ico.extend(data);
        }
        let chosen = largest_png_icon(&ico).unwrap().unwrap();
        assert_eq!(chosen[8], 2, "32x32 at the lower depth");
    }
}
