//! Watching the policy directory: a change (debounced) calls back, and so does a periodic
//! look, in case an event was missed (a network filesystem, an overflowing queue).
//!
//! The atomic swaps that deliver policies are followed: git-sync and `ln -sfn` replace a
//! symbolic link to the directory (or to a directory above it), and a Kubernetes ConfigMap
//! renames a `..data` link inside it. The watcher watches the directory the path resolves
//! to and the parent of every symbolic link on the way, and after each callback watches
//! again, so a swapped link is followed to its new target.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use notify::{Event, RecommendedWatcher, RecursiveMode, Watcher};

/// What the watcher watches for one resolution of the path.
#[derive(Debug, Default, PartialEq)]
struct Watched {
    /// The directory the path resolves to.
    target: Option<PathBuf>,
    /// Symbolic links on the way (as written in the path).
    links: Vec<PathBuf>,
    /// Directories watched (non-recursively).
    dirs: Vec<PathBuf>,
}

fn resolve(path: &Path) -> Watched {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut w = Watched {
        target: std::fs::canonicalize(&absolute).ok(),
        ..Watched::default()
    };
    let mut prefix = PathBuf::new();
    for part in absolute.components() {
        prefix.push(part);
        if prefix.is_symlink() {
            w.links.push(prefix.clone());
            if let Some(parent) = prefix.parent() {
                w.dirs.push(parent.to_path_buf());
            }
        }
    }
    // The path itself may appear (or be replaced) under its parent.
    if let Some(parent) = absolute.parent() {
        w.links.push(absolute.clone());
        w.dirs.push(parent.to_path_buf());
    }
    if let Some(t) = &w.target {
        w.dirs.push(t.clone());
    }
    w.dirs.sort();
    w.dirs.dedup();
    w
}

impl Watched {
    /// Whether an event concerns the policy: a change (not a read: reading the files for
    /// a reload must not set off another) of a path in the target, or of a link on the way.
    fn concerns(&self, event: &Event) -> bool {
        if matches!(event.kind, notify::EventKind::Access(_)) {
            return false;
        }
        event.paths.iter().any(|p| {
            self.target.as_ref().is_some_and(|t| p.starts_with(t))
                || self.links.iter().any(|l| p == l)
        })
    }
}

/// Errors starting the watcher.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The OS watcher could not be created.
    #[error("watching the policy directory: {0}")]
    Notify(#[from] notify::Error),
    /// The thread could not start.
    #[error("starting the policy watcher: {0}")]
    Thread(#[from] std::io::Error),
}

/// Starts a thread that calls `on_change` when something under `dir` changes (after
/// `debounce` of quiet) and every `poll` regardless. Runs for the life of the process.
pub fn spawn(
    dir: PathBuf,
    debounce: Duration,
    poll: Duration,
    on_change: impl Fn() + Send + 'static,
) -> Result<(), WatchError> {
    let (tx, rx) = mpsc::channel::<notify::Result<Event>>();
    let mut watcher: RecommendedWatcher = notify::recommended_watcher(tx)?;
    let mut watched = Watched::default();
    rewatch(&mut watcher, &mut watched, &dir);
    std::thread::Builder::new()
        .name("policy-watch".into())
        .spawn(move || loop {
            match rx.recv_timeout(poll) {
                Ok(Ok(event)) if !watched.concerns(&event) => continue,
                Ok(_) => {
                    // Wait for quiet: a writer, or a swap of many files, is done.
                    loop {
                        match rx.recv_timeout(debounce) {
                            Ok(_) => continue,
                            Err(mpsc::RecvTimeoutError::Timeout) => break,
                            Err(mpsc::RecvTimeoutError::Disconnected) => return,
                        }
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
            on_change();
            rewatch(&mut watcher, &mut watched, &dir);
        })?;
    Ok(())
}

/// Watches what `dir` resolves to now, and stops watching what it no longer does.
fn rewatch(watcher: &mut RecommendedWatcher, watched: &mut Watched, dir: &Path) {
    let next = resolve(dir);
    if next == *watched {
        return;
    }
    for d in watched.dirs.iter().filter(|d| !next.dirs.contains(d)) {
        let _ = watcher.unwatch(d);
    }
    for d in next.dirs.iter().filter(|d| !watched.dirs.contains(d)) {
        if let Err(e) = watcher.watch(d, RecursiveMode::NonRecursive) {
            tracing::warn!(target: "policy", dir = %d.display(), error = %e, "cannot watch");
        }
    }
    *watched = next;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_linked_directory_is_watched_through_its_links() {
        let root = tempfile::tempdir().unwrap();
        let v1 = root.path().join("v1");
        std::fs::create_dir(&v1).unwrap();
        let link = root.path().join("current");
        std::os::unix::fs::symlink(&v1, &link).unwrap();
        let w = resolve(&link);
        let v1 = std::fs::canonicalize(&v1).unwrap();
        assert_eq!(w.target.as_deref(), Some(v1.as_path()));
        assert!(w.links.contains(&link));
        assert!(w.dirs.contains(&v1));
        assert!(w.dirs.contains(&root.path().to_path_buf()));
        let touch = |p: PathBuf| Event::new(notify::EventKind::Any).add_path(p);
        assert!(w.concerns(&touch(v1.join("a.toml"))));
        assert!(w.concerns(&touch(link.clone())));
        assert!(!w.concerns(&touch(root.path().join("unrelated"))));
        // Reads (the reload's own) are not changes.
        let read = Event::new(notify::EventKind::Access(notify::event::AccessKind::Read))
            .add_path(v1.join("a.toml"));
        assert!(!w.concerns(&read));
        // A broken link resolves to nothing, and is still watched for its return.
        std::fs::remove_file(&link).unwrap();
        std::os::unix::fs::symlink(root.path().join("gone"), &link).unwrap();
        let broken = resolve(&link);
        assert_eq!(broken.target, None);
        assert!(broken.dirs.contains(&root.path().to_path_buf()));
    }
}
