//! `courier snapshot build|inspect`: a step's snapshot as a file, and what one holds.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, anyhow};
use clap::{Args, Subcommand};
use courier_config::{Config, build_snapshot};
use courier_wire::{ContentHash, Snapshot, decode_with_info, encode};
use serde::Serialize;

use crate::settings::{Flags, Settings};

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Build the snapshot a step's task would carry.
    Build {
        /// Workflow name.
        workflow: String,
        /// Step name.
        #[arg(long)]
        step: String,
        /// The config folder [env: COURIER_CONFIG_DIR] [default: config].
        #[arg(long)]
        config_dir: Option<PathBuf>,
        /// Output file.
        #[arg(short, long)]
        output: PathBuf,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Show a snapshot file's version, hash, sizes and contents.
    Inspect {
        /// Snapshot file.
        file: PathBuf,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        limits: LimitArgs,
    },
}

/// Snapshot size bounds, over the scheduler's settings (`courier.toml`,
/// `COURIER_*`), so that these commands judge a snapshot as the scheduler and
/// workers will.
#[derive(Debug, Clone, Copy, Args)]
pub struct LimitArgs {
    /// Maximum snapshot size as it travels, in bytes [env: COURIER_SNAPSHOT_MAX_COMPRESSED] [default: 1048576].
    #[arg(long)]
    max_compressed: Option<usize>,
    /// Maximum decompressed (and decoded) snapshot size, in bytes [env: COURIER_SNAPSHOT_MAX_DECOMPRESSED] [default: 8388608].
    #[arg(long)]
    max_decompressed: Option<usize>,
}

impl LimitArgs {
    /// Put the limits given on the command line in the settings' top layer.
    pub fn set(self, flags: &mut Flags) -> &mut Flags {
        flags
            .set("snapshot_max_compressed", self.max_compressed)
            .set("snapshot_max_decompressed", self.max_decompressed)
    }
}

pub fn run(cmd: SnapshotCommand, mut flags: Flags) -> anyhow::Result<ExitCode> {
    match cmd {
        SnapshotCommand::Build {
            workflow,
            step,
            config_dir,
            output,
            limits,
        } => {
            limits.set(flags.set("config_dir", config_dir));
            let settings = Settings::load(flags.0)?;
            let config_dir = settings.config_dir.clone();
            let config = Config::load(&config_dir).map_err(|e| anyhow!("{e}"))?;
            let wf = config
                .workflows
                .get(&workflow)
                .ok_or_else(|| anyhow!("unknown workflow \"{workflow}\" in {}", config_dir.display()))?;
            let st = wf
                .step(&step)
                .ok_or_else(|| anyhow!("workflow \"{workflow}\" has no step \"{step}\""))?;
            let snapshot = build_snapshot(&config.store, &workflow, &st.run)
                .with_context(|| format!("building the snapshot of {workflow}/{step}"))?;
            let bytes = encode(&snapshot, &settings.snapshot_limits())
                .with_context(|| format!("encoding the snapshot of {workflow}/{step}"))?;
            std::fs::write(&output, &bytes).with_context(|| format!("writing {}", output.display()))?;
            println!(
                "{}: {} bytes, blake3:{}",
                output.display(),
                bytes.len(),
                ContentHash::of(&bytes)
            );
            Ok(ExitCode::SUCCESS)
        }
        SnapshotCommand::Inspect { file, json, limits } => {
            limits.set(&mut flags);
            let limits = Settings::load(flags.0)?.snapshot_limits();
            let bytes = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let (snapshot, info) =
                decode_with_info::<Snapshot>(&bytes, &limits).with_context(|| file.display().to_string())?;
            let report = Inspection {
                version: info.version,
                content_hash: format!("blake3:{}", ContentHash::of(&bytes)),
                compressed_bytes: info.compressed_len,
                decompressed_bytes: info.decompressed_len,
                workflow: snapshot.workflow.clone(),
                default_model: snapshot.agent.as_ref().map(|a| a.default_model.clone()),
                tools_allowed: snapshot
                    .agent
                    .as_ref()
                    .map(|a| a.tools.allowed.clone())
                    .unwrap_or_default(),
                models: snapshot
                    .models
                    .iter()
                    .map(|(id, m)| ModelLine {
                        id: id.clone(),
                        provider: m.provider.as_str(),
                        model: m.model.clone(),
                    })
                    .collect(),
                skills: snapshot.skills.keys().cloned().collect(),
                soul: snapshot.soul.as_ref().map(|s| s.id.clone()),
                memory: snapshot.memory.as_ref().map(|m| MemoryLine {
                    global_bytes: m.global.as_ref().map(String::len),
                    workflow_bytes: m.workflow.as_ref().map(String::len),
                }),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                report.print();
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[derive(Serialize)]
struct Inspection {
    version: u8,
    content_hash: String,
    compressed_bytes: usize,
    decompressed_bytes: usize,
    workflow: String,
    default_model: Option<String>,
    tools_allowed: Vec<String>,
    models: Vec<ModelLine>,
    skills: Vec<String>,
    soul: Option<String>,
    memory: Option<MemoryLine>,
}

#[derive(Serialize)]
struct ModelLine {
    id: String,
    provider: &'static str,
    model: String,
}

#[derive(Serialize)]
struct MemoryLine {
    global_bytes: Option<usize>,
    workflow_bytes: Option<usize>,
}

impl Inspection {
    fn print(&self) {
        let or_none = |v: &[String]| if v.is_empty() { "none".to_string() } else { v.join(", ") };
        println!("format version: {}", self.version);
        println!("content hash:   {}", self.content_hash);
        println!(
            "size:           {} bytes compressed, {} bytes decompressed",
            self.compressed_bytes, self.decompressed_bytes
        );
        println!("workflow:       {}", self.workflow);
        match &self.default_model {
            Some(m) => println!(
                "agent config:   default model {m}; tools allowed: {}",
                or_none(&self.tools_allowed)
            ),
            None => println!("agent config:   none (command step)"),
        }
        let models: Vec<String> = self
            .models
            .iter()
            .map(|m| format!("{} ({} {})", m.id, m.provider, m.model))
            .collect();
        println!("models:         {}", or_none(&models));
        println!("skills:         {}", or_none(&self.skills));
        println!("soul:           {}", self.soul.as_deref().unwrap_or("none"));
        match &self.memory {
            Some(m) => {
                let size = |b: Option<usize>| b.map_or_else(|| "empty".to_string(), |b| format!("{b} bytes"));
                println!(
                    "memory:         global {}, workflow {}",
                    size(m.global_bytes),
                    size(m.workflow_bytes)
                );
            }
            None => println!("memory:         none (not enabled for this step)"),
        }
    }
}
