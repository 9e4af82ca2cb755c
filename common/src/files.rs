//! The file formats of spec §4 (`l2l-lstm/1` optimizers and meta-gradients, problem
//! instances) in safetensors, and φ's own file I/O (`Phi::load`, `Phi::save`).
//!
//! Readers are strict: an unknown format, a missing metadata field or tensor, a tensor
//! that is not float32, a shape that disagrees with the metadata, or a non-finite number
//! is refused with a message naming the file and what is wrong. Writers replace files
//! atomically (temporary file, fsync, rename), so a crash never leaves half a file.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use safetensors::{Dtype, SafeTensors};

use crate::{Error, OptimizerConfig, Phi, Preprocess};

/// The format tag of optimizer and meta-gradient files.
pub const FORMAT: &str = "l2l-lstm/1";

/// Largest file [`TensorFile::read`] reads: a checkpoint of the largest φ accepted
/// ([`crate::config::MAX_PARAMS`] values, three tensors' worth) with room for its header.
pub const MAX_FILE_BYTES: u64 = 1 << 30;

/// A safetensors file read whole: its metadata and float32 tensors.
#[derive(Debug)]
pub struct TensorFile {
    path: PathBuf,
    metadata: HashMap<String, String>,
    tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

impl TensorFile {
    /// Reads `path` (at most [`MAX_FILE_BYTES`]), refusing anything but float32 tensors.
    pub fn read(path: &Path) -> Result<Self, Error> {
        use std::io::Read;
        let io = |error| Error::Io {
            path: path.into(),
            error,
        };
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes))
            .map_err(io)?;
        if bytes.len() as u64 > MAX_FILE_BYTES {
            return Err(Error::format(
                path,
                format!("larger than {MAX_FILE_BYTES} bytes; no l2l file is that large"),
            ));
        }
        Self::parse(path, &bytes)
    }

    /// Parses safetensors `bytes` that came from `path` (used in messages).
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Self, Error> {
        let bad = |reason: String| Error::format(path, reason);
        let (_, header) = SafeTensors::read_metadata(bytes)
            .map_err(|e| bad(format!("not a safetensors file ({e})")))?;
        let metadata = header.metadata().clone().unwrap_or_default();
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| bad(format!("not a safetensors file ({e})")))?;
        let mut tensors = BTreeMap::new();
        for (name, view) in st.tensors() {
            if view.dtype() != Dtype::F32 {
                return Err(bad(format!(
                    "tensor {name} is {:?}; l2l files hold float32 only",
                    view.dtype()
                )));
            }
            let values = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            tensors.insert(name, (view.shape().to_vec(), values));
        }
        Ok(Self {
            path: path.into(),
            metadata,
            tensors,
        })
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The whole `__metadata__` map.
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// A metadata field that must be present.
    pub fn meta(&self, key: &str) -> Result<&str, Error> {
        self.metadata
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| Error::format(&self.path, format!("metadata field {key:?} is missing")))
    }

    /// A metadata field parsed as `T`.
    pub fn meta_parse<T: FromStr>(&self, key: &str) -> Result<T, Error>
    where
        T::Err: std::fmt::Display,
    {
        let raw = self.meta(key)?;
        raw.parse().map_err(|e| {
            Error::format(
                &self.path,
                format!("metadata field {key:?} = {raw:?} is not valid ({e})"),
            )
        })
    }

    /// The shape of tensor `name`, if the file has it.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|(s, _)| s.as_slice())
    }

    /// Removes tensor `name`, checking it has `shape` and only finite values.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>, Error> {
        let (got, values) = self
            .tensors
            .remove(name)
            .ok_or_else(|| Error::format(&self.path, format!("tensor {name:?} is missing")))?;
        if got != shape {
            return Err(Error::format(
                &self.path,
                format!("tensor {name:?} has shape {got:?}, the metadata implies {shape:?}"),
            ));
        }
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(Error::format(
                &self.path,
                format!(
                    "tensor {name:?} holds a non-finite value ({}) at index {i}",
                    values[i]
                ),
            ));
        }
        Ok(values)
    }

    /// Refuses any tensor not yet taken: it does not belong to the format.
    pub fn expect_no_more(&self, what: &str) -> Result<(), Error> {
        match self.tensors.keys().next() {
            None => Ok(()),
            Some(name) => Err(Error::format(
                &self.path,
                format!("unexpected tensor {name:?}: not part of {what}"),
            )),
        }
    }
}

/// One tensor to write: name, shape and row-major values.
pub type NamedTensor<'a> = (&'a str, &'a [usize], &'a [f32]);

/// Encodes tensors and metadata as safetensors bytes, the same bytes on every run.
///
/// Written here rather than with `safetensors::serialize`, whose header orders the
/// metadata by a randomly seeded `HashMap`: two writes of the same φ would differ.
/// Layout per the format: u64 LE header size, JSON header (keys sorted, padded with
/// spaces to a multiple of 8), then the tensors' little-endian bytes in the given order.
pub fn encode(
    tensors: &[NamedTensor<'_>],
    metadata: HashMap<String, String>,
) -> Result<Vec<u8>, Error> {
    use serde_json::{Map, Value, json};
    let mut header = Map::new();
    let sorted: BTreeMap<String, String> = metadata.into_iter().collect();
    header.insert("__metadata__".into(), json!(sorted));
    let mut offset = 0usize;
    for (name, shape, values) in tensors {
        let n: usize = shape.iter().product();
        if n != values.len() {
            return Err(Error::Shape(format!(
                "tensor {name}: shape {shape:?} needs {n} values, got {}",
                values.len()
            )));
        }
        if *name == "__metadata__" || header.contains_key(*name) {
            return Err(Error::Shape(format!(
                "tensor name {name:?} is used twice or reserved"
            )));
        }
        let end = offset + 4 * n;
        header.insert(
            name.to_string(),
            json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut json = serde_json::to_vec(&Value::Object(header))
        .map_err(|e| Error::Shape(format!("cannot encode the header: {e}")))?;
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len() + offset);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    for (_, _, values) in tensors {
        for v in *values {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    Ok(out)
}

/// Writes `bytes` to `path` atomically: a sibling temporary file, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let io = |error| Error::Io {
        path: path.into(),
        error,
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
    tmp.write_all(bytes).map_err(io)?;
    // Readable by others like any file the user writes (temporary files start as 0600).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let perms = std::fs::Permissions::from_mode(0o644);
        tmp.as_file().set_permissions(perms).map_err(io)?;
    }
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    // Make the rename itself durable; not every filesystem lets a directory be synced.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The metadata every `l2l-lstm/1` file carries: format and the configuration.
pub fn config_metadata(config: &OptimizerConfig) -> HashMap<String, String> {
    HashMap::from([
        ("format".into(), FORMAT.into()),
        ("preprocess".into(), config.preprocess.name().into()),
        ("k".into(), format!("{}", config.k)),
        ("hidden".into(), config.hidden.to_string()),
        ("layers".into(), config.layers.to_string()),
        ("out_scale".into(), format!("{}", config.out_scale)),
    ])
}

/// Reads format and configuration from a file's metadata, refusing unknown formats.
pub fn config_from(file: &TensorFile) -> Result<OptimizerConfig, Error> {
    let format = file.meta("format")?;
    if format != FORMAT {
        return Err(Error::format(
            file.path(),
            format!("unknown format {format:?}; this build reads {FORMAT:?}"),
        ));
    }
    let preprocess: Preprocess = file.meta_parse("preprocess")?;
    let config = OptimizerConfig {
        preprocess,
        k: file.meta_parse("k")?,
        hidden: file.meta_parse("hidden")?,
        layers: file.meta_parse("layers")?,
        out_scale: file.meta_parse("out_scale")?,
    };
    config
        .validate()
        .map_err(|e| Error::format(file.path(), e.to_string()))?;
    Ok(config)
}

/// Takes φ's tensors from `file` by the layout `config` implies; refuses extra tensors.
pub fn phi_from(file: &mut TensorFile, config: OptimizerConfig) -> Result<Phi, Error> {
    if let Some(groups) = file.metadata().get(crate::groups::GROUPS_FIELD) {
        return Err(Error::format(
            file.path(),
            format!(
                "holds one LSTM per parameter group ({groups}; spec §5), not one φ; read it \
                 as grouped φ (`PhiGroups::load`, `LearnedOptimizer::load_groups`)"
            ),
        ));
    }
    let tensors = config
        .tensor_layout()
        .iter()
        .map(|(name, shape)| file.take(name, shape))
        .collect::<Result<Vec<_>, _>>()?;
    file.expect_no_more(&format!("an {FORMAT} file with layers = {}", config.layers))?;
    Phi::from_tensors(config, tensors)
}

/// Encodes φ (or a gradient) as an `l2l-lstm/1` file with `metadata` added.
pub fn encode_phi(phi: &Phi, mut metadata: HashMap<String, String>) -> Result<Vec<u8>, Error> {
    metadata.extend(config_metadata(&phi.config));
    let layout = phi.config.tensor_layout();
    let named: Vec<NamedTensor<'_>> = layout
        .iter()
        .zip(&phi.tensors)
        .map(|((n, s), v)| (n.as_str(), s.as_slice(), v.as_slice()))
        .collect();
    encode(&named, metadata)
}

impl Phi {
    /// Reads an optimizer file (spec §4.1).
    pub fn load(path: &Path) -> Result<Self, Error> {
        let mut file = TensorFile::read(path)?;
        let config = config_from(&file)?;
        phi_from(&mut file, config)
    }

    /// Reads φ from an optimizer file or from a coordinator checkpoint, whose Adam
    /// moments (`adam.m`, `adam.v`) are skipped.
    pub fn load_any(path: &Path) -> Result<Self, Error> {
        Self::any_from(TensorFile::read(path)?)
    }

    /// φ from a file already read, as [`Phi::load_any`] takes it.
    pub fn any_from(mut file: TensorFile) -> Result<Self, Error> {
        let config = config_from(&file)?;
        for moment in ["adam.m", "adam.v"] {
            if let Some(shape) = file.shape(moment).map(<[usize]>::to_vec) {
                file.take(moment, &shape)?;
            }
        }
        phi_from(&mut file, config)
    }

    /// Writes an optimizer file (spec §4.1) atomically, with `extra` metadata fields.
    pub fn save(&self, path: &Path, extra: HashMap<String, String>) -> Result<(), Error> {
        write_atomic(path, &encode_phi(self, extra)?)
    }
}

/// The meta-gradient of one truncation as a file holds it (spec §4.1).
#[derive(Debug, Clone, PartialEq)]
pub struct MetaGradFile {
    /// ∂L/∂φ, same names and shapes as φ (with its groups, spec §5).
    pub grad: crate::AnyPhi,
    /// L, the truncation's meta-loss.
    pub meta_loss: f64,
    /// T, the truncation's length.
    pub steps: usize,
}

impl MetaGradFile {
    /// Reads a meta-gradient file.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let mut file = TensorFile::read(path)?;
        let config = config_from(&file)?;
        let meta_loss: f64 = file.meta_parse("meta_loss")?;
        let steps = file.meta_parse("steps")?;
        if !meta_loss.is_finite() {
            return Err(Error::format(path, format!("meta_loss is {meta_loss}")));
        }
        let grad = crate::AnyPhi::take_from(&mut file, config)?;
        Ok(Self {
            grad,
            meta_loss,
            steps,
        })
    }

    /// Writes a meta-gradient file atomically.
    pub fn save(&self, path: &Path) -> Result<(), Error> {
        let meta = HashMap::from([
            // `{:?}` prints the shortest string that reads back to the same f64.
            ("meta_loss".to_string(), format!("{:?}", self.meta_loss)),
            ("steps".to_string(), self.steps.to_string()),
        ]);
        write_atomic(path, &self.grad.encode(meta)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    /// Writes tensors (f32) with metadata, bypassing `Phi`'s checks, to make bad files.
    fn write_raw(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)], meta: &[(&str, &str)]) {
        let named: Vec<NamedTensor<'_>> = tensors
            .iter()
            .map(|(n, s, v)| (n.as_str(), s.as_slice(), v.as_slice()))
            .collect();
        let meta = meta
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        write_atomic(path, &encode(&named, meta).unwrap()).unwrap();
    }

    fn good_parts() -> (
        Vec<(String, Vec<usize>, Vec<f32>)>,
        Vec<(&'static str, &'static str)>,
    ) {
        let cfg = OptimizerConfig {
            hidden: 3,
            ..OptimizerConfig::default()
        };
        let phi = Phi::init(cfg, 9).unwrap();
        let tensors = cfg
            .tensor_layout()
            .into_iter()
            .zip(phi.tensors)
            .map(|((n, s), v)| (n, s, v))
            .collect();
        let meta = vec![
            ("format", FORMAT),
            ("preprocess", "log_sign"),
            ("k", "10"),
            ("hidden", "3"),
            ("layers", "2"),
            ("out_scale", "0.1"),
        ];
        (tensors, meta)
    }

    fn refusal(
        edit: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<f32>)>, &mut Vec<(&str, &str)>),
    ) -> String {
        let dir = tmp();
        let path = dir.path().join("phi.safetensors");
        let (mut t, mut m) = good_parts();
        edit(&mut t, &mut m);
        write_raw(&path, &t, &m);
        Phi::load(&path).unwrap_err().to_string()
    }

    #[test]
    fn phi_round_trip_and_next_step_identical() {
        let dir = tmp();
        let path = dir.path().join("phi.safetensors");
        let phi = Phi::init(OptimizerConfig::new(Preprocess::Identity), 3).unwrap();
        phi.save(&path, HashMap::new()).unwrap();
        let back = Phi::load(&path).unwrap();
        assert_eq!(back, phi);
        // Same values bit for bit, so the next optimizer step is identical too.
        let flat_a: Vec<u32> = phi.flatten().iter().map(|v| v.to_bits()).collect();
        let flat_b: Vec<u32> = back.flatten().iter().map(|v| v.to_bits()).collect();
        assert_eq!(flat_a, flat_b);
    }

    #[test]
    fn good_parts_load() {
        let dir = tmp();
        let path = dir.path().join("phi.safetensors");
        let (t, m) = good_parts();
        write_raw(&path, &t, &m);
        assert_eq!(Phi::load(&path).unwrap().config.hidden, 3);
    }

    #[test]
    fn encoding_is_deterministic_and_readable_by_the_safetensors_crate() {
        let phi = Phi::init(OptimizerConfig::default(), 2).unwrap();
        let a = encode_phi(
            &phi,
            HashMap::from([("x".into(), "1".into()), ("a".into(), "2".into())]),
        )
        .unwrap();
        for _ in 0..5 {
            let b = encode_phi(
                &phi,
                HashMap::from([("a".into(), "2".into()), ("x".into(), "1".into())]),
            )
            .unwrap();
            assert_eq!(a, b, "same φ, same bytes");
        }
        let st = SafeTensors::deserialize(&a).unwrap();
        let w = st.tensor("lstm.1.w_h").unwrap();
        assert_eq!(w.shape(), &[20, 80]);
        assert_eq!(&w.data()[..4], &phi.tensors[4][0].to_le_bytes());
        let (n, meta) = SafeTensors::read_metadata(&a).unwrap();
        assert_eq!(n % 8, 0);
        assert_eq!(meta.metadata().as_ref().unwrap()["format"], FORMAT);
    }

    #[test]
    fn meta_grad_round_trip() {
        let dir = tmp();
        let path = dir.path().join("grad.safetensors");
        let g = MetaGradFile {
            grad: Phi::init(OptimizerConfig::default(), 4).unwrap().into(),
            meta_loss: 0.1 + 0.2,
            steps: 20,
        };
        g.save(&path).unwrap();
        assert_eq!(MetaGradFile::load(&path).unwrap(), g);
    }

    #[test]
    fn refuses_unknown_format() {
        let e = refusal(|_, m| m[0].1 = "l2l-lstm/2");
        assert!(e.contains("unknown format \"l2l-lstm/2\""), "{e}");
    }

    #[test]
    fn refuses_missing_metadata() {
        let e = refusal(|_, m| m.retain(|(k, _)| *k != "hidden"));
        assert!(e.contains("\"hidden\" is missing"), "{e}");
    }

    #[test]
    fn refuses_missing_tensor() {
        let e = refusal(|t, _| t.retain(|(n, _, _)| n != "lstm.1.w_h"));
        assert!(e.contains("tensor \"lstm.1.w_h\" is missing"), "{e}");
    }

    #[test]
    fn refuses_shape_that_disagrees_with_metadata() {
        // The file says hidden = 4 but its tensors were made for hidden = 3.
        let e = refusal(|_, m| m[3].1 = "4");
        assert!(e.contains("tensor \"lstm.0.w_x\" has shape [2, 12]"), "{e}");
        assert!(e.contains("implies [2, 16]"), "{e}");
    }

    #[test]
    fn refuses_non_finite_values() {
        let e = refusal(|t, _| t[4].2[5] = f32::NAN);
        assert!(
            e.contains("\"lstm.1.w_h\"") && e.contains("NaN") && e.contains("index 5"),
            "{e}"
        );
        let e = refusal(|t, _| t[0].2[0] = f32::INFINITY);
        assert!(e.contains("\"lstm.0.w_x\"") && e.contains("inf"), "{e}");
    }

    #[test]
    fn refuses_extra_tensor_and_bad_values() {
        let e = refusal(|t, _| t.push(("lstm.2.b".into(), vec![12], vec![0.0; 12])));
        assert!(e.contains("unexpected tensor \"lstm.2.b\""), "{e}");
        let e = refusal(|_, m| m[1].1 = "sign");
        assert!(e.contains("unknown preprocess \"sign\""), "{e}");
        let e = refusal(|_, m| m[2].1 = "ten");
        assert!(e.contains("\"k\" = \"ten\" is not valid"), "{e}");
    }

    #[test]
    fn refuses_missing_and_garbage_files() {
        let dir = tmp();
        let e = Phi::load(&dir.path().join("nope")).unwrap_err().to_string();
        assert!(e.contains("nope") && e.contains("No such file"), "{e}");
        let path = dir.path().join("garbage");
        std::fs::write(&path, b"hello").unwrap();
        let e = Phi::load(&path).unwrap_err().to_string();
        assert!(e.contains("not a safetensors file"), "{e}");
    }

    mod fuzz {
        //! Random and mutated bytes through every reader of this module: never a panic,
        //! never an allocation beyond the input's size, never a non-finite φ.

        use super::*;
        use proptest::prelude::*;

        fn valid_file() -> Vec<u8> {
            let phi = Phi::init(
                OptimizerConfig {
                    hidden: 3,
                    ..OptimizerConfig::default()
                },
                5,
            )
            .unwrap();
            encode_phi(
                &phi,
                HashMap::from([
                    ("meta_loss".into(), "0.5".into()),
                    ("steps".into(), "3".into()),
                ]),
            )
            .unwrap()
        }

        /// What every reader does with `bytes`; panics only if a reader does.
        fn read_all_ways(bytes: &[u8]) {
            let path = Path::new("<fuzz>");
            if let Ok(mut f) = TensorFile::parse(path, bytes)
                && let Ok(config) = config_from(&f)
                && let Ok(phi) = phi_from(&mut f, config)
            {
                assert!(phi.flatten().iter().all(|v| v.is_finite()));
                assert!(phi.config.num_params() <= crate::config::MAX_PARAMS);
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

            #[test]
            fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
                read_all_ways(&bytes);
            }

            #[test]
            fn a_valid_file_with_random_bytes_changed_never_panics(
                edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..16),
                cut in any::<prop::sample::Index>(),
                truncate in any::<bool>(),
            ) {
                let mut bytes = valid_file();
                for (at, b) in edits {
                    let i = at.index(bytes.len());
                    bytes[i] = b;
                }
                if truncate {
                    bytes.truncate(cut.index(bytes.len()));
                }
                read_all_ways(&bytes);
            }

            #[test]
            fn absurd_metadata_values_never_panic(
                key in prop::sample::select(vec!["hidden", "layers", "k", "out_scale", "preprocess", "format"]),
                value in prop::sample::select(vec![
                    "0", "-1", "1e308", "NaN", "inf", "18446744073709551615", "10000000000000",
                    "4096", "64", "", "log_sign", "l2l-lstm/1", "\u{0}",
                ]),
            ) {
                let bytes = valid_file();
                let text = String::from_utf8_lossy(&bytes[8..]).into_owned();
                let old = format!("\"{key}\":\"");
                if let Some(at) = text.find(&old) {
                    let start = at + old.len();
                    let end = start + text[start..].find('"').unwrap();
                    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
                    let mut header = text[..header_len].to_string();
                    header.replace_range(start..end, value);
                    let mut out = (header.len() as u64).to_le_bytes().to_vec();
                    out.extend_from_slice(header.as_bytes());
                    out.extend_from_slice(&bytes[8 + header_len..]);
                    read_all_ways(&out);
                }
            }
        }
    }
}
