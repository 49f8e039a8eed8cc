//! The background thread that keeps a stock topped up: the empty spares (see `spare`) and
//! the backing files prepared for creates (see `prepared`) each have one.
//!
//! The thread starts at the first wake-up, tops the stock up at each one, and ends once the
//! stock is dropped (it holds it weakly, and the stock holds the only sender). After a
//! failed top-up it rests, so that a full or read-only flash filesystem does not fail (and
//! log) at every create; creates meanwhile make their own backing files, and fail there
//! with the error their caller needs.

use std::io;
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

/// How long the thread rests after a failed top-up.
const REST_AFTER_ERROR: Duration = Duration::from_secs(10);

/// One stock's thread: its name, and the sender that wakes it.
#[derive(Debug)]
pub(crate) struct Refill {
    /// The thread's name, which its log lines also carry.
    name: &'static str,
    wake: OnceLock<SyncSender<()>>,
}

impl Refill {
    pub(crate) const fn new(name: &'static str) -> Refill {
        Refill {
            name,
            wake: OnceLock::new(),
        }
    }

    /// Asks for `top_up(stock)` on the thread, starting the thread on first use. Returns
    /// at once; a wake-up already pending covers this one.
    pub(crate) fn poke<T: Send + Sync + 'static>(
        &self,
        stock: &Arc<T>,
        top_up: fn(&T) -> io::Result<usize>,
    ) {
        let tx = self.wake.get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            let weak = Arc::downgrade(stock);
            let name = self.name;
            let spawned = std::thread::Builder::new()
                .name(name.into())
                .spawn(move || run(name, &weak, &rx, top_up));
            if let Err(e) = spawned {
                tracing::warn!("cannot start {name}: {e}; creates make their own backing files");
            }
            tx
        });
        // Full: a wake-up is already pending. Disconnected: the thread could not start.
        let _ = tx.try_send(());
    }
}

fn run<T>(name: &str, stock: &Weak<T>, wake: &Receiver<()>, top_up: fn(&T) -> io::Result<usize>) {
    while wake.recv().is_ok() {
        let Some(strong) = stock.upgrade() else {
            return;
        };
        let made = top_up(&strong);
        drop(strong);
        match made {
            Ok(made) => tracing::debug!("{name}: {made} new empty backing files"),
            Err(e) => {
                tracing::warn!(
                    "{name}: {e}; creates make their own backing files, retrying in {} s",
                    REST_AFTER_ERROR.as_secs()
                );
                std::thread::sleep(REST_AFTER_ERROR);
            }
        }
    }
}
