//! `courier snapshot build|inspect`: a step's snapshot as a file, and what one holds.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, anyhow};
use clap::{Args, Subcommand};
use courier_config::{Config, build_snapshot};
use courier_wire::{
    ContentHash, DEFAULT_MAX_COMPRESSED, DEFAULT_MAX_DECOMPRESSED, Limits, Snapshot, decode_with_info, encode,
};
use serde::Serialize;

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Build the snapshot a step's task would carry.
    Build {
        /// Workflow name.
        workflow: String,
        /// Step name.
        #[arg(long)]
        step: String,
        /// The config folder.
        #[arg(long, env = "COURIER_CONFIG_DIR", default_value = "config")]
        config_dir: PathBuf,
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

/// Snapshot size bounds.
#[derive(Debug, Clone, Copy, Args)]
pub struct LimitArgs {
    /// Maximum snapshot size as it travels, in bytes.
    #[arg(long, env = "COURIER_SNAPSHOT_MAX_COMPRESSED", default_value_t = DEFAULT_MAX_COMPRESSED)]
    max_compressed: usize,
    /// Maximum decompressed snapshot size, in bytes.
    #[arg(long, env = "COURIER_SNAPSHOT_MAX_DECOMPRESSED", default_value_t = DEFAULT_MAX_DECOMPRESSED)]
    max_decompressed: usize,
}

impl From<LimitArgs> for Limits {
    fn from(a: LimitArgs) -> Self {
        Limits {
            max_compressed: a.max_compressed,
            max_decompressed: a.max_decompressed,
        }
    }
}

pub fn run(cmd: SnapshotCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        SnapshotCommand::Build {
            workflow,
            step,
            config_dir,
            output,
            limits,
        } => {
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
            let bytes = encode(&snapshot, &limits.into())
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
            let bytes = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let (snapshot, info) =
                decode_with_info::<Snapshot>(&bytes, &limits.into()).with_context(|| file.display().to_string())?;
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
