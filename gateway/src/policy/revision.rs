//! Which policy is running: the Git commit of the policy directory when it is in a Git
//! checkout or a git-sync target, read from the repository's files (no `git` binary at run
//! time), and always a hash of the set's contents.
//!
//! Found by walking up from the directory (symbolic links resolved, so a git-sync link
//! names the worktree it points at) to a `.git` directory — or a `.git` file
//! (`gitdir: ...`, as worktrees and submodules have) — then reading `HEAD`: a detached
//! commit, or a ref resolved through the loose refs and `packed-refs` (of the common
//! directory for a worktree).

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// A policy set's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revision {
    /// The commit checked out, when the directory is in a Git checkout.
    pub commit: Option<String>,
    /// SHA-256 over the file names and contents, hex.
    pub content: String,
}

impl Revision {
    /// The revision of the set `sources` (as read from `dir`, if it came from one).
    pub fn of(dir: Option<&Path>, sources: &[(String, String)]) -> Self {
        let mut h = Sha256::new();
        for (name, text) in sources {
            h.update((name.len() as u64).to_le_bytes());
            h.update(name.as_bytes());
            h.update((text.len() as u64).to_le_bytes());
            h.update(text.as_bytes());
        }
        Self {
            commit: dir.and_then(git_commit),
            content: hex::encode(h.finalize()),
        }
    }

    /// How the revision is shown: the commit, else `sha256:` and the first 16 hex digits of
    /// the content hash.
    pub fn label(&self) -> String {
        match &self.commit {
            Some(c) => c.clone(),
            None => format!("sha256:{}", &self.content[..16]),
        }
    }
}

/// The commit checked out in the Git repository `dir` is in, if any.
pub fn git_commit(dir: &Path) -> Option<String> {
    let start = std::fs::canonicalize(dir).ok()?;
    let git_dir = start.ancestors().find_map(git_dir_at)?;
    let head = read_trimmed(&git_dir.join("HEAD"))?;
    match head.strip_prefix("ref: ") {
        Some(name) => resolve_ref(&git_dir, name.trim()),
        None => is_commit(&head).then_some(head),
    }
}

/// The Git directory of a working tree rooted at `dir`, if it is one.
fn git_dir_at(dir: &Path) -> Option<PathBuf> {
    let dot = dir.join(".git");
    if dot.is_dir() {
        return Some(dot);
    }
    // A worktree or submodule: `.git` is a file naming the real directory.
    let text = read_trimmed(&dot)?;
    let target = Path::new(text.strip_prefix("gitdir:")?.trim());
    Some(if target.is_absolute() {
        target.to_path_buf()
    } else {
        dir.join(target)
    })
}

/// A ref's commit: loose in the Git directory or its common directory, else packed.
fn resolve_ref(git_dir: &Path, name: &str) -> Option<String> {
    if name.contains("..") {
        return None;
    }
    let common = read_trimmed(&git_dir.join("commondir"))
        .map(|c| git_dir.join(c))
        .unwrap_or_else(|| git_dir.to_path_buf());
    for base in [git_dir, common.as_path()] {
        if let Some(c) = read_trimmed(&base.join(name)).filter(|c| is_commit(c)) {
            return Some(c);
        }
    }
    let packed = std::fs::read_to_string(common.join("packed-refs")).ok()?;
    packed.lines().find_map(|line| {
        let (commit, r) = line.split_once(' ')?;
        (r.trim() == name && is_commit(commit)).then(|| commit.to_string())
    })
}

fn read_trimmed(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    Some(text.trim().to_string())
}

/// A full SHA-1 or SHA-256 object name.
fn is_commit(s: &str) -> bool {
    matches!(s.len(), 40 | 64) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    const C1: &str = "0123456789abcdef0123456789abcdef01234567";
    const C2: &str = "89abcdef0123456789abcdef0123456789abcdef";

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn reads_a_branch_a_packed_ref_a_detached_head_and_a_worktree() {
        let repo = tempfile::tempdir().unwrap();
        let git = repo.path().join(".git");
        let policies = repo.path().join("policies");
        std::fs::create_dir_all(&policies).unwrap();
        write(&git.join("HEAD"), "ref: refs/heads/main\n");
        write(&git.join("refs/heads/main"), &format!("{C1}\n"));
        assert_eq!(git_commit(&policies).as_deref(), Some(C1));
        // Packed (after `git gc`).
        std::fs::remove_file(git.join("refs/heads/main")).unwrap();
        write(
            &git.join("packed-refs"),
            &format!("# pack-refs with: peeled fully-peeled sorted\n{C2} refs/heads/main\n"),
        );
        assert_eq!(git_commit(&policies).as_deref(), Some(C2));
        // Detached, as git-sync leaves its worktrees.
        write(&git.join("HEAD"), &format!("{C1}\n"));
        assert_eq!(git_commit(&policies).as_deref(), Some(C1));
        // A worktree: `.git` is a file; the branch lives in the common directory.
        let wt = tempfile::tempdir().unwrap();
        let wt_git = git.join("worktrees/wt");
        write(
            &wt.path().join(".git"),
            &format!("gitdir: {}\n", wt_git.display()),
        );
        write(&wt_git.join("HEAD"), "ref: refs/heads/main\n");
        write(&wt_git.join("commondir"), "../..\n");
        assert_eq!(git_commit(wt.path()).as_deref(), Some(C2));
    }

    #[test]
    fn no_repository_no_commit_and_the_content_hash_follows_the_files() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(git_commit(dir.path()), None);
        let a = Revision::of(Some(dir.path()), &[("a.toml".into(), "x = 1".into())]);
        let b = Revision::of(Some(dir.path()), &[("a.toml".into(), "x = 2".into())]);
        let renamed = Revision::of(None, &[("b.toml".into(), "x = 1".into())]);
        assert_ne!(a.content, b.content);
        assert_ne!(a.content, renamed.content);
        assert!(a.label().starts_with("sha256:"));
        assert_eq!(a.label().len(), "sha256:".len() + 16);
        // A HEAD that is neither a ref nor an object name is no commit.
        write(&dir.path().join(".git/HEAD"), "garbage\n");
        assert_eq!(git_commit(dir.path()), None);
    }
}
