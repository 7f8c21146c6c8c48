//! The whole config folder: agent resources and workflows, validated together.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{ConfigError, ConfigErrors};
use crate::store::FsStore;
use crate::workflow::Workflow;

/// A loaded and validated config folder.
#[derive(Debug)]
pub struct Config {
    /// The folder it came from.
    pub dir: PathBuf,
    /// Agent resources (`agents/`).
    pub store: FsStore,
    /// Workflows (`workflows/*.yaml`) by name.
    pub workflows: BTreeMap<String, Workflow>,
}

impl Config {
    /// Load `dir/agents` and every `dir/workflows/*.yaml`, reporting every
    /// problem at once.
    ///
    /// # Errors
    /// All problems found, each naming its file, step and field.
    pub fn load(dir: &Path) -> Result<Self, ConfigErrors> {
        // Workflows are checked even when resources have errors: all in one pass.
        let (store, catalog) = FsStore::load_with_catalog(&dir.join("agents"));
        let (store, mut errors) = match store {
            Ok(store) => (Some(store), Vec::new()),
            Err(errors) => (None, errors),
        };
        let workflows_dir = dir.join("workflows");
        let mut files: Vec<PathBuf> = match std::fs::read_dir(&workflows_dir) {
            Ok(entries) => entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
                .collect(),
            Err(e) => {
                errors.push(ConfigError::file(&workflows_dir, format!("cannot read folder: {e}")));
                Vec::new()
            }
        };
        files.sort();
        let mut workflows = BTreeMap::new();
        for file in files {
            match Workflow::load(&file, &catalog) {
                Ok(w) => {
                    workflows.insert(w.name.clone(), w);
                }
                Err(e) => errors.extend(e),
            }
        }
        match store {
            Some(store) if errors.is_empty() => Ok(Self {
                dir: dir.to_path_buf(),
                store,
                workflows,
            }),
            _ => Err(ConfigErrors::located(errors)),
        }
    }
}
