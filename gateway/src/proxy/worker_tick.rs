//! A task on every worker that wakes once a second, with two jobs: it closes the worker's
//! pooled upstream connections that have been idle too long, and it keeps the worker's
//! timer wheel anchored a second ahead, so that arming a request's deadline never wakes the
//! worker's own I/O driver.
//!
//! About the second job: Tokio's timer driver, when a new timer is due before the earliest
//! one it knows, wakes the driver through its eventfd — even when the thread arming the
//! timer is the driver's own, and awake. On an otherwise idle worker every request's
//! first-byte deadline is such a timer: a `write` and an extra `epoll_wait` per request
//! (`strace -k`: 0.79 of them per request at 1000 req/s; 0.01 with the tick). With a timer
//! at most a second away, the 30 s deadlines are never the earliest.

use std::cell::Cell;
use std::time::Duration;

use super::upstream;

thread_local! {
    static STARTED: Cell<bool> = const { Cell::new(false) };
}

/// Starts the tick on the current worker's runtime the first time it is called there;
/// connections idle for `pool_idle` are closed.
pub fn ensure(pool_idle: Duration) {
    if STARTED.with(|s| s.replace(true)) {
        return;
    }
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            upstream::close_expired(pool_idle);
        }
    });
}
