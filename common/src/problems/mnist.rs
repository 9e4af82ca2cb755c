//! MNIST-format data (IDX files, plain or gzip): the images and labels the `mlp`
//! problem trains on (spec §3.2). MNIST itself, Fashion-MNIST, or any data set in
//! that format.
//!
//! IDX: a big-endian header (two zero bytes, type code 0x08 for unsigned bytes, the
//! number of dimensions, then each dimension as u32), then the values row-major.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::Error;

/// Which half of a data set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// `train-*`: meta-training and tuning.
    Train,
    /// `t10k-*`: reporting.
    Test,
}

impl Split {
    /// The file-name prefix of this split.
    pub fn prefix(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "t10k",
        }
    }
}

/// Images (as bytes, 0..=255) and their labels.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// Pixels per image, channels × rows × columns (784 for 28×28, 3,072 for CIFAR-10).
    pub pixels: usize,
    /// [channels, rows, columns] of every image; its values are stored channel by
    /// channel, each row-major (IDX: one channel; CIFAR-10: red, green, blue).
    pub shape: [usize; 3],
    /// All images, row-major, `len() × pixels` bytes.
    pub images: Vec<u8>,
    /// One label per image, 0..=9.
    pub labels: Vec<u8>,
}

/// Largest IDX file read, before or after un-gzipping (MNIST's training images are 47 MB).
pub const MAX_IDX_BYTES: u64 = 1 << 30;

/// Reads an IDX file's bytes, un-gzipping when the file starts with the gzip magic.
fn read_bytes(path: &Path) -> Result<Vec<u8>, Error> {
    read_capped(path, MAX_IDX_BYTES)
}

/// As [`read_bytes`], with at most `cap` bytes before and after un-gzipping.
fn read_capped(path: &Path, cap: u64) -> Result<Vec<u8>, Error> {
    let io = |error| Error::Io {
        path: path.to_path_buf(),
        error,
    };
    let too_large = || {
        Error::format(
            path,
            format!("holds more than {cap} bytes; no MNIST-format split is that large"),
        )
    };
    let mut raw = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(cap + 1).read_to_end(&mut raw))
        .map_err(io)?;
    if raw.len() as u64 > cap {
        return Err(too_large());
    }
    if raw.starts_with(&[0x1f, 0x8b]) {
        // Inflation is capped too: a small gzip bomb cannot exhaust memory.
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .take(cap + 1)
            .read_to_end(&mut out)
            .map_err(|e| Error::format(path, format!("not a valid gzip file: {e}")))?;
        if out.len() as u64 > cap {
            return Err(too_large());
        }
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parses an IDX file of unsigned bytes: its dimensions and its values.
pub fn parse_idx(path: &Path, bytes: &[u8]) -> Result<(Vec<usize>, Vec<u8>), Error> {
    let bad = |why: String| Error::format(path, why);
    if bytes.len() < 4 {
        return Err(bad(format!(
            "{} bytes: too short for an IDX header",
            bytes.len()
        )));
    }
    if bytes[0] != 0 || bytes[1] != 0 {
        return Err(bad("not an IDX file (the first two bytes must be 0)".into()));
    }
    if bytes[2] != 0x08 {
        return Err(bad(format!(
            "IDX type code 0x{:02x}; only unsigned bytes (0x08) are supported",
            bytes[2]
        )));
    }
    let ndim = bytes[3] as usize;
    let header = 4 + 4 * ndim;
    if ndim == 0 || bytes.len() < header {
        return Err(bad(format!("IDX header of {ndim} dimensions is cut short")));
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|i| {
            let b = &bytes[4 + 4 * i..8 + 4 * i];
            u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize
        })
        .collect();
    let want = dims
        .iter()
        .try_fold(1usize, |a, d| a.checked_mul(*d))
        .ok_or_else(|| bad(format!("dimensions {dims:?} overflow")))?;
    let have = bytes.len() - header;
    if have != want {
        return Err(bad(format!(
            "dimensions {dims:?} need {want} values but the file holds {have}{}",
            if have < want { " (truncated?)" } else { "" }
        )));
    }
    Ok((dims, bytes[header..].to_vec()))
}

/// The path of `<prefix>-<kind>-idx<n>-ubyte`, with or without `.gz`.
fn find(dir: &Path, split: Split, kind: &str, n: u8) -> Result<PathBuf, Error> {
    let name = format!("{}-{kind}-idx{n}-ubyte", split.prefix());
    for candidate in [name.clone(), format!("{name}.gz")] {
        let p = dir.join(&candidate);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(Error::Io {
        path: dir.join(format!("{name}[.gz]")),
        error: std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no such file: point --data at a directory with MNIST-format IDX files \
             (e.g. /usr/share/datasets/fashion-mnist from Debian's dataset-fashion-mnist) \
             or CIFAR-10 binary files (data_batch_1.bin …, test_batch.bin)",
        ),
    })
}

impl Dataset {
    /// SHA-256 of the decoded images, as 64 hex digits: the image shape (three
    /// little-endian u64), the labels, then the pixels. Two workers with this fingerprint
    /// sample the same minibatches from an instance's seed.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for d in self.shape {
            h.update((d as u64).to_le_bytes());
        }
        h.update(&self.labels);
        h.update(&self.images);
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Reads one split from `dir` (`train-images-idx3-ubyte[.gz]`, `train-labels-idx1-ubyte[.gz]`,
    /// or `t10k-...`), refusing files that disagree with each other.
    pub fn load(dir: &Path, split: Split) -> Result<Self, Error> {
        let ip = find(dir, split, "images", 3)?;
        let lp = find(dir, split, "labels", 1)?;
        let (idims, images) = parse_idx(&ip, &read_bytes(&ip)?)?;
        let (ldims, labels) = parse_idx(&lp, &read_bytes(&lp)?)?;
        Self::from_parts(&ip, &idims, images, &lp, &ldims, labels)
    }

    /// Checks parsed images `[n, rows, cols]` against labels `[n]`.
    pub fn from_parts(
        ip: &Path,
        idims: &[usize],
        images: Vec<u8>,
        lp: &Path,
        ldims: &[usize],
        labels: Vec<u8>,
    ) -> Result<Self, Error> {
        if idims.len() != 3 {
            return Err(Error::format(
                ip,
                format!("images must have 3 dimensions [n, rows, cols], got {idims:?}"),
            ));
        }
        if ldims.len() != 1 {
            return Err(Error::format(
                lp,
                format!("labels must have 1 dimension [n], got {ldims:?}"),
            ));
        }
        if idims[0] != ldims[0] {
            return Err(Error::format(
                lp,
                format!(
                    "{} labels for {} images in {}: the files do not belong together",
                    ldims[0],
                    idims[0],
                    ip.display()
                ),
            ));
        }
        if idims[0] == 0 {
            return Err(Error::format(ip, "the file holds no images"));
        }
        if let Some(l) = labels.iter().find(|l| **l > 9) {
            return Err(Error::format(lp, format!("label {l} is not a class 0..=9")));
        }
        Ok(Self {
            pixels: idims[1] * idims[2],
            shape: [1, idims[1], idims[2]],
            images,
            labels,
        })
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no examples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Image `i` scaled to [0, 1].
    pub fn image(&self, i: usize) -> impl Iterator<Item = f32> + '_ {
        self.images[i * self.pixels..(i + 1) * self.pixels]
            .iter()
            .map(|b| *b as f32 / 255.0)
    }
}

/// Encodes values as an IDX file of unsigned bytes (for tests and small data sets).
pub fn encode_idx(dims: &[usize], values: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 0x08, dims.len() as u8];
    for d in dims {
        out.extend_from_slice(&(*d as u32).to_be_bytes());
    }
    out.extend_from_slice(values);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fingerprint is SHA-256 of exactly the bytes its docs name (the expected value
    /// by Python's hashlib: `sha256(struct.pack('<3Q', 1, 1, 2) + bytes([3, 0, 255]))`);
    /// one changed pixel or label changes it.
    #[test]
    fn the_fingerprint_hashes_shape_labels_and_pixels() {
        let mut d = Dataset {
            pixels: 2,
            shape: [1, 1, 2],
            images: vec![0, 255],
            labels: vec![3],
        };
        assert_eq!(
            d.fingerprint(),
            "4012a8c7ecb7204d4858f86b68805e591d6d6e45c123aae8404fea1fdb2832c0"
        );
        let a = d.fingerprint();
        d.images[0] = 1;
        assert_ne!(d.fingerprint(), a);
        d.images[0] = 0;
        d.labels[0] = 4;
        assert_ne!(d.fingerprint(), a);
    }

    fn write(dir: &Path, name: &str, bytes: &[u8], gzip: bool) {
        let data = if gzip {
            use std::io::Write;
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(bytes).unwrap();
            e.finish().unwrap()
        } else {
            bytes.to_vec()
        };
        std::fs::write(dir.join(name), data).unwrap();
    }

    #[test]
    fn plain_and_gzip_idx_files_load_and_scale() {
        let dir = tempfile::tempdir().unwrap();
        let pixels: Vec<u8> = (0..2 * 2 * 3).map(|i| (i * 20) as u8).collect();
        write(
            dir.path(),
            "train-images-idx3-ubyte.gz",
            &encode_idx(&[2, 2, 3], &pixels),
            true,
        );
        write(
            dir.path(),
            "train-labels-idx1-ubyte",
            &encode_idx(&[2], &[7, 1]),
            false,
        );
        let d = Dataset::load(dir.path(), Split::Train).unwrap();
        assert_eq!((d.len(), d.pixels), (2, 6));
        assert_eq!(d.labels, [7, 1]);
        let second: Vec<f32> = d.image(1).collect();
        assert_eq!(second[0], 120.0 / 255.0);
        assert_eq!(second[5], 220.0 / 255.0);
    }

    #[test]
    fn truncated_mismatched_and_foreign_files_are_refused_by_name() {
        let p = Path::new("x.idx");
        let good = encode_idx(&[2, 2, 2], &[0; 8]);
        let e = parse_idx(p, &good[..good.len() - 1])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("need 8 values but the file holds 7 (truncated?)"),
            "{e}"
        );
        let e = parse_idx(p, &good[..6]).unwrap_err().to_string();
        assert!(e.contains("cut short"), "{e}");
        let e = parse_idx(p, b"\x89PNG....").unwrap_err().to_string();
        assert!(e.contains("not an IDX file"), "{e}");
        let mut float = good.clone();
        float[2] = 0x0d;
        let e = parse_idx(p, &float).unwrap_err().to_string();
        assert!(e.contains("0x0d"), "{e}");

        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "t10k-images-idx3-ubyte", &good, false);
        write(
            dir.path(),
            "t10k-labels-idx1-ubyte",
            &encode_idx(&[3], &[0, 1, 2]),
            false,
        );
        let e = Dataset::load(dir.path(), Split::Test)
            .unwrap_err()
            .to_string();
        assert!(e.contains("3 labels for 2 images"), "{e}");
        let e = Dataset::load(dir.path(), Split::Train)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("train-images-idx3-ubyte[.gz]") && e.contains("--data"),
            "{e}"
        );
        write(
            dir.path(),
            "t10k-labels-idx1-ubyte",
            &encode_idx(&[2], &[0, 12]),
            false,
        );
        let e = Dataset::load(dir.path(), Split::Test)
            .unwrap_err()
            .to_string();
        assert!(e.contains("label 12"), "{e}");
    }

    #[test]
    fn a_gzip_bomb_is_cut_off_at_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        // 1 MB of zeros gzips to a few KB.
        write(dir.path(), "bomb", &vec![0u8; 1 << 20], true);
        let path = dir.path().join("bomb");
        assert!(std::fs::metadata(&path).unwrap().len() < 16 << 10);
        let e = read_capped(&path, 64 << 10).unwrap_err().to_string();
        assert!(e.contains("more than 65536 bytes"), "{e}");
        assert_eq!(read_capped(&path, 2 << 20).unwrap().len(), 1 << 20);
        write(dir.path(), "plain", &vec![0u8; 100_000], false);
        let e = read_capped(&dir.path().join("plain"), 64 << 10).unwrap_err();
        assert!(e.to_string().contains("more than"), "{e}");
    }

    proptest::proptest! {
        #[test]
        fn random_idx_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let _ = parse_idx(Path::new("<fuzz>"), &bytes);
        }
    }
}
