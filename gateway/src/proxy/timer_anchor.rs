//! Keeps each worker's timer wheel anchored a second ahead, so that arming a request's
//! deadline never wakes the worker's own I/O driver.
//!
//! Tokio's timer driver, when a new timer is due before the earliest one it knows, wakes the
//! driver through its eventfd — even when the thread arming the timer is the driver's own,
//! and awake. On an otherwise idle worker every request's first-byte deadline is such a
//! timer: a `write` and an extra `epoll_wait` per request (measured with `strace -k`: 0.7 of
//! them per request at 1000 req/s). A task that sleeps one second at a time keeps an earlier
//! timer in place, so the 30 s deadlines are never the earliest. Cost: one wake-up per
//! second per worker.

use std::cell::Cell;
use std::time::Duration;

thread_local! {
    static ANCHORED: Cell<bool> = const { Cell::new(false) };
}

/// Starts the anchor on the current worker's runtime the first time it is called there.
pub fn ensure() {
    if ANCHORED.with(|a| a.replace(true)) {
        return;
    }
    tokio::spawn(async {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
}
