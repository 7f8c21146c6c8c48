//! Which scheduler leads when several share one PostgreSQL database.
//!
//! The leader holds a session-level advisory lock ([`LEADER_LOCK`]) on a
//! connection of its own. Only the leader publishes the outbox and the
//! cancellations, consumes and applies results, and runs the clock
//! (timeouts, lost tasks, admission); every scheduler serves the API, whose
//! changes are committed to the shared database (and land in the outbox for
//! the leader to publish). When the leader dies its connection closes,
//! PostgreSQL releases the lock, and another scheduler takes it within
//! [`POLL`]. A leader that loses its lock connection steps down at once.
//!
//! With SQLite the one scheduler always leads.

use std::time::{Duration, Instant};

use postgres::fallible_iterator::FallibleIterator;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::db::sql::OUTBOX_CHANNEL;

/// The advisory lock the leading scheduler holds (distinct from the write
/// lock every writing transaction takes).
pub const LEADER_LOCK: i64 = 0x636f_7572_6965_7202;

/// How often a waiting scheduler tries the lock, and a leader checks that
/// its connection still holds it.
pub const POLL: Duration = Duration::from_millis(500);

/// Whether this scheduler leads, as it changes. With `database_url` unset
/// (SQLite), always. Otherwise a thread keeps a connection to the database:
/// it takes the lock when free, and wakes `outbox` when another scheduler
/// commits tasks or cancellations (`NOTIFY`): it calls `wake`.
pub fn watch(
    database_url: Option<String>,
    wake: impl Fn() + Send + 'static,
    shutdown: CancellationToken,
) -> watch::Receiver<bool> {
    let Some(url) = database_url else {
        return watch::channel(true).1;
    };
    let (tx, rx) = watch::channel(false);
    let spawned = std::thread::Builder::new()
        .name("courier-leader".into())
        .spawn(move || campaign(&url, &tx, &wake, &shutdown));
    if let Err(e) = spawned {
        warn!(error = %e, "cannot start the leadership thread; this scheduler will not lead");
    }
    rx
}

fn campaign(url: &str, leading: &watch::Sender<bool>, wake: &dyn Fn(), shutdown: &CancellationToken) {
    while !shutdown.is_cancelled() {
        match hold(url, leading, wake, shutdown) {
            Ok(()) => {}
            Err(e) => warn!(error = %e, "leadership connection failed; trying again"),
        }
        if *leading.borrow() {
            warn!("stepping down: the leadership lock's connection was lost");
            leading.send_replace(false);
        }
        std::thread::sleep(POLL);
    }
}

/// One connection's life: try the lock until it is held, then keep it,
/// passing notifications on, until the connection fails or shutdown.
fn hold(
    url: &str,
    leading: &watch::Sender<bool>,
    wake: &dyn Fn(),
    shutdown: &CancellationToken,
) -> Result<(), postgres::Error> {
    let mut client = postgres::Client::connect(url, postgres::NoTls)?;
    client.batch_execute(&format!("LISTEN {OUTBOX_CHANNEL}"))?;
    while !shutdown.is_cancelled() {
        if !*leading.borrow() {
            let got: bool = client
                .query_one("SELECT pg_try_advisory_lock($1)", &[&LEADER_LOCK])?
                .get(0);
            if got {
                info!("this scheduler leads: it publishes, applies results and keeps the clock");
                leading.send_replace(true);
            }
        } else {
            // Still connected, so still holding the lock.
            client.simple_query("SELECT 1")?;
        }
        let until = Instant::now() + POLL;
        let mut notifications = client.notifications();
        let mut waiting = notifications.timeout_iter(POLL);
        while let Some(_note) = waiting.next()? {
            wake();
            if Instant::now() >= until {
                break;
            }
        }
    }
    Ok(())
}
