//! Fleet profiles (`config/sim/*.toml`): groups of devices, each a share of the fleet with its
//! sensors, publishing rate, surroundings and sensor faults.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;

use firmware_sim::firmware::SensorKind;
use firmware_sim::simbus::{Environment, Faults};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub description: String,
    #[serde(rename = "group")]
    pub groups: Vec<Group>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Group {
    pub name: String,
    /// Fraction of the fleet's devices in this group.
    pub share: f64,
    /// Messages per second per device.
    pub rate: f64,
    pub sensors: Vec<SensorKind>,
    #[serde(default)]
    pub environment: Environment,
    #[serde(default)]
    pub faults: Faults,
}

impl Profile {
    /// The built-in fleet when no profile is named: room-climate nodes with both sensors.
    pub fn default_fleet() -> Self {
        Self {
            description: "room climate: SHT3x + BMP280 per device".into(),
            groups: vec![Group {
                name: "climate".into(),
                share: 1.0,
                rate: 1.0,
                sensors: vec![SensorKind::Sht3x, SensorKind::Bmp280],
                environment: Environment::default(),
                faults: Faults::default(),
            }],
        }
    }

    /// Loads `name` from `config/sim/<name>.toml`, or a path to a TOML file.
    pub fn load(name: &str) -> anyhow::Result<Self> {
        let path = if name.ends_with(".toml") || name.contains('/') {
            PathBuf::from(name)
        } else {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../config/sim")
                .join(format!("{name}.toml"))
        };
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read profile {}", path.display()))?;
        let profile: Profile =
            toml::from_str(&text).with_context(|| format!("profile {}", path.display()))?;
        profile
            .check()
            .with_context(|| format!("profile {}", path.display()))?;
        Ok(profile)
    }

    fn check(&self) -> anyhow::Result<()> {
        if self.groups.is_empty() {
            bail!("a profile needs at least one [[group]]");
        }
        for g in &self.groups {
            let valid = g.share.is_finite() && g.share > 0.0 && g.rate.is_finite() && g.rate >= 0.0;
            if !valid {
                bail!("group {:?}: share must be > 0 and rate >= 0", g.name);
            }
        }
        Ok(())
    }

    /// The group of device `n` out of `devices`, by cumulative share.
    pub fn group_of(&self, n: usize, devices: usize) -> &Group {
        let total: f64 = self.groups.iter().map(|g| g.share).sum();
        let position = (n as f64 + 0.5) / devices as f64 * total;
        let mut acc = 0.0;
        for g in &self.groups {
            acc += g.share;
            if position < acc {
                return g;
            }
        }
        self.groups.last().expect("checked non-empty")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_profiles_load() {
        for name in ["greenhouse", "cold-chain", "factory-line"] {
            let p = Profile::load(name).unwrap();
            assert!(!p.groups.is_empty(), "{name}");
        }
    }

    #[test]
    fn devices_are_split_by_share() {
        let p = Profile::load("greenhouse").unwrap();
        let climate = (0..100)
            .filter(|&n| p.group_of(n, 100).name == "climate")
            .count();
        assert_eq!(climate, 80);
    }
}
