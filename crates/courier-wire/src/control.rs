//! Control messages: what the scheduler tells every worker at once, through
//! the control stream (cancellations), and the markers a worker writes to
//! know it has read everything before it.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::frame::Frame;

/// One message on the control stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Control {
    /// Stop the run's steps (or one step's) and run none of its tasks.
    Cancel {
        /// The run.
        run_id: Uuid,
        /// One step only; `None` is the whole run.
        #[serde(default)]
        step: Option<String>,
        /// Why, for the results of the tasks it stops.
        reason: String,
    },
    /// Written by a worker when it connects; reading its own marker back
    /// means it has read every cancellation published before it.
    Marker {
        /// Unique per connection.
        nonce: Uuid,
    },
}

impl Frame for Control {
    const KIND: &'static str = "control message";
    const MAGIC: [u8; 4] = *b"CCTL";
    const VERSION: u8 = 1;
    const MIN_VERSION: u8 = 1;
}
