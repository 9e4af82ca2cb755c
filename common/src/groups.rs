//! φ with one LSTM per kind of parameter (spec §5): named groups, one configuration.
//!
//! A grouped file names its groups in the `groups` metadata field (`"conv,fc"`) and each
//! tensor of spec §4.1 as `{group}.{name}`; a file without `groups` is the one-group φ of
//! §4.1 ([`Phi`]). The flat order (the wire, Adam's moments) is group by group in file
//! order, each in §4.1 order. Readers never fall back silently from one kind to the other:
//! [`Phi::load`] refuses a grouped file and [`PhiGroups::load`] a one-group one, each
//! saying which loader to use.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

use crate::files::{self, FORMAT, NamedTensor, TensorFile};
use crate::{Error, OptimizerConfig, Phi};

/// Largest number of groups in one φ.
pub const MAX_GROUPS: usize = 64;

/// The metadata field that names a grouped φ's groups.
pub const GROUPS_FIELD: &str = "groups";

/// φ of spec §5: an LSTM per named group, all with one configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct PhiGroups {
    groups: Vec<(String, Phi)>,
}

impl PhiGroups {
    /// Groups in their order; refuses an empty list, bad or repeated names, and groups
    /// whose configurations differ (§5: the groups share one configuration).
    pub fn new(groups: Vec<(String, Phi)>) -> Result<Self, Error> {
        if groups.is_empty() || groups.len() > MAX_GROUPS {
            return Err(Error::Config(format!(
                "a grouped φ needs 1 to {MAX_GROUPS} groups, got {}",
                groups.len()
            )));
        }
        for (i, (name, phi)) in groups.iter().enumerate() {
            check_name(name)?;
            if groups[..i].iter().any(|(n, _)| n == name) {
                return Err(Error::Config(format!("group {name:?} is named twice")));
            }
            if phi.config != groups[0].1.config {
                return Err(Error::Config(format!(
                    "group {name:?} has configuration {:?}, group {:?} has {:?}; the groups \
                     of one φ share one configuration (spec §5)",
                    phi.config, groups[0].0, groups[0].1.config
                )));
            }
        }
        Ok(Self { groups })
    }

    /// Fresh groups for a new run: group i (in `names` order) is [`Phi::init`] with seed
    /// `seed + i` (wrapping), so a one-group φ of `seed` equals the first group's.
    pub fn init(config: OptimizerConfig, names: &[&str], seed: u64) -> Result<Self, Error> {
        let groups = names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                Ok((
                    n.to_string(),
                    Phi::init(config, seed.wrapping_add(i as u64))?,
                ))
            })
            .collect::<Result<Vec<_>, Error>>()?;
        Self::new(groups)
    }

    /// The configuration every group shares.
    pub fn config(&self) -> OptimizerConfig {
        self.groups[0].1.config
    }

    /// The group names in their order.
    pub fn names(&self) -> Vec<&str> {
        self.groups.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// The groups in their order.
    pub fn groups(&self) -> &[(String, Phi)] {
        &self.groups
    }

    /// φ of group `name`.
    pub fn get(&self, name: &str) -> Option<&Phi> {
        self.groups.iter().find(|(n, _)| n == name).map(|(_, p)| p)
    }

    /// All values concatenated in §5's flat order.
    pub fn flatten(&self) -> Vec<f32> {
        self.groups.iter().flat_map(|(_, p)| p.flatten()).collect()
    }

    /// Reads a grouped optimizer file (spec §5) or a coordinator checkpoint of one (its
    /// Adam moments are skipped).
    pub fn load(path: &Path) -> Result<Self, Error> {
        let file = TensorFile::read(path)?;
        if group_names(&file)?.is_none() {
            return Err(Error::format(
                path,
                "a one-group φ (no \"groups\" metadata field); read it as one φ \
                 (`Phi::load`, `LearnedOptimizer::load`)",
            ));
        }
        match AnyPhi::from_file(file)? {
            AnyPhi::Groups(g) => Ok(g),
            AnyPhi::One(_) => Err(Error::format(path, "no \"groups\" metadata field")),
        }
    }

    /// Encodes the groups as one file (spec §5) with `extra` metadata fields.
    pub fn encode(&self, extra: HashMap<String, String>) -> Result<Vec<u8>, Error> {
        AnyPhi::Groups(self.clone()).encode(extra)
    }

    /// Writes a grouped optimizer file atomically.
    pub fn save(&self, path: &Path, extra: HashMap<String, String>) -> Result<(), Error> {
        files::write_atomic(path, &self.encode(extra)?)
    }
}

/// φ of either kind, as a run holds it: the one-group φ of spec §4.1, or named groups
/// (§5). Gradients with respect to φ use the same type.
#[derive(Debug, Clone, PartialEq)]
pub enum AnyPhi {
    /// One LSTM for every coordinate (§4.1).
    One(Phi),
    /// One LSTM per named group (§5).
    Groups(PhiGroups),
}

impl From<Phi> for AnyPhi {
    fn from(phi: Phi) -> Self {
        AnyPhi::One(phi)
    }
}

impl From<PhiGroups> for AnyPhi {
    fn from(g: PhiGroups) -> Self {
        AnyPhi::Groups(g)
    }
}

impl AnyPhi {
    /// The configuration every LSTM shares.
    pub fn config(&self) -> OptimizerConfig {
        match self {
            AnyPhi::One(p) => p.config,
            AnyPhi::Groups(g) => g.config(),
        }
    }

    /// The group names in order; `None` for a one-group φ.
    pub fn names(&self) -> Option<Vec<&str>> {
        match self {
            AnyPhi::One(_) => None,
            AnyPhi::Groups(g) => Some(g.names()),
        }
    }

    /// Each LSTM's φ, in flat order (one for a one-group φ).
    pub fn parts(&self) -> Vec<&Phi> {
        match self {
            AnyPhi::One(p) => vec![p],
            AnyPhi::Groups(g) => g.groups.iter().map(|(_, p)| p).collect(),
        }
    }

    /// The same kind and names with other values, one φ per part (e.g. a gradient).
    pub fn with_parts(&self, parts: Vec<Phi>) -> Result<Self, Error> {
        match self {
            AnyPhi::One(_) => {
                let [p]: [Phi; 1] = parts.try_into().map_err(|v: Vec<Phi>| {
                    Error::Shape(format!("{} parts for a one-group φ", v.len()))
                })?;
                Ok(AnyPhi::One(p))
            }
            AnyPhi::Groups(g) => {
                if parts.len() != g.groups.len() {
                    return Err(Error::Shape(format!(
                        "{} parts for a φ of {} groups",
                        parts.len(),
                        g.groups.len()
                    )));
                }
                let named = g.groups.iter().map(|(n, _)| n.clone()).zip(parts).collect();
                Ok(AnyPhi::Groups(PhiGroups::new(named)?))
            }
        }
    }

    /// Every tensor, group by group, each in §4.1 order.
    pub fn tensors(&self) -> impl Iterator<Item = &Vec<f32>> {
        self.parts().into_iter().flat_map(|p| &p.tensors)
    }

    /// Values in φ, all groups together.
    pub fn num_params(&self) -> usize {
        self.parts().len() * self.config().num_params()
    }

    /// All values concatenated in flat order (§5; §4.1 for one group).
    pub fn flatten(&self) -> Vec<f32> {
        match self {
            AnyPhi::One(p) => p.flatten(),
            AnyPhi::Groups(g) => g.flatten(),
        }
    }

    /// Splits a flat vector back into φ of `config` with the groups `names` (`None`: one
    /// group), checking the length and finiteness.
    pub fn unflatten(
        config: OptimizerConfig,
        names: Option<&[String]>,
        flat: &[f32],
    ) -> Result<Self, Error> {
        let Some(names) = names else {
            return Ok(AnyPhi::One(Phi::unflatten(config, flat)?));
        };
        let per = config.num_params();
        if flat.len() != per * names.len() {
            return Err(Error::Shape(format!(
                "{} values given, {} groups of this configuration need {}",
                flat.len(),
                names.len(),
                per * names.len()
            )));
        }
        let groups = names
            .iter()
            .zip(flat.chunks(per.max(1)))
            .map(|(n, v)| Ok((n.clone(), Phi::unflatten(config, v)?)))
            .collect::<Result<Vec<_>, Error>>()?;
        Ok(AnyPhi::Groups(PhiGroups::new(groups)?))
    }

    /// Zeros of the same kind, names and shapes (a gradient accumulator).
    pub fn zeros_like(&self) -> Self {
        let parts = self.parts().iter().map(|p| Phi::zeros(p.config)).collect();
        // Same count and names as `self`: cannot fail.
        self.with_parts(parts).expect("same parts")
    }

    /// Fresh φ for a new run: one group (`names` empty) or the named groups, drawn as
    /// [`PhiGroups::init`] does.
    pub fn init(config: OptimizerConfig, names: &[&str], seed: u64) -> Result<Self, Error> {
        if names.is_empty() {
            Ok(AnyPhi::One(Phi::init(config, seed)?))
        } else {
            Ok(AnyPhi::Groups(PhiGroups::init(config, names, seed)?))
        }
    }

    /// Encodes φ as its kind's file (§4.1 or §5) with `extra` metadata fields.
    pub fn encode(&self, extra: HashMap<String, String>) -> Result<Vec<u8>, Error> {
        self.encode_with(extra, &[])
    }

    /// [`AnyPhi::encode`] with `more` tensors after φ's (a checkpoint's Adam moments).
    pub fn encode_with(
        &self,
        mut extra: HashMap<String, String>,
        more: &[NamedTensor<'_>],
    ) -> Result<Vec<u8>, Error> {
        let config = self.config();
        extra.extend(files::config_metadata(&config));
        let layout = config.tensor_layout();
        let prefixes: Vec<String> = match self.names() {
            None => vec![String::new()],
            Some(names) => {
                extra.insert(GROUPS_FIELD.into(), names.join(","));
                names.iter().map(|n| format!("{n}.")).collect()
            }
        };
        let names: Vec<String> = prefixes
            .iter()
            .flat_map(|g| layout.iter().map(move |(t, _)| format!("{g}{t}")))
            .collect();
        let shapes = prefixes.iter().flat_map(|_| layout.iter());
        let mut named: Vec<NamedTensor<'_>> = names
            .iter()
            .zip(shapes)
            .zip(self.tensors())
            .map(|((n, (_, s)), v)| (n.as_str(), s.as_slice(), v.as_slice()))
            .collect();
        named.extend_from_slice(more);
        files::encode(&named, extra)
    }

    /// Writes φ's file atomically.
    pub fn save(&self, path: &Path, extra: HashMap<String, String>) -> Result<(), Error> {
        files::write_atomic(path, &self.encode(extra)?)
    }

    /// Reads φ of either kind from an optimizer file or a coordinator checkpoint (whose
    /// Adam moments are skipped).
    pub fn load(path: &Path) -> Result<Self, Error> {
        Self::from_file(TensorFile::read(path)?)
    }

    /// φ of either kind from a file already read, as [`AnyPhi::load`] takes it.
    pub fn from_file(mut file: TensorFile) -> Result<Self, Error> {
        let config = files::config_from(&file)?;
        for moment in ["adam.m", "adam.v"] {
            if let Some(shape) = file.shape(moment).map(<[usize]>::to_vec) {
                file.take(moment, &shape)?;
            }
        }
        Self::take_from(&mut file, config)
    }

    /// Takes φ's tensors of either kind from `file`, refusing any other tensor.
    pub fn take_from(file: &mut TensorFile, config: OptimizerConfig) -> Result<Self, Error> {
        let Some(names) = group_names(file)? else {
            return Ok(AnyPhi::One(files::phi_from(file, config)?));
        };
        let groups = names
            .into_iter()
            .map(|name| {
                let tensors = config
                    .tensor_layout()
                    .iter()
                    .map(|(t, shape)| file.take(&format!("{name}.{t}"), shape))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok((name, Phi::from_tensors(config, tensors)?))
            })
            .collect::<Result<Vec<_>, Error>>()?;
        file.expect_no_more(&format!("a grouped {FORMAT} file"))?;
        let path = file.path().to_path_buf();
        PhiGroups::new(groups)
            .map(AnyPhi::Groups)
            .map_err(|e| Error::format(path, e.to_string()))
    }

    /// Binds each LSTM of φ to the coordinates it updates, refusing (§5) a φ whose groups
    /// the problem does not name and a one-group φ for a problem with groups.
    pub fn bind(
        &self,
        problem: Option<&GroupMap>,
        n: usize,
    ) -> Result<Vec<(&Phi, Range<usize>)>, Error> {
        check_groups(
            self.names().as_deref(),
            problem.map(GroupMap::names).as_deref(),
            "this problem",
        )?;
        match problem {
            None => Ok(vec![(self.parts()[0], 0..n)]),
            Some(map) => {
                map.check(n)?;
                Ok(self
                    .parts()
                    .into_iter()
                    .zip(map.groups.iter().map(|(_, r)| r.clone()))
                    .collect())
            }
        }
    }
}

/// Which coordinates of θ each group's LSTM updates: contiguous ranges in group order
/// that cover θ (a family lays out its tensors group by group).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMap {
    /// (group name, coordinates) in the order of a φ's groups.
    pub groups: Vec<(&'static str, Range<usize>)>,
}

impl GroupMap {
    /// The group names in order.
    pub fn names(&self) -> Vec<&str> {
        self.groups.iter().map(|(n, _)| *n).collect()
    }

    /// Refuses ranges that are not contiguous, in order, and covering 0..n.
    pub fn check(&self, n: usize) -> Result<(), Error> {
        let mut at = 0;
        for (name, r) in &self.groups {
            if r.start != at || r.end < r.start {
                return Err(Error::Shape(format!(
                    "group {name:?} covers {r:?}; groups must cover θ in order from {at}"
                )));
            }
            at = r.end;
        }
        if at != n {
            return Err(Error::Shape(format!(
                "the groups cover {at} of {n} coordinates"
            )));
        }
        Ok(())
    }
}

/// Refuses (spec §5) a φ whose groups `phi` (`None`: one group) are not exactly the
/// groups `family` names (`None`: no groups), naming both.
pub fn check_groups(phi: Option<&[&str]>, family: Option<&[&str]>, who: &str) -> Result<(), Error> {
    match (phi, family) {
        (None, None) => Ok(()),
        (Some(p), Some(f)) if p == f => Ok(()),
        (Some(p), None) => Err(Error::Config(format!(
            "φ has one LSTM per parameter group ({}; spec §5), and {who} has no parameter \
             groups; give a one-group φ (init-phi without --groups)",
            p.join(",")
        ))),
        (None, Some(f)) => Err(Error::Config(format!(
            "{who} needs one LSTM per parameter group ({}; spec §5), and φ has one LSTM for \
             everything; give a grouped φ (init-phi --groups {})",
            f.join(","),
            f.join(",")
        ))),
        (Some(p), Some(f)) => Err(Error::Config(format!(
            "φ's parameter groups are {}, and {who} names {}; give a φ with groups {} in \
             this order (init-phi --groups {})",
            p.join(","),
            f.join(","),
            f.join(","),
            f.join(",")
        ))),
    }
}

/// φ of either kind from an optimizer file or a coordinator checkpoint, for instances
/// of `spec`: refused, naming the file, φ's groups and the family's, unless they agree
/// (spec §5).
pub fn load_for(path: &Path, spec: &crate::ProblemSpec) -> Result<AnyPhi, Error> {
    let phi = AnyPhi::load(path)?;
    spec.check_phi(phi.names().as_deref())
        .map_err(|e| Error::format(path, e.to_string()))?;
    Ok(phi)
}

/// The group names a file declares, or `None` for a one-group φ.
pub fn group_names(file: &TensorFile) -> Result<Option<Vec<String>>, Error> {
    let Some(raw) = file.metadata().get(GROUPS_FIELD) else {
        return Ok(None);
    };
    let names: Vec<String> = raw.split(',').map(str::to_string).collect();
    if names.len() > MAX_GROUPS {
        return Err(Error::format(
            file.path(),
            format!("{} groups; at most {MAX_GROUPS}", names.len()),
        ));
    }
    for (i, name) in names.iter().enumerate() {
        check_name(name).map_err(|e| Error::format(file.path(), e.to_string()))?;
        if names[..i].contains(name) {
            return Err(Error::format(
                file.path(),
                format!("group {name:?} is named twice in the \"groups\" field"),
            ));
        }
    }
    Ok(Some(names))
}

/// A group name: 1 to 64 of `a-z`, `0-9`, `_`, so `{group}.{tensor}` parses back.
fn check_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "group name {name:?}: use 1 to 64 of a-z, 0-9 and _"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Preprocess;

    fn two() -> PhiGroups {
        let cfg = OptimizerConfig {
            hidden: 3,
            ..OptimizerConfig::new(Preprocess::LogSign)
        };
        PhiGroups::new(vec![
            ("conv".into(), Phi::init(cfg, 1).unwrap()),
            ("fc".into(), Phi::init(cfg, 2).unwrap()),
        ])
        .unwrap()
    }

    #[test]
    fn a_grouped_file_round_trips_with_the_names_of_spec_5() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.safetensors");
        let g = two();
        g.save(&path, HashMap::new()).unwrap();
        let file = TensorFile::read(&path).unwrap();
        assert_eq!(file.meta("groups").unwrap(), "conv,fc");
        assert_eq!(file.shape("conv.lstm.0.w_x"), Some(&[2, 12][..]));
        assert_eq!(file.shape("fc.out.b"), Some(&[1][..]));
        assert_eq!(file.shape("lstm.0.w_x"), None);
        let back = PhiGroups::load(&path).unwrap();
        assert_eq!(back, g);
        // Flat order: conv's values, then fc's.
        let flat = back.flatten();
        let n = g.config().num_params();
        assert_eq!(&flat[..n], &g.get("conv").unwrap().flatten()[..]);
        assert_eq!(&flat[n..], &g.get("fc").unwrap().flatten()[..]);
    }

    #[test]
    fn neither_loader_falls_back_to_the_other_kind() {
        let dir = tempfile::tempdir().unwrap();
        let grouped = dir.path().join("g.safetensors");
        two().save(&grouped, HashMap::new()).unwrap();
        let e = Phi::load(&grouped).unwrap_err().to_string();
        assert!(e.contains("conv,fc") && e.contains("PhiGroups"), "{e}");
        let single = dir.path().join("p.safetensors");
        two()
            .get("fc")
            .unwrap()
            .save(&single, HashMap::new())
            .unwrap();
        let e = PhiGroups::load(&single).unwrap_err().to_string();
        assert!(e.contains("one-group"), "{e}");
    }

    #[test]
    fn a_file_naming_a_group_twice_is_refused_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.safetensors");
        let g = two();
        let mut meta = HashMap::new();
        meta.insert("x".to_string(), "y".to_string());
        g.save(&path, meta).unwrap();
        // Rewrite the groups field to name conv twice.
        let mut file = TensorFile::read(&path).unwrap();
        let layout = g.config().tensor_layout();
        let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = ["conv", "fc"]
            .iter()
            .flat_map(|n| {
                layout
                    .iter()
                    .map(move |(t, s)| (format!("{n}.{t}"), s.clone()))
            })
            .map(|(name, shape)| {
                let v = file.take(&name, &shape).unwrap();
                (name, shape, v)
            })
            .collect();
        let named: Vec<NamedTensor<'_>> = tensors
            .iter()
            .map(|(n, s, v)| (n.as_str(), s.as_slice(), v.as_slice()))
            .collect();
        let mut meta = files::config_metadata(&g.config());
        meta.insert(GROUPS_FIELD.into(), "conv,conv".into());
        files::write_atomic(&path, &files::encode(&named, meta).unwrap()).unwrap();
        let e = AnyPhi::load(&path).unwrap_err().to_string();
        assert!(e.contains("named twice"), "{e}");
    }

    #[test]
    fn fresh_groups_draw_group_i_from_seed_plus_i() {
        let cfg = OptimizerConfig::default();
        let g = PhiGroups::init(cfg, &["conv", "fc"], 7).unwrap();
        assert_eq!(g.names(), ["conv", "fc"]);
        assert_eq!(g.get("conv").unwrap(), &Phi::init(cfg, 7).unwrap());
        assert_eq!(g.get("fc").unwrap(), &Phi::init(cfg, 8).unwrap());
    }

    #[test]
    fn bad_groups_are_refused_with_the_reason() {
        let g = two();
        let (a, b) = (g.groups[0].1.clone(), g.groups[1].1.clone());
        let e = PhiGroups::new(vec![("fc".into(), a.clone()), ("fc".into(), b)]);
        assert!(e.unwrap_err().to_string().contains("twice"));
        let e = PhiGroups::new(vec![("Conv.x".into(), a.clone())]);
        assert!(e.unwrap_err().to_string().contains("a-z"));
        let other = Phi::init(OptimizerConfig::default(), 3).unwrap();
        let e = PhiGroups::new(vec![("conv".into(), a), ("fc".into(), other)]);
        assert!(
            e.unwrap_err()
                .to_string()
                .contains("share one configuration")
        );
        assert!(PhiGroups::new(vec![]).is_err());
    }
}
