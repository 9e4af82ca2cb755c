//! The CIFAR-10 binary format (spec §6): `data_batch_1.bin` … `data_batch_5.bin` (the
//! training split) and `test_batch.bin`, each a sequence of 3,073-byte records: one
//! label byte (0..=9), then 32×32 red, 32×32 green and 32×32 blue bytes, each plane
//! row-major. The result is a [`Dataset`] of shape [3, 32, 32].

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::Error;
use crate::problems::mnist::{Dataset, Split};

/// Bytes of one record: the label and 3 × 32 × 32 pixels.
pub const RECORD: usize = 1 + PIXELS;
/// Pixels of one image, all three planes.
pub const PIXELS: usize = 3 * 32 * 32;
/// Largest file read (a CIFAR-10 batch is 30,730,000 bytes).
pub const MAX_FILE_BYTES: u64 = 64 << 20;

/// The files of `split` in `dir`: the training batches that exist (the first must), or
/// the test batch.
fn files(dir: &Path, split: Split) -> Vec<PathBuf> {
    match split {
        Split::Train => (1..=5)
            .map(|i| dir.join(format!("data_batch_{i}.bin")))
            .enumerate()
            .filter(|(i, p)| *i == 0 || p.is_file())
            .map(|(_, p)| p)
            .collect(),
        Split::Test => vec![dir.join("test_batch.bin")],
    }
}

/// Whether `dir` holds CIFAR-10 binary files (its first training batch or its test batch).
pub fn is_cifar_dir(dir: &Path) -> bool {
    dir.join("data_batch_1.bin").is_file() || dir.join("test_batch.bin").is_file()
}

/// Parses one file's records, appending them; refuses a length that is not a whole
/// number of records and labels outside 0..=9.
pub fn parse(path: &Path, bytes: &[u8], out: &mut Dataset) -> Result<(), Error> {
    if out.shape != [3, 32, 32] || out.pixels != PIXELS {
        return Err(Error::Shape(format!(
            "CIFAR-10 records are 3×32×32 images; the data set holds {:?}",
            out.shape
        )));
    }
    if bytes.is_empty() || !bytes.len().is_multiple_of(RECORD) {
        return Err(Error::format(
            path,
            format!(
                "{} bytes is not a whole number of {RECORD}-byte records (1 label byte + \
                 {PIXELS} pixel bytes); not a CIFAR-10 binary file, or cut short",
                bytes.len()
            ),
        ));
    }
    for (i, r) in bytes.chunks_exact(RECORD).enumerate() {
        if r[0] > 9 {
            return Err(Error::format(
                path,
                format!("record {i} has label {}; CIFAR-10 labels are 0..=9", r[0]),
            ));
        }
        out.labels.push(r[0]);
        out.images.extend_from_slice(&r[1..]);
    }
    Ok(())
}

/// Reads `split` of the CIFAR-10 binary files in `dir`.
pub fn load(dir: &Path, split: Split) -> Result<Dataset, Error> {
    let mut out = Dataset {
        pixels: PIXELS,
        shape: [3, 32, 32],
        images: Vec::new(),
        labels: Vec::new(),
    };
    for path in files(dir, split) {
        let io = |error| Error::Io {
            path: path.clone(),
            error,
        };
        let mut bytes = Vec::new();
        std::fs::File::open(&path)
            .and_then(|f| f.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes))
            .map_err(io)?;
        if bytes.len() as u64 > MAX_FILE_BYTES {
            return Err(Error::format(
                &path,
                format!("more than {MAX_FILE_BYTES} bytes; a CIFAR-10 batch is 30,730,000"),
            ));
        }
        parse(&path, &bytes, &mut out)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(label: u8, seed: u8) -> Vec<u8> {
        let mut r = vec![label];
        r.extend((0..PIXELS).map(|i| (i as u8).wrapping_mul(seed)));
        r
    }

    #[test]
    fn batches_load_in_order_with_channel_major_pixels() {
        let dir = tempfile::tempdir().unwrap();
        let one: Vec<u8> = [record(3, 1), record(9, 2)].concat();
        std::fs::write(dir.path().join("data_batch_1.bin"), &one).unwrap();
        std::fs::write(dir.path().join("data_batch_2.bin"), record(0, 5)).unwrap();
        std::fs::write(dir.path().join("test_batch.bin"), record(7, 3)).unwrap();
        assert!(is_cifar_dir(dir.path()));
        let train = load(dir.path(), Split::Train).unwrap();
        assert_eq!(train.labels, [3, 9, 0]);
        assert_eq!(
            (train.len(), train.shape, train.pixels),
            (3, [3, 32, 32], 3072)
        );
        // Image 1, green plane (offset 1024), pixel 5: byte (1024 + 5) · 2.
        let img: Vec<f32> = train.image(1).collect();
        assert_eq!(img[1029], ((1029u32 * 2) % 256) as f32 / 255.0);
        let test = load(dir.path(), Split::Test).unwrap();
        assert_eq!(test.labels, [7]);
    }

    #[test]
    fn wrong_lengths_bad_labels_and_missing_files_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("data_batch_1.bin");
        let mut short = record(1, 1);
        short.pop();
        std::fs::write(&p, &short).unwrap();
        let e = load(dir.path(), Split::Train).unwrap_err().to_string();
        assert!(
            e.contains("data_batch_1.bin") && e.contains("3073-byte records"),
            "{e}"
        );
        std::fs::write(&p, record(10, 1)).unwrap();
        let e = load(dir.path(), Split::Train).unwrap_err().to_string();
        assert!(e.contains("label 10"), "{e}");
        std::fs::write(&p, b"").unwrap();
        assert!(load(dir.path(), Split::Train).is_err());
        let e = load(dir.path(), Split::Test).unwrap_err().to_string();
        assert!(e.contains("test_batch.bin"), "{e}");
    }
}
