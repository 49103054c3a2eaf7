//! Weight files are untrusted input (any Hub repository): damaged or crafted
//! ones must stop the binary with one line naming the file and the tensor,
//! exit 2, before anything is allocated from what they claim: never a panic,
//! never an abort, never captions from the wrong bytes.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Output;

use common::{caption_command, fixtures};

/// The tensor the damaged copies change: every BLIP model reads it.
const TENSOR: &str = "text_decoder.bert.embeddings.word_embeddings.weight";

/// A copy of fixture model `name` in `dir`.
fn copy_model(name: &str, dir: &Path) -> PathBuf {
    let model = dir.join(name);
    std::fs::create_dir(&model).unwrap();
    for entry in std::fs::read_dir(fixtures().join("models").join(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), model.join(entry.file_name())).unwrap();
    }
    model
}

fn caption_with(model: &Path, home: &Path) -> Output {
    caption_command(home)
        .arg("-m")
        .arg(model)
        .arg(fixtures().join("images/astronaut.jpg"))
        .output()
        .unwrap()
}

/// Exit 2 (not a panic's 101, not an abort's signal), nothing on stdout,
/// one line on stderr naming `file` and every one of `names`.
fn assert_refused(out: &Output, file: &str, names: &[&str]) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{:?}: {err}", out.status);
    assert!(out.stdout.is_empty(), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(file), "{err}");
    for name in names {
        assert!(err.contains(name), "{name}: {err}");
    }
    err
}

// --- pytorch_model.bin -------------------------------------------------------

/// blip-tiny-bin with its `data.pkl` replaced by `edit(data.pkl)`; every
/// other record is copied as it is.
fn damaged_bin(dir: &Path, edit: impl FnOnce(&[u8]) -> Vec<u8>) -> PathBuf {
    let model = copy_model("blip-tiny-bin", dir);
    let path = model.join("pytorch_model.bin");
    let original = std::fs::read(&path).unwrap();
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(original)).unwrap();
    let mut writer = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    let stored =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let mut edit = Some(edit);
    for index in 0..archive.len() {
        let mut entry = archive.by_index(index).unwrap();
        let name = entry.name().unwrap().into_owned();
        if name.ends_with("data.pkl") {
            let mut pickle = Vec::new();
            entry.read_to_end(&mut pickle).unwrap();
            writer.start_file(name, stored).unwrap();
            writer.write_all(&(edit.take().unwrap())(&pickle)).unwrap();
        } else {
            drop(entry);
            writer
                .raw_copy_file(archive.by_index_raw(index).unwrap())
                .unwrap();
        }
    }
    writer.finish().unwrap();
    model
}

/// The pickle's bytes for the tuple of `ints` (MARK, BININT..., TUPLE).
fn int_tuple(ints: &[i32]) -> Vec<u8> {
    let mut bytes = vec![b'('];
    for &int in ints {
        bytes.push(b'J');
        bytes.extend_from_slice(&int.to_le_bytes());
    }
    bytes.push(b't');
    bytes
}

/// The length of the BININT opcode at `at` (K, M or J with its argument).
fn int_len(pickle: &[u8], at: usize) -> usize {
    match pickle[at] {
        b'K' => 2,
        b'M' => 3,
        b'J' => 5,
        op => panic!("expected an integer at byte {at}, found opcode {op:#x}"),
    }
}

/// The end of the tuple of integers at `at`, and of the memo put after it.
fn tuple_end(pickle: &[u8], mut at: usize) -> (usize, usize) {
    let marked = pickle[at] == b'(';
    at += usize::from(marked);
    while matches!(pickle[at], b'K' | b'M' | b'J') {
        at += int_len(pickle, at);
    }
    assert!(
        matches!((marked, pickle[at]), (true, b't') | (false, 0x85..=0x87)),
        "expected a tuple at byte {at}"
    );
    let tuple_end = at + 1;
    let put_end = match pickle[tuple_end] {
        b'q' => tuple_end + 2,
        b'r' => tuple_end + 5,
        _ => tuple_end,
    };
    (tuple_end, put_end)
}

/// `pickle` with [`TENSOR`]'s storage offset, size and stride replaced.
///
/// torch writes `_rebuild_tensor_v2(storage, offset, size, stride, ...)`:
/// after the tensor's name comes its storage's persistent id (BINPERSID,
/// `Q`), then the offset, then the two tuples, each memoized.
fn relayout(pickle: &[u8], offset: i32, size: &[i32], stride: &[i32]) -> Vec<u8> {
    let name = pickle
        .windows(TENSOR.len())
        .position(|w| w == TENSOR.as_bytes())
        .expect("the tensor is in the pickle");
    let persid = name
        + pickle[name..]
            .windows(2)
            .position(|w| w == b"QK")
            .expect("a storage id after the name");
    let offset_at = persid + 1;
    let size_at = offset_at + int_len(pickle, offset_at);
    let (size_end, size_put_end) = tuple_end(pickle, size_at);
    let (stride_end, stride_put_end) = tuple_end(pickle, size_put_end);
    let mut out = pickle[..offset_at].to_vec();
    out.push(b'J');
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend(int_tuple(size));
    out.extend_from_slice(&pickle[size_end..size_put_end]);
    out.extend(int_tuple(stride));
    out.extend_from_slice(&pickle[stride_end..stride_put_end]);
    out.extend_from_slice(&pickle[stride_put_end..]);
    out
}

/// The fixture as it is loads with our reader and the relayout helper
/// changes nothing when given the tensor's own layout (193 × 36): the
/// damaged copies below differ from a good file only where they say.
#[test]
fn an_undamaged_copy_captions() {
    let dir = tempfile::tempdir().unwrap();
    let model = damaged_bin(dir.path(), |pickle| {
        let same = relayout(pickle, 0, &[193, 36], &[36, 1]);
        assert_ne!(same, pickle, "the layout is rewritten as MARK/BININT/TUPLE");
        same
    });
    let out = caption_with(&model, dir.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(!out.stdout.is_empty());
}

/// The reproduction: a shape of 64 × (2^31 - 1) f32 is 550 GB, in
/// a storage record of 27,792 bytes. candle's reader allocated it first
/// (SIGABRT).
#[test]
fn a_bin_tensor_claiming_550_gb_is_refused_before_any_allocation() {
    let dir = tempfile::tempdir().unwrap();
    let model = damaged_bin(dir.path(), |pickle| {
        relayout(pickle, 0, &[64, i32::MAX], &[i32::MAX, 1])
    });
    let out = caption_with(&model, dir.path());
    assert_refused(
        &out,
        "pytorch_model.bin",
        &[TENSOR, "137438953408 elements"],
    );
}

/// A shape whose element count overflows 64 bits ("capacity overflow", a
/// panic, with candle's reader).
#[test]
fn a_bin_shape_that_overflows_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = damaged_bin(dir.path(), |pickle| {
        relayout(pickle, 0, &[i32::MAX, i32::MAX, i32::MAX], &[1, 1, 1])
    });
    let out = caption_with(&model, dir.path());
    assert_refused(&out, "pytorch_model.bin", &[TENSOR, "64 bits"]);
}

/// A storage offset past the end of the storage record: the right shape,
/// but its bytes would come from outside the tensor's record.
#[test]
fn a_bin_storage_offset_past_its_record_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = damaged_bin(dir.path(), |pickle| {
        relayout(pickle, 1 << 20, &[193, 36], &[36, 1])
    });
    let out = caption_with(&model, dir.path());
    assert_refused(&out, "pytorch_model.bin", &[TENSOR, "offset 1048576"]);
}

/// A tensor record with one argument where torch writes six: candle's
/// reader indexed past its end (a panic).
#[test]
fn a_bin_tensor_record_too_short_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = damaged_bin(dir.path(), |_| {
        // {"x": torch._utils._rebuild_tensor_v2(0)}
        b"\x80\x02}(X\x01\x00\x00\x00xctorch._utils\n_rebuild_tensor_v2\nK\x00\x85Ru.".to_vec()
    });
    let out = caption_with(&model, dir.path());
    assert_refused(&out, "pytorch_model.bin", &["tensor x", "at least 4"]);
}

/// A pickle cut short: one line, not a panic.
#[test]
fn a_truncated_bin_pickle_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = damaged_bin(dir.path(), |pickle| pickle[..pickle.len() / 2].to_vec());
    let out = caption_with(&model, dir.path());
    assert_refused(&out, "pytorch_model.bin", &["data.pkl"]);
}

// --- model.safetensors -------------------------------------------------------

/// blip-tiny with `edit` applied to its model.safetensors header; the data
/// region (which the header's offsets count from) is left as it is.
fn damaged_safetensors(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let model = copy_model("blip-tiny", dir);
    let path = model.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    edit(&mut header);
    let header = serde_json::to_vec(&header).unwrap();
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    out.extend_from_slice(&bytes[8 + header_len..]);
    std::fs::write(&path, out).unwrap();
    model
}

fn offsets(header: &serde_json::Value, name: &str) -> [u64; 2] {
    serde_json::from_value(header[name]["data_offsets"].clone()).unwrap()
}

/// Two tensors sharing bytes: before, the second read the first's bytes and
/// the run printed a caption from them with exit 0.
#[test]
fn overlapping_safetensors_tensors_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = damaged_safetensors(dir.path(), |header| {
        // Move TENSOR onto the start of the tensor stored just before it
        // (same length, so its own range check still passes).
        let [start, end] = offsets(header, TENSOR);
        let (_, before) = header
            .as_object()
            .unwrap()
            .iter()
            .filter(|(name, _)| *name != "__metadata__")
            .map(|(name, _)| (offsets(header, name)[1], name.clone()))
            .filter(|(end_before, _)| *end_before <= start && *end_before > 0)
            .max()
            .unwrap();
        let [other_start, _] = offsets(header, &before);
        header[TENSOR]["data_offsets"] =
            serde_json::json!([other_start, other_start + end - start]);
    });
    let out = caption_with(&model, dir.path());
    assert_refused(&out, "model.safetensors", &[TENSOR, "overlap"]);
}

/// A byte range past the end of the file, in arithmetic that overflows.
#[test]
fn a_safetensors_range_past_the_end_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = damaged_safetensors(dir.path(), |header| {
        let [start, end] = offsets(header, TENSOR);
        let len = end - start;
        header[TENSOR]["data_offsets"] = serde_json::json!([u64::MAX - len, u64::MAX]);
    });
    let out = caption_with(&model, dir.path());
    assert_refused(&out, "model.safetensors", &[TENSOR, "does not fit"]);
}

/// A shape whose byte count overflows 64 bits, over an empty range.
#[test]
fn a_safetensors_shape_that_overflows_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = damaged_safetensors(dir.path(), |header| {
        header[TENSOR]["shape"] = serde_json::json!([1u64 << 32, 1u64 << 32, 1u64 << 32]);
        header[TENSOR]["data_offsets"] = serde_json::json!([0, 0]);
    });
    let out = caption_with(&model, dir.path());
    assert_refused(&out, "model.safetensors", &[TENSOR, "does not fit"]);
}
