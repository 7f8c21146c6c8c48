//! Courier's config folder: workflows and agent resources, loaded and validated
//! at start so nothing fails for a config reason on a worker; the stores over
//! the resources (the scheduler's on disk, the worker's read-only over a
//! snapshot); and the builder that puts exactly what a step needs into its
//! snapshot.
//!
//! **Architecture invariant:** workers use only [`SnapshotStore`]; nothing a
//! worker runs reads the config folder.

mod condition;
mod config;
mod error;
pub mod files;
pub mod output_schema;
mod snapshot;
mod store;
pub mod template;
mod workflow;
mod yaml;

pub use condition::{Condition, MAX_CONDITION_LEN};
pub use config::Config;
pub use error::{ConfigError, ConfigErrors};
pub use snapshot::build_snapshot;
pub use store::{
    AgentStore, Catalog, FsStore, KNOWN_TOOLS, MAX_ID_LEN, MAX_MEMORY_BYTES, MAX_PROPOSAL_BYTES, MAX_PROPOSALS,
    MemoryScope, PROPOSE_MEMORY_TOOL, SnapshotStore, StoreError, is_slug,
};
pub use workflow::{
    Approval, Budget, DEFAULT_APPROVAL_TIMEOUT, DEFAULT_MAX_CONCURRENT, DEFAULT_MAX_ITEMS, DEFAULT_MAX_ITERATIONS,
    DEFAULT_QUEUE, DEFAULT_TIMEOUT, Foreach, MAX_ITEMS, MAX_STEP_TIMEOUT, MAX_STEPS, MAX_WORKFLOW_DEPTH, OnSkipped,
    ParamError, RetryPolicy, Schedule, Step, SubWorkflow, Workflow,
};
