//! Helpers shared by the engine's tests: the example config, an engine over
//! a real store, and an outbox driven by hand.
//!
//! The store is a SQLite file, or, when `COURIER_TEST_DATABASE_URL` names a
//! PostgreSQL server (`postgres://user:pass@host/postgres`), a database of
//! its own on that server for each file path a test uses (created afresh
//! the first time in a process; the same path opens the same database, as
//! a restarted scheduler opens its file). `.ci/run` runs these tests both ways.

#![allow(dead_code, clippy::unwrap_used)] // each test file uses some of them

use std::path::Path;

use courier_config::Config;
use courier_scheduler::db::Db;
use courier_scheduler::engine::{Engine, EngineLimits};
use courier_wire::{Limits, Task, TaskResult, TaskStatus, decode};

pub fn example() -> Config {
    Config::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config")).unwrap()
}

pub fn engine(db: &Path) -> Engine {
    Engine::new(example(), store(db), EngineLimits::default())
}

/// The PostgreSQL server the tests run against, if any.
pub fn postgres_server() -> Option<String> {
    std::env::var("COURIER_TEST_DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty())
}

/// The store a test uses for the database file `path` (see the module's
/// note).
pub fn store(path: &Path) -> Db {
    match postgres_server() {
        Some(server) => Db::connect(&database_for(&server, path)).unwrap(),
        None => Db::open(path).unwrap(),
    }
}

/// The URL of the PostgreSQL database standing for `path` on `server`.
pub fn database_for(server: &str, path: &Path) -> String {
    use std::collections::HashSet;
    use std::hash::{DefaultHasher, Hash, Hasher};
    use std::sync::Mutex;
    static CREATED: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    let mut hasher = DefaultHasher::new();
    path.hash(&mut hasher);
    let name = format!("courier_test_{:016x}", hasher.finish());
    let mut created = CREATED.lock().unwrap();
    if created.get_or_insert_with(HashSet::new).insert(name.clone()) {
        let mut admin = postgres::Client::connect(server, postgres::NoTls).unwrap();
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .unwrap();
        admin.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
    }
    let base = server.rsplit_once('/').map_or(server, |(base, _)| base);
    format!("{base}/{name}")
}

/// Run `sql` on the store standing for `path`, beside whatever else has it open.
pub fn execute(path: &Path, sql: &str) {
    store(path).transaction(|tx| tx.exec(sql, &[]).map(drop)).unwrap();
}

pub fn result(task: &Task, status: TaskStatus, output: &str) -> TaskResult {
    TaskResult {
        task_id: task.task_id,
        run_id: task.run_id,
        step: task.step.clone(),
        attempt: task.attempt,
        status,
        output: output.into(),
        error: (status != TaskStatus::Succeeded).then(|| "boom".to_string()),
        started_unix_ms: 1,
        finished_unix_ms: 2,
        worker_id: "w".into(),
        memory_updates: Vec::new(),
        model: None,
        usage: None,
        transcript: Vec::new(),
        rate_limited_ms: None,
    }
}

/// Each unpublished task's run, step and routing key (its pool, or its
/// pool's lane), as the outbox reads them.
pub fn routes(engine: &Engine) -> Vec<(String, String, String)> {
    let small = |wf: &str| {
        engine
            .config()
            .workflows
            .get(wf)
            .is_some_and(courier_scheduler::engine::small)
    };
    let rows = engine
        .with_db(|db| db.unpublished_tasks(10_000, &Default::default(), &small))
        .unwrap()
        .0;
    rows.iter()
        .map(|row| (row.run_id.clone(), row.step.clone(), row.route().into_owned()))
        .collect()
}

/// The due outbox tasks, decoded.
pub fn due(engine: &Engine) -> Vec<(Task, String)> {
    let rows = engine
        .with_db(|db| db.unpublished_tasks(10_000, &Default::default(), &|_| false))
        .unwrap()
        .0;
    rows.iter()
        .map(|row| {
            let (body, hash) = engine.task_body(row).unwrap();
            (
                decode::<Task>(
                    &body,
                    &Limits {
                        max_compressed: 1 << 24,
                        max_decompressed: 1 << 24,
                    },
                )
                .unwrap(),
                hash,
            )
        })
        .collect()
}

/// Take the next due task and mark it published, as the outbox would.
pub fn publish_next(engine: &Engine) -> Task {
    let (task, _) = due(engine).remove(0);
    engine
        .with_db(|db| db.mark_published(&[task.task_id.to_string()]))
        .unwrap();
    task
}

/// The example config with extra workflows, in a folder of its own.
pub fn config_with(dir: &Path, workflows: &[(&str, &str)]) -> Config {
    config_with_files(dir, workflows, &[])
}

/// The example config with extra workflows and files (paths relative to the folder).
pub fn config_with_files(dir: &Path, workflows: &[(&str, &str)], files: &[(&str, &str)]) -> Config {
    let config_dir = dir.join("config");
    let copied = std::process::Command::new("cp")
        .arg("-r")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config"))
        .arg(&config_dir)
        .status()
        .unwrap();
    assert!(copied.success());
    for (name, yaml) in workflows {
        std::fs::write(config_dir.join("workflows").join(format!("{name}.yaml")), yaml).unwrap();
    }
    for (path, text) in files {
        std::fs::write(config_dir.join(path), text).unwrap();
    }
    Config::load(&config_dir).unwrap()
}

/// An engine over `config` and the database at `db`.
pub fn engine_over(config: Config, db: &Path) -> Engine {
    Engine::new(config, store(db), EngineLimits::default())
}

/// Publish every due task and answer each with `answer`, until none is
/// due (waiting out retry delays); how many tasks were answered.
pub fn drive(engine: &Engine, mut answer: impl FnMut(&Task) -> TaskStatus) -> usize {
    let mut answered = 0;
    for _ in 0..1000 {
        let due = due(engine);
        if due.is_empty() {
            if engine
                .with_db(|db| db.unpublished_tasks(1, &Default::default(), &|_| false))
                .unwrap()
                .0
                .is_empty()
            {
                return answered;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
            continue;
        }
        let ids: Vec<String> = due.iter().map(|(t, _)| t.task_id.to_string()).collect();
        engine.with_db(|db| db.mark_published(&ids)).unwrap();
        let results: Vec<TaskResult> = due.iter().map(|(t, _)| result(t, answer(t), "out")).collect();
        answered += results.len();
        engine.apply(&results).unwrap();
    }
    panic!("the run never settled");
}
