//! Which scheduler leads when several share one PostgreSQL database.
//!
//! The leader holds a session-level advisory lock ([`LEADER_LOCK`]) on a
//! connection of its own. Only the leader publishes the outbox and the
//! cancellations, consumes and applies results, and runs the clock
//! (timeouts, lost tasks, admission); every scheduler serves the API, whose
//! changes are committed to the shared database (and land in the outbox for
//! the leader to publish). When the leader dies its connection closes,
//! PostgreSQL releases the lock, and another scheduler takes it within
//! [`POLL`].
//!
//! The lead is a lease: it holds only while the lock's connection answered
//! within [`LEASE`]. A leader whose connection fails or stops answering
//! (cut off from the database, its check stuck) stops leading at once, even
//! before the thread that keeps the connection notices.
//!
//! With SQLite the one scheduler always leads.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use postgres::fallible_iterator::FallibleIterator;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::db::sql::OUTBOX_CHANNEL;
use crate::engine::now_ms;

/// The advisory lock the leading scheduler holds (distinct from the write
/// lock every writing transaction takes).
pub const LEADER_LOCK: i64 = 0x636f_7572_6965_7202;

/// How often a waiting scheduler tries the lock, and a leader checks that
/// its connection still holds it.
pub const POLL: Duration = Duration::from_millis(500);

/// How long a lead holds after the lock's connection last answered.
pub const LEASE: Duration = Duration::from_millis(1500);

/// Whether this scheduler leads.
#[derive(Debug, Clone)]
pub struct Leadership {
    /// SQLite: always.
    always: bool,
    /// The lock is held (as the thread last saw it).
    held: watch::Receiver<bool>,
    /// When the lock's connection last answered (ms since the epoch).
    confirmed_ms: Arc<AtomicI64>,
}

impl Leadership {
    /// Leads now: the lock is held and its connection answered within [`LEASE`].
    pub fn leads(&self) -> bool {
        self.always
            || (*self.held.borrow()
                && now_ms() - self.confirmed_ms.load(Ordering::Relaxed) < i64::try_from(LEASE.as_millis()).unwrap_or(0))
    }

    /// The thread that keeps the lock's connection has died (it panicked):
    /// this scheduler can never lead again.
    pub fn lost(&self) -> bool {
        !self.always && self.held.has_changed().is_err()
    }
}

/// Start campaigning: with `database_url` unset (SQLite), this scheduler
/// always leads. Otherwise a thread keeps a connection to the database: it
/// takes the lock when free, and calls `wake` when another scheduler
/// commits tasks or cancellations (`NOTIFY`).
pub fn campaign(
    database_url: Option<String>,
    wake: impl Fn() + Send + 'static,
    shutdown: CancellationToken,
) -> Leadership {
    let (tx, held) = watch::channel(database_url.is_none());
    let confirmed_ms = Arc::new(AtomicI64::new(0));
    let Some(url) = database_url else {
        return Leadership {
            always: true,
            held,
            confirmed_ms,
        };
    };
    let confirmed = confirmed_ms.clone();
    let spawned = std::thread::Builder::new()
        .name("courier-leader".into())
        .spawn(move || {
            while !shutdown.is_cancelled() {
                if let Err(e) = hold(&url, &tx, &confirmed, &wake, &shutdown) {
                    warn!(error = %e, "leadership connection failed; trying again");
                }
                if tx.send_replace(false) {
                    warn!("stepping down: the leadership lock's connection was lost");
                }
                std::thread::sleep(POLL);
            }
        });
    if let Err(e) = spawned {
        warn!(error = %e, "cannot start the leadership thread; this scheduler will not lead");
    }
    Leadership {
        always: false,
        held,
        confirmed_ms,
    }
}

/// One connection's life: try the lock until it is held, then keep it,
/// passing notifications on, until the connection fails or shutdown.
fn hold(
    url: &str,
    held: &watch::Sender<bool>,
    confirmed_ms: &AtomicI64,
    wake: &dyn Fn(),
    shutdown: &CancellationToken,
) -> Result<(), crate::db::DbError> {
    let mut client = crate::db::pg_client(url)?;
    client.batch_execute(&format!("LISTEN {OUTBOX_CHANNEL}"))?;
    while !shutdown.is_cancelled() {
        if *held.borrow() {
            // Still connected, so still holding the lock.
            client.simple_query("SELECT 1")?;
            confirmed_ms.store(now_ms(), Ordering::Relaxed);
        } else {
            let got: bool = client
                .query_one("SELECT pg_try_advisory_lock($1)", &[&LEADER_LOCK])?
                .get(0);
            if got {
                confirmed_ms.store(now_ms(), Ordering::Relaxed);
                info!("this scheduler leads: it publishes, applies results and keeps the clock");
                held.send_replace(true);
            }
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
