//! Photographs and style images for the `art` family: a directory of PNG and JPEG files,
//! read by name, decoded once and kept.
//!
//! An image named `NAME` is the file `DIR/NAME.png`, `DIR/NAME.jpg` or `DIR/NAME.jpeg`
//! (the first that exists). Decoding is exact and the same on every machine: each pixel
//! becomes three f32 values in [0, 1] (an 8-bit value v is v/255, a 16-bit one v/65535);
//! grey images repeat their value in the three channels and an alpha channel is dropped.
//! Pixels are stored planar, channel by channel, each row-major: `[3, height, width]`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::Error;

/// Longest image name.
pub const MAX_NAME: usize = 64;
/// Largest side of an image file that is decoded (at most 64 Mpx: 768 MB as f32).
pub const MAX_SIDE: u32 = 8192;
/// Most bytes the decoder may allocate for one image.
pub const MAX_DECODE_BYTES: u64 = 512 << 20;
/// Most image files a directory's fingerprint reads.
pub const MAX_FILES: usize = 4096;
/// Largest image file a fingerprint reads.
pub const MAX_FILE_BYTES: u64 = 256 << 20;
/// The file endings tried, in order.
pub const EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// An RGB image, planar `[3, height, width]`, values in [0, 1].
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
    /// `3 · height · width` values, channel by channel, each row-major.
    pub pixels: Vec<f32>,
}

impl Image {
    /// An image of `pixels` `[3, height, width]`; refuses a wrong length.
    pub fn new(height: usize, width: usize, pixels: Vec<f32>) -> Result<Self, Error> {
        if height.checked_mul(width).and_then(|n| n.checked_mul(3)) != Some(pixels.len()) {
            return Err(Error::Shape(format!(
                "an image of {height}×{width} pixels needs {} values, not {}",
                3 * height * width,
                pixels.len()
            )));
        }
        Ok(Self {
            height,
            width,
            pixels,
        })
    }

    /// The image shrunk by `r`: each output pixel the mean of an r×r block (rows and
    /// columns that do not fill a block are dropped), summed in f64 in row-major order.
    pub fn reduced(&self, r: usize) -> Image {
        let r = r.max(1);
        let (h, w) = (self.height / r, self.width / r);
        let mut out = vec![0f32; 3 * h * w];
        for c in 0..3 {
            let plane = &self.pixels[c * self.height * self.width..];
            for y in 0..h {
                for x in 0..w {
                    let mut s = 0f64;
                    for dy in 0..r {
                        let row = &plane[(y * r + dy) * self.width + x * r..][..r];
                        s += row.iter().map(|v| *v as f64).sum::<f64>();
                    }
                    out[(c * h + y) * w + x] = (s / (r * r) as f64) as f32;
                }
            }
        }
        Image {
            height: h,
            width: w,
            pixels: out,
        }
    }

    /// The `h`×`w` window whose top-left pixel is (`y`, `x`); it must lie inside.
    pub fn crop(&self, y: usize, x: usize, h: usize, w: usize) -> Image {
        assert!(
            y + h <= self.height && x + w <= self.width,
            "crop outside the image"
        );
        let mut out = Vec::with_capacity(3 * h * w);
        for c in 0..3 {
            for row in y..y + h {
                let at = (c * self.height + row) * self.width + x;
                out.extend_from_slice(&self.pixels[at..at + w]);
            }
        }
        Image {
            height: h,
            width: w,
            pixels: out,
        }
    }

    /// Interleaved 8-bit RGB rows (for PNG files): each value clamped to [0, 1], rounded.
    pub fn to_rgb8(&self) -> Vec<u8> {
        let n = self.height * self.width;
        let mut out = Vec::with_capacity(3 * n);
        for i in 0..n {
            for c in 0..3 {
                out.push((self.pixels[c * n + i].clamp(0.0, 1.0) * 255.0).round() as u8);
            }
        }
        out
    }
}

/// Refuses a name that is not 1..=[`MAX_NAME`] letters, digits, `_` or `-` (so a name from
/// the wire can never reach outside its directory).
pub fn check_name(name: &str) -> Result<(), Error> {
    let ok = (1..=MAX_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "image name {name:?}: use 1 to {MAX_NAME} letters, digits, _ or - (the file's \
             name without .png, .jpg or .jpeg)"
        )))
    }
}

/// Reads and decodes one image file within the decoder limits.
pub fn read(path: &Path) -> Result<Image, Error> {
    let bad = |why: String| Error::format(path, why);
    let mut reader = image::ImageReader::open(path)
        .map_err(|error| Error::Io {
            path: path.to_path_buf(),
            error,
        })?
        .with_guessed_format()
        .map_err(|error| Error::Io {
            path: path.to_path_buf(),
            error,
        })?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits);
    let decoded = reader
        .decode()
        .map_err(|e| bad(format!("not a readable PNG or JPEG image: {e}")))?;
    let (w, h) = (decoded.width() as usize, decoded.height() as usize);
    if w == 0 || h == 0 {
        return Err(bad("the image has no pixels".into()));
    }
    // Straight from 8 or 16 bits to planar f32: no interleaved f32 copy of a large image.
    let mut pixels = vec![0f32; 3 * h * w];
    let mut put = |i: usize, px: [f32; 3]| {
        for (c, v) in px.into_iter().enumerate() {
            pixels[c * h * w + i] = v;
        }
    };
    if decoded.color().bytes_per_pixel() / decoded.color().channel_count() > 1 {
        for (i, px) in decoded.to_rgb16().pixels().enumerate() {
            put(i, px.0.map(|v| v as f32 / 65535.0));
        }
    } else {
        for (i, px) in decoded.to_rgb8().pixels().enumerate() {
            put(i, px.0.map(|v| v as f32 / 255.0));
        }
    }
    Image::new(h, w, pixels)
}

/// The images of one directory, each decoded on first use and kept.
#[derive(Debug)]
pub struct ImageSet {
    dir: PathBuf,
    loaded: Mutex<HashMap<String, Arc<Image>>>,
}

impl ImageSet {
    /// The images in `dir`, none read yet.
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            loaded: Mutex::new(HashMap::new()),
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file of image `name`, or a refusal that says where it was looked for.
    pub fn path_of(&self, name: &str) -> Result<PathBuf, Error> {
        check_name(name)?;
        EXTENSIONS
            .iter()
            .map(|e| self.dir.join(format!("{name}.{e}")))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                Error::Config(format!(
                    "no image {name:?} in {} (looked for {name}.png, {name}.jpg and \
                     {name}.jpeg); put it there or give --data DIR with the images \
                     (deploy/art-images.sh DIR fetches the sample photographs and styles)",
                    self.dir.display()
                ))
            })
    }

    /// Image `name`, decoded on the first call.
    pub fn get(&self, name: &str) -> Result<Arc<Image>, Error> {
        if let Some(i) = self.lock().get(name) {
            return Ok(i.clone());
        }
        let image = Arc::new(read(&self.path_of(name)?)?);
        self.lock().insert(name.to_string(), image.clone());
        Ok(image)
    }

    /// SHA-256 of the directory's image files, as 64 hex digits: for each file ending
    /// in .png, .jpg or .jpeg, by name in byte order, its name's length (little-endian
    /// u64), its name, its length (u64) and its bytes. Two workers with this fingerprint
    /// read the same images (at most [`MAX_FILES`] files of [`MAX_FILE_BYTES`] each).
    pub fn fingerprint(&self) -> Result<String, Error> {
        use sha2::{Digest, Sha256};
        let io = |error| Error::Io {
            path: self.dir.clone(),
            error,
        };
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io)? {
            let name = entry.map_err(io)?.file_name();
            let Some(name) = name.to_str() else { continue };
            let image = Path::new(name)
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| EXTENSIONS.contains(&e));
            if image {
                names.push(name.to_string());
            }
            if names.len() > MAX_FILES {
                return Err(Error::Config(format!(
                    "{} holds more than {MAX_FILES} images; give --data a directory of \
                     the images the problems name",
                    self.dir.display()
                )));
            }
        }
        if names.is_empty() {
            return Err(Error::Config(format!(
                "{} holds no .png, .jpg or .jpeg image; give --data DIR with the images \
                 (deploy/art-images.sh DIR fetches the sample photographs and styles)",
                self.dir.display()
            )));
        }
        names.sort();
        let mut h = Sha256::new();
        for name in names {
            let path = self.dir.join(&name);
            let len = std::fs::metadata(&path)
                .map_err(|error| Error::Io {
                    path: path.clone(),
                    error,
                })?
                .len();
            if len > MAX_FILE_BYTES {
                return Err(Error::format(
                    &path,
                    format!("{len} bytes; an image file may have at most {MAX_FILE_BYTES}"),
                ));
            }
            h.update((name.len() as u64).to_le_bytes());
            h.update(name.as_bytes());
            h.update(len.to_le_bytes());
            // Streamed, and exactly the length announced (a file that grows meanwhile
            // hashes differently, never endlessly).
            let read = std::fs::File::open(&path)
                .and_then(|f| std::io::copy(&mut std::io::Read::take(f, len), &mut h))
                .map_err(|error| Error::Io {
                    path: path.clone(),
                    error,
                })?;
            if read != len {
                return Err(Error::format(&path, "the file changed while it was read"));
            }
        }
        Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Image>>> {
        self.loaded.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Writes `image` as an 8-bit RGB PNG file (values clamped to [0, 1]).
pub fn write_png(path: &Path, image: &Image) -> Result<(), Error> {
    let io = |error| Error::Io {
        path: path.to_path_buf(),
        error,
    };
    let rgb = image::RgbImage::from_raw(image.width as u32, image.height as u32, image.to_rgb8())
        .ok_or_else(|| Error::Shape("an image's pixels do not fill it".into()))?;
    let mut bytes = Vec::new();
    rgb.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .map_err(|e| Error::format(path, format!("cannot encode a PNG image: {e}")))?;
    std::fs::write(path, bytes).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reduction_averages_blocks_and_crops_cut_windows() {
        // 3 × 4 pixels, values 0..36 by channel, row, column.
        let img = Image::new(3, 4, (0..36).map(|v| v as f32).collect()).unwrap();
        let r = img.reduced(2);
        assert_eq!((r.height, r.width), (1, 2));
        // Channel 0, block rows 0-1 × columns 0-1: (0 + 1 + 4 + 5) / 4.
        assert_eq!(r.pixels, vec![2.5, 4.5, 14.5, 16.5, 26.5, 28.5]);
        let c = img.crop(1, 2, 2, 2);
        assert_eq!(
            c.pixels,
            vec![6., 7., 10., 11., 18., 19., 22., 23., 30., 31., 34., 35.]
        );
        assert_eq!(img.reduced(1), img);
    }

    #[test]
    fn png_files_round_trip_and_bad_files_and_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let values: Vec<f32> = (0..3 * 5 * 7).map(|i| (i % 256) as f32 / 255.0).collect();
        let img = Image::new(5, 7, values).unwrap();
        write_png(&dir.path().join("a.png"), &img).unwrap();
        let set = ImageSet::new(dir.path());
        let back = set.get("a").unwrap();
        assert_eq!((back.height, back.width), (5, 7));
        // 8-bit values: v/255 exactly as written.
        assert_eq!(back.pixels, img.pixels);
        let fp = set.fingerprint().unwrap();
        assert_eq!(fp.len(), 64);
        // Another file changes it; a file that is no image does not.
        std::fs::write(dir.path().join("notes.txt"), b"x").unwrap();
        assert_eq!(set.fingerprint().unwrap(), fp);
        std::fs::write(dir.path().join("junk.png"), b"not a picture").unwrap();
        assert_ne!(set.fingerprint().unwrap(), fp);
        let empty = tempfile::tempdir().unwrap();
        let e = ImageSet::new(empty.path())
            .fingerprint()
            .unwrap_err()
            .to_string();
        assert!(e.contains("no .png"), "{e}");

        let e = set.get("junk").unwrap_err().to_string();
        assert!(e.contains("not a readable PNG or JPEG"), "{e}");
        let e = set.get("missing").unwrap_err().to_string();
        assert!(
            e.contains("no image \"missing\"") && e.contains("--data"),
            "{e}"
        );
        for bad in ["../a", "a/b", "", "a.png", &"x".repeat(65)] {
            assert!(set.get(bad).is_err(), "{bad}");
        }
    }
}
