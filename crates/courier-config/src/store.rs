//! The agent-resource stores: the scheduler's filesystem store and the
//! worker's read-only store over a decoded snapshot, behind one trait.
//!
//! **Invariant:** a [`SnapshotStore`] refuses every write. Memory changes
//! travel back as proposals in a result; only the scheduler's [`FsStore`]
//! writes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use courier_wire::{AgentConfig, ModelDef, Provider, Skill, Snapshot, Soul};
use serde::Deserialize;

use crate::error::ConfigError;
use crate::yaml;

/// The one tool through which an agent step proposes memory updates; the
/// scheduler accepts proposals only from steps that enable it.
pub const PROPOSE_MEMORY_TOOL: &str = "propose_memory_update";

/// Largest memory file the scheduler writes. Every snapshot of a step with
/// memory enabled carries it, its prompt holds it on every turn, and the
/// scheduler reads it back at start: an agent cannot grow it past this.
pub const MAX_MEMORY_BYTES: usize = 64 * 1024;
/// Most bytes of memory one step (each foreach item) may propose, all its
/// proposals together: filling a memory file takes several steps.
pub const MAX_PROPOSAL_BYTES: usize = 16 * 1024;
/// Most memory proposals one step (each foreach item) may make.
pub const MAX_PROPOSALS: usize = 16;

/// Tools an agent step can enable. The agent runtime implements exactly these.
pub const KNOWN_TOOLS: &[&str] = &[
    "read_skill",
    "search_skills",
    "read_memory",
    "output",
    PROPOSE_MEMORY_TOOL,
];

/// Longest allowed resource or workflow ID.
pub const MAX_ID_LEN: usize = 128;

/// Whether `id` is a slug: `^[a-z0-9]+(-[a-z0-9]+)*$`, at most 128 characters.
/// No slug can name a path outside its folder.
pub fn is_slug(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && !id.starts_with('-')
        && !id.ends_with('-')
        && !id.contains("--")
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Why an ID is not a slug, for error messages.
pub(crate) fn slug_error(id: &str) -> String {
    format!(
        "\"{id}\" is not a valid ID: use lower-case letters, digits and single hyphens (at most {MAX_ID_LEN} characters)"
    )
}

/// Which memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryScope<'a> {
    /// `memory/MEMORY.md`.
    Global,
    /// `memory/workflows/<workflow>/MEMORY.md`.
    Workflow(&'a str),
}

impl std::fmt::Display for MemoryScope<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MemoryScope::Global => f.write_str("global memory"),
            MemoryScope::Workflow(w) => write!(f, "memory of workflow \"{w}\""),
        }
    }
}

/// What a store access can fail with.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No resource of that kind and ID.
    #[error("unknown {kind} \"{id}\"")]
    Missing { kind: &'static str, id: String },
    /// The resource exists but this step's snapshot does not carry it.
    #[error("{kind} \"{id}\" is not in this step's snapshot")]
    NotInSnapshot { kind: &'static str, id: String },
    /// A write to a read-only store.
    #[error(
        "read-only store: cannot write {what}; stores mounted from a snapshot are read-only \
         (propose a memory update instead: the scheduler applies it after the step succeeds)"
    )]
    ReadOnly { what: String },
    /// A memory proposal over [`MAX_PROPOSAL_BYTES`] (a step's proposals
    /// together are held to it by the scheduler).
    #[error("a memory proposal holds at most {MAX_PROPOSAL_BYTES} bytes; this one holds {size}")]
    ProposalTooLarge { size: usize },
    /// Appending would take a memory file over [`MAX_MEMORY_BYTES`]; it is left as it was.
    #[error(
        "{scope} would hold {size} bytes with this proposal, at most {MAX_MEMORY_BYTES}: \
         not written (trim {} by hand to make room)",
        path.display()
    )]
    MemoryFull { scope: String, path: PathBuf, size: usize },
    /// A filesystem failure in the scheduler's store.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Read access to agent resources, and the one write Courier makes: memory.
pub trait AgentStore: Send + Sync {
    /// The agent configuration.
    ///
    /// # Errors
    /// [`StoreError::Missing`] when there is none (a command step's snapshot).
    fn agent_config(&self) -> Result<AgentConfig, StoreError>;
    /// A model by ID.
    ///
    /// # Errors
    /// [`StoreError::Missing`] or [`StoreError::NotInSnapshot`].
    fn model(&self, id: &str) -> Result<ModelDef, StoreError>;
    /// A skill by ID.
    ///
    /// # Errors
    /// [`StoreError::Missing`] or [`StoreError::NotInSnapshot`].
    fn skill(&self, id: &str) -> Result<Skill, StoreError>;
    /// IDs of every skill in the store, sorted.
    fn skill_ids(&self) -> Vec<String>;
    /// A soul by ID.
    ///
    /// # Errors
    /// [`StoreError::Missing`] or [`StoreError::NotInSnapshot`].
    fn soul(&self, id: &str) -> Result<Soul, StoreError>;
    /// A memory file's text; `None` when the file is empty or absent.
    ///
    /// # Errors
    /// [`StoreError::NotInSnapshot`] when the step did not enable memory.
    fn memory(&self, scope: MemoryScope<'_>) -> Result<Option<String>, StoreError>;
    /// Append Markdown to a memory file.
    ///
    /// # Errors
    /// [`StoreError::ReadOnly`] on a snapshot store; [`StoreError::Io`] on disk failure.
    fn append_memory(&self, scope: MemoryScope<'_>, text: &str) -> Result<(), StoreError>;
}

/// The scheduler's store over `config/agents/`, loaded and validated at start.
///
/// Resources are held in memory; memory files are written through to disk.
#[derive(Debug)]
pub struct FsStore {
    root: PathBuf,
    agent: AgentConfig,
    models: BTreeMap<String, ModelDef>,
    skills: BTreeMap<String, Skill>,
    souls: BTreeMap<String, Soul>,
    memory: RwLock<MemoryFiles>,
}

#[derive(Debug, Default)]
struct MemoryFiles {
    global: Option<String>,
    workflows: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct SkillFront {
    name: String,
    description: String,
    #[serde(default)]
    tags: Vec<String>,
}

#[derive(Deserialize)]
struct SoulFront {
    name: String,
    #[serde(default)]
    description: Option<String>,
}

/// What workflows are checked against: the resource IDs present in an
/// `agents/` folder and its tool policy. Built even when some resource files
/// have errors of their own, so that workflows are checked in the same pass
/// (a broken resource is present: referring to it is not a second error).
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    /// Model IDs.
    pub models: BTreeSet<String>,
    /// Skill IDs.
    pub skills: BTreeSet<String>,
    /// Soul IDs.
    pub souls: BTreeSet<String>,
    /// Tools steps may enable; `None` when `config.yaml` did not load, and
    /// then tools are checked only against the known ones.
    pub tools_allowed: Option<Vec<String>>,
}

impl FsStore {
    /// Load every resource under `root` (the `agents` folder).
    ///
    /// # Errors
    /// Every problem found, each naming its file and field.
    pub fn load(root: &Path) -> Result<Self, Vec<ConfigError>> {
        Self::load_with_catalog(root).0
    }

    /// [`FsStore::load`], and the [`Catalog`] of the folder either way.
    pub fn load_with_catalog(root: &Path) -> (Result<Self, Vec<ConfigError>>, Catalog) {
        let mut errors = Vec::new();
        let config_file = root.join("config.yaml");
        let agent = read(&config_file, &mut errors)
            .and_then(|text| collect(yaml::parse_strict::<AgentConfig>(&config_file, &text), &mut errors));
        let models = load_models(&root.join("models"), &mut errors);
        let skills = load_skills(&root.join("skills"), &mut errors);
        let souls = load_souls(&root.join("souls"), &mut errors);
        let memory = load_memory(&root.join("memory"), &mut errors);

        if let Some(agent) = &agent {
            if !models.contains_key(&agent.default_model) {
                errors.push(
                    ConfigError::file(&config_file, format!("unknown model \"{}\"", agent.default_model))
                        .field("default_model"),
                );
            }
            for (i, tool) in agent.tools.allowed.iter().enumerate() {
                if !KNOWN_TOOLS.contains(&tool.as_str()) {
                    errors.push(
                        ConfigError::file(
                            &config_file,
                            format!("unknown tool \"{tool}\"; known tools: {}", KNOWN_TOOLS.join(", ")),
                        )
                        .field(format!("tools.allowed.{i}")),
                    );
                }
            }
        }
        // Every ID on disk, loaded or not (listing errors were reported above).
        let ids = |dir: &str, suffix: &str, want_dirs: bool| -> BTreeSet<String> {
            entries(&root.join(dir), suffix, want_dirs, &mut Vec::new())
                .into_iter()
                .map(|(id, _)| id)
                .collect()
        };
        let catalog = Catalog {
            models: ids("models", ".yaml", false),
            skills: ids("skills", "", true),
            souls: ids("souls", ".md", false),
            tools_allowed: agent.as_ref().map(|a| a.tools.allowed.clone()),
        };
        let store = match agent {
            Some(agent) if errors.is_empty() => Ok(Self {
                root: root.to_path_buf(),
                agent,
                models,
                skills,
                souls,
                memory: RwLock::new(memory),
            }),
            _ => Err(errors),
        };
        (store, catalog)
    }

    /// IDs of every model, sorted.
    pub fn model_ids(&self) -> impl Iterator<Item = &str> {
        self.models.keys().map(String::as_str)
    }

    /// IDs of every soul, sorted.
    pub fn soul_ids(&self) -> impl Iterator<Item = &str> {
        self.souls.keys().map(String::as_str)
    }

    /// Read the memory files again from disk: another process (a scheduler
    /// sharing this folder) may have appended to them.
    pub fn reload_memory(&self) {
        // Read under the lock: an append meanwhile would be undone by a
        // read from before it.
        let mut files = self.memory.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut errors = Vec::new();
        let fresh = load_memory(&self.root.join("memory"), &mut errors);
        // Unreadable now: keep what was loaded (appends re-read the file).
        if errors.is_empty() {
            *files = fresh;
        }
    }

    fn memory_path(&self, scope: MemoryScope<'_>) -> PathBuf {
        match scope {
            MemoryScope::Global => self.root.join("memory/MEMORY.md"),
            MemoryScope::Workflow(w) => self.root.join("memory/workflows").join(w).join("MEMORY.md"),
        }
    }
}

impl AgentStore for FsStore {
    fn agent_config(&self) -> Result<AgentConfig, StoreError> {
        Ok(self.agent.clone())
    }

    fn model(&self, id: &str) -> Result<ModelDef, StoreError> {
        self.models.get(id).cloned().ok_or_else(|| missing("model", id))
    }

    fn skill(&self, id: &str) -> Result<Skill, StoreError> {
        self.skills.get(id).cloned().ok_or_else(|| missing("skill", id))
    }

    fn skill_ids(&self) -> Vec<String> {
        self.skills.keys().cloned().collect()
    }

    fn soul(&self, id: &str) -> Result<Soul, StoreError> {
        self.souls.get(id).cloned().ok_or_else(|| missing("soul", id))
    }

    fn memory(&self, scope: MemoryScope<'_>) -> Result<Option<String>, StoreError> {
        let files = self.memory.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(match scope {
            MemoryScope::Global => files.global.clone(),
            MemoryScope::Workflow(w) => files.workflows.get(w).cloned(),
        })
    }

    fn append_memory(&self, scope: MemoryScope<'_>, text: &str) -> Result<(), StoreError> {
        if let MemoryScope::Workflow(w) = scope
            && !is_slug(w)
        {
            return Err(missing("workflow", w));
        }
        if text.len() > MAX_PROPOSAL_BYTES {
            return Err(StoreError::ProposalTooLarge { size: text.len() });
        }
        let path = self.memory_path(scope);
        let mut files = self.memory.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        // The file as it is now, not as loaded: another scheduler sharing the
        // folder may have appended since.
        let current = match crate::files::read_text(&path) {
            Ok(text) => Some(text),
            Err(crate::files::ReadError::NotFound(_)) => None,
            Err(e) => {
                return Err(StoreError::Io {
                    path,
                    source: std::io::Error::other(e.to_string()),
                });
            }
        };
        let mut next = current.unwrap_or_default();
        if !next.is_empty() && !next.ends_with('\n') {
            next.push('\n');
        }
        next.push_str(text);
        if next.len() > MAX_MEMORY_BYTES {
            return Err(StoreError::MemoryFull {
                scope: scope.to_string(),
                path,
                size: next.len(),
            });
        }
        write_atomically(&path, &next)?;
        match scope {
            MemoryScope::Global => files.global = Some(next),
            MemoryScope::Workflow(w) => {
                files.workflows.insert(w.to_string(), next);
            }
        }
        Ok(())
    }
}

/// The worker's store: reads come from one step's snapshot, writes are refused.
/// It shares the snapshot (a worker's cache keeps one decoded copy per
/// content hash, mounted by every task that carries it), never copies it.
#[derive(Debug, Clone)]
pub struct SnapshotStore {
    snapshot: std::sync::Arc<Snapshot>,
}

impl SnapshotStore {
    /// Mount a decoded snapshot (owned, or shared with a cache).
    pub fn new(snapshot: impl Into<std::sync::Arc<Snapshot>>) -> Self {
        Self {
            snapshot: snapshot.into(),
        }
    }

    /// The mounted snapshot.
    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }
}

impl AgentStore for SnapshotStore {
    fn agent_config(&self) -> Result<AgentConfig, StoreError> {
        self.snapshot
            .agent
            .clone()
            .ok_or_else(|| not_in_snapshot("agent config", "config.yaml"))
    }

    fn model(&self, id: &str) -> Result<ModelDef, StoreError> {
        self.snapshot
            .models
            .get(id)
            .cloned()
            .ok_or_else(|| not_in_snapshot("model", id))
    }

    fn skill(&self, id: &str) -> Result<Skill, StoreError> {
        self.snapshot
            .skills
            .get(id)
            .cloned()
            .ok_or_else(|| not_in_snapshot("skill", id))
    }

    fn skill_ids(&self) -> Vec<String> {
        self.snapshot.skills.keys().cloned().collect()
    }

    fn soul(&self, id: &str) -> Result<Soul, StoreError> {
        match &self.snapshot.soul {
            Some(soul) if soul.id == id => Ok(soul.clone()),
            _ => Err(not_in_snapshot("soul", id)),
        }
    }

    fn memory(&self, scope: MemoryScope<'_>) -> Result<Option<String>, StoreError> {
        let memory = self
            .snapshot
            .memory
            .as_ref()
            .ok_or_else(|| not_in_snapshot("memory", "MEMORY.md"))?;
        match scope {
            MemoryScope::Global => Ok(memory.global.clone()),
            MemoryScope::Workflow(w) if w == self.snapshot.workflow => Ok(memory.workflow.clone()),
            MemoryScope::Workflow(w) => Err(not_in_snapshot("workflow memory", w)),
        }
    }

    fn append_memory(&self, scope: MemoryScope<'_>, _text: &str) -> Result<(), StoreError> {
        Err(StoreError::ReadOnly {
            what: scope.to_string(),
        })
    }
}

fn missing(kind: &'static str, id: &str) -> StoreError {
    StoreError::Missing {
        kind,
        id: id.to_string(),
    }
}

fn not_in_snapshot(kind: &'static str, id: &str) -> StoreError {
    StoreError::NotInSnapshot {
        kind,
        id: id.to_string(),
    }
}

fn write_atomically(path: &Path, text: &str) -> Result<(), StoreError> {
    let io = |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = path.with_extension("md.tmp");
    std::fs::write(&tmp, text).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

fn read(path: &Path, errors: &mut Vec<ConfigError>) -> Option<String> {
    match crate::files::read_text(path) {
        Ok(text) => Some(text),
        Err(e) => {
            errors.push(ConfigError::file(path, e.to_string()));
            None
        }
    }
}

fn collect<T>(result: Result<T, Vec<ConfigError>>, errors: &mut Vec<ConfigError>) -> Option<T> {
    result.map_err(|e| errors.extend(e)).ok()
}

/// Entries of `dir` whose name ends with `suffix`, as (id, path), sorted.
/// A missing folder has no entries.
fn entries(dir: &Path, suffix: &str, want_dirs: bool, errors: &mut Vec<ConfigError>) -> Vec<(String, PathBuf)> {
    let Ok(read_dir) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in read_dir.flatten() {
        let path = entry.path();
        if path.is_dir() != want_dirs {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(id) = name.strip_suffix(suffix) else { continue };
        if is_slug(id) {
            out.push((id.to_string(), path));
        } else {
            errors.push(ConfigError::file(&path, slug_error(id)));
        }
    }
    out.sort();
    out
}

fn load_models(dir: &Path, errors: &mut Vec<ConfigError>) -> BTreeMap<String, ModelDef> {
    let mut models = BTreeMap::new();
    for (id, path) in entries(dir, ".yaml", false, errors) {
        let Some(text) = read(&path, errors) else { continue };
        let Some(model) = collect(yaml::parse_strict::<ModelDef>(&path, &text), errors) else {
            continue;
        };
        if let Some(var) = &model.api_key_env
            && !is_env_name(var)
        {
            errors.push(
                ConfigError::file(
                    &path,
                    format!("\"{var}\" is not an environment variable name (expected e.g. OPENAI_API_KEY)"),
                )
                .field("api_key_env"),
            );
        }
        if let Some(url) = &model.base_url
            && let Err(why) = check_base_url(url)
        {
            errors.push(ConfigError::file(&path, why).field("base_url"));
        }
        if model.provider == Provider::Unsupported {
            let known: Vec<&str> = Provider::KNOWN.iter().map(|p| p.as_str()).collect();
            errors.push(
                ConfigError::file(&path, format!("unknown provider: use {}", known.join(", "))).field("provider"),
            );
        }
        if model.provider == Provider::Scripted && model.script.is_empty() {
            errors.push(ConfigError::file(&path, "a scripted model needs at least one reply").field("script"));
        }
        if model.provider != Provider::Scripted && !model.script.is_empty() {
            errors.push(ConfigError::file(&path, "only the scripted provider takes a script").field("script"));
        }
        if let Some(p) = &model.pricing {
            for (field, price) in [
                ("input_per_mtok", p.input_per_mtok),
                ("output_per_mtok", p.output_per_mtok),
            ] {
                if !(price >= 0.0 && price.is_finite()) {
                    errors.push(
                        ConfigError::file(&path, "a price must be a number of at least 0")
                            .field(format!("pricing.{field}")),
                    );
                }
            }
        }
        let l = &model.limits;
        for (field, zero) in [
            ("concurrency", l.concurrency == Some(0)),
            ("requests_per_minute", l.requests_per_minute == Some(0)),
            ("tokens_per_minute", l.tokens_per_minute == Some(0)),
        ] {
            if zero {
                errors.push(
                    ConfigError::file(&path, "a limit must be at least 1 (leave it out for none)")
                        .field(format!("limits.{field}")),
                );
            }
        }
        models.insert(id, model);
    }
    models
}

/// A model's endpoint: an http(s) URL that carries no credentials, since a
/// snapshot (and so every task of the step) carries the URL.
fn check_base_url(text: &str) -> Result<(), String> {
    let url = url::Url::parse(text).map_err(|e| format!("\"{text}\" is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("\"{text}\" is not an http or https URL"));
    }
    if !url.username().is_empty() || url.password().is_some() || url.query().is_some() || url.fragment().is_some() {
        return Err(
            "a base_url must not carry credentials (user info, query or fragment): it travels in every snapshot; put the key in the variable api_key_env names"
                .into(),
        );
    }
    Ok(())
}

fn is_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_uppercase() || b == b'_')
        && bytes.all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
}

fn load_skills(dir: &Path, errors: &mut Vec<ConfigError>) -> BTreeMap<String, Skill> {
    let mut skills = BTreeMap::new();
    for (id, folder) in entries(dir, "", true, errors) {
        let path = folder.join("SKILL.md");
        let Some(text) = read(&path, errors) else { continue };
        let Some((front, body)) = yaml::front_matter(&text) else {
            errors.push(ConfigError::file(
                &path,
                "missing YAML front matter (--- name, description ---)",
            ));
            continue;
        };
        if let Some(f) = collect(yaml::parse_strict::<SkillFront>(&path, front), errors) {
            let skill = Skill {
                name: f.name,
                description: f.description,
                tags: f.tags,
                body: body.to_string(),
            };
            skills.insert(id, skill);
        }
    }
    skills
}

fn load_souls(dir: &Path, errors: &mut Vec<ConfigError>) -> BTreeMap<String, Soul> {
    let mut souls = BTreeMap::new();
    for (id, path) in entries(dir, ".md", false, errors) {
        let Some(text) = read(&path, errors) else { continue };
        let Some((front, body)) = yaml::front_matter(&text) else {
            errors.push(ConfigError::file(&path, "missing YAML front matter (--- name ---)"));
            continue;
        };
        if let Some(f) = collect(yaml::parse_strict::<SoulFront>(&path, front), errors) {
            let soul = Soul {
                id: id.clone(),
                name: f.name,
                description: f.description,
                body: body.to_string(),
            };
            souls.insert(id, soul);
        }
    }
    souls
}

fn load_memory(dir: &Path, errors: &mut Vec<ConfigError>) -> MemoryFiles {
    let optional = |path: PathBuf, errors: &mut Vec<ConfigError>| match crate::files::read_text(&path) {
        Ok(text) => Some(text),
        Err(crate::files::ReadError::NotFound(_)) => None,
        Err(e) => {
            errors.push(ConfigError::file(&path, e.to_string()));
            None
        }
    };
    let global = optional(dir.join("MEMORY.md"), errors);
    let mut workflows = BTreeMap::new();
    for (id, folder) in entries(&dir.join("workflows"), "", true, errors) {
        if let Some(text) = optional(folder.join("MEMORY.md"), errors) {
            workflows.insert(id, text);
        }
    }
    MemoryFiles { global, workflows }
}

#[cfg(test)]
mod tests {
    use super::is_slug;

    #[test]
    fn slugs_are_lowercase_words_joined_by_single_hyphens() {
        for ok in ["a", "web-search", "gpt-4o", "x1-2-3", &"a".repeat(128)] {
            assert!(is_slug(ok), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "a--b",
            "A",
            "a_b",
            "a.b",
            "../etc",
            "a/b",
            &"a".repeat(129),
        ] {
            assert!(!is_slug(bad), "{bad}");
        }
    }
}
