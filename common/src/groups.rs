//! φ with one LSTM per kind of parameter (spec §5): named groups, one configuration.
//!
//! A grouped file names its groups in the `groups` metadata field (`"conv,fc"`) and each
//! tensor of spec §4.1 as `{group}.{name}`; a file without `groups` is the one-group φ of
//! §4.1 ([`Phi`]). The flat order (the wire, Adam's moments) is group by group in file
//! order, each in §4.1 order. Readers never fall back silently from one kind to the other:
//! [`Phi::load`] refuses a grouped file and [`PhiGroups::load`] a one-group one, each
//! saying which loader to use.

use std::collections::HashMap;
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

    /// Reads a grouped optimizer file (spec §5).
    pub fn load(path: &Path) -> Result<Self, Error> {
        let mut file = TensorFile::read(path)?;
        let config = files::config_from(&file)?;
        let Some(names) = group_names(&file)? else {
            return Err(Error::format(
                path,
                "a one-group φ (no \"groups\" metadata field); read it as one φ \
                 (`Phi::load`, `LearnedOptimizer::load`)",
            ));
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
        Self::new(groups).map_err(|e| Error::format(path, e.to_string()))
    }

    /// Encodes the groups as one file (spec §5) with `extra` metadata fields.
    pub fn encode(&self, mut extra: HashMap<String, String>) -> Result<Vec<u8>, Error> {
        extra.extend(files::config_metadata(&self.config()));
        extra.insert(GROUPS_FIELD.into(), self.names().join(","));
        let layout = self.config().tensor_layout();
        let names: Vec<String> = self
            .groups
            .iter()
            .flat_map(|(g, _)| layout.iter().map(move |(t, _)| format!("{g}.{t}")))
            .collect();
        let values = self.groups.iter().flat_map(|(_, p)| &p.tensors);
        let shapes = self.groups.iter().flat_map(|_| layout.iter());
        let named: Vec<NamedTensor<'_>> = names
            .iter()
            .zip(shapes)
            .zip(values)
            .map(|((n, (_, s)), v)| (n.as_str(), s.as_slice(), v.as_slice()))
            .collect();
        files::encode(&named, extra)
    }

    /// Writes a grouped optimizer file atomically.
    pub fn save(&self, path: &Path, extra: HashMap<String, String>) -> Result<(), Error> {
        files::write_atomic(path, &self.encode(extra)?)
    }
}

/// φ for `family`, a problem family without parameter groups, from an optimizer file or
/// a coordinator checkpoint; a grouped file is refused, naming its groups and the family
/// (spec §5).
pub fn load_for_family(path: &Path, family: &str) -> Result<Phi, Error> {
    let file = TensorFile::read(path)?;
    if let Some(names) = group_names(&file)? {
        return Err(Error::format(
            path,
            format!(
                "a φ with parameter groups {} (spec §5), and the {family} family has no \
                 parameter groups; give a one-group φ (init-phi without --groups)",
                names.join(",")
            ),
        ));
    }
    Phi::any_from(file)
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
    for name in &names {
        check_name(name).map_err(|e| Error::format(file.path(), e.to_string()))?;
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
