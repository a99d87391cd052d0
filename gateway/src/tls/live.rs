//! A certificate that follows its files: [`LiveCert`] answers every handshake with the pair
//! it holds and, at most once a second, looks at the files; when they changed it reads them
//! again and, if the new pair is whole and matches, serves it from then on. A half-written
//! rotation (a new certificate beside the old key) is refused and retried when the files
//! change again; the old pair stays until then. Open connections never notice.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;

use super::{CertFiles, TlsError};

/// How often a handshake may look at the files.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// What a file looked like when last read: a rotation changes one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

fn stamp(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    // `metadata` follows symbolic links, as a Kubernetes secret volume's `..data` swap needs.
    let m = std::fs::metadata(path).ok()?;
    Some(FileStamp {
        modified: m.modified().ok(),
        len: m.len(),
        inode: m.ino(),
    })
}

#[derive(Debug)]
struct Watch {
    checked_at: Instant,
    /// The stamps of the pair last read (served or refused).
    seen: (Option<FileStamp>, Option<FileStamp>),
}

/// A certificate and key read from files and read again when they change.
#[derive(Debug)]
pub struct LiveCert {
    /// Which listener or pool it serves, for the log.
    name: String,
    files: CertFiles,
    current: ArcSwap<CertifiedKey>,
    watch: Mutex<Watch>,
}

impl LiveCert {
    /// Reads the pair; an error when it cannot be used.
    pub fn load(name: impl Into<String>, files: CertFiles) -> Result<Arc<Self>, TlsError> {
        let seen = (stamp(&files.cert_file), stamp(&files.key_file));
        let key = files.load()?;
        Ok(Arc::new(Self {
            name: name.into(),
            files,
            current: ArcSwap::from_pointee(key),
            watch: Mutex::new(Watch {
                checked_at: Instant::now(),
                seen,
            }),
        }))
    }

    /// The files it follows.
    pub fn files(&self) -> &CertFiles {
        &self.files
    }

    /// The pair to present now, after reading the files again if they changed.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.refresh(Instant::now());
        self.current.load_full()
    }

    /// Looks at the files if the last look is `CHECK_EVERY` old. One caller looks; the
    /// others, meanwhile, serve what is there.
    fn refresh(&self, now: Instant) {
        let Ok(mut watch) = self.watch.try_lock() else {
            return;
        };
        if now.duration_since(watch.checked_at) < CHECK_EVERY {
            return;
        }
        watch.checked_at = now;
        let seen = (stamp(&self.files.cert_file), stamp(&self.files.key_file));
        if seen == watch.seen {
            return;
        }
        watch.seen = seen;
        match self.files.load() {
            Ok(key) => {
                self.current.store(Arc::new(key));
                tracing::info!(
                    target: "tls",
                    name = %self.name,
                    cert = %self.files.cert_file.display(),
                    "certificate reloaded"
                );
            }
            Err(e) => tracing::warn!(
                target: "tls",
                name = %self.name,
                error = %e,
                "the changed certificate files are not usable; still serving the previous pair"
            ),
        }
    }
}

impl ResolvesServerCert for LiveCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl ResolvesClientCert for LiveCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(dir: &Path, name: &str) -> (CertFiles, Vec<u8>) {
        let ck = rcgen::generate_simple_self_signed(vec![format!("{name}.test")]).unwrap();
        let files = CertFiles {
            cert_file: dir.join(format!("{name}.crt")),
            key_file: dir.join(format!("{name}.key")),
        };
        std::fs::write(&files.cert_file, ck.cert.pem()).unwrap();
        std::fs::write(&files.key_file, ck.key_pair.serialize_pem()).unwrap();
        (files, ck.cert.der().to_vec())
    }

    fn served(live: &LiveCert) -> Vec<u8> {
        live.current.load().cert[0].to_vec()
    }

    #[test]
    fn a_rotated_pair_is_served_and_a_mismatched_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let (files, first) = pair(dir.path(), "a");
        let live = LiveCert::load("test", files.clone()).unwrap();
        assert_eq!(served(&live), first);

        // A new certificate beside the old key (half a rotation): refused, the old stays.
        let (other, second) = pair(dir.path(), "b");
        std::fs::copy(&other.cert_file, &files.cert_file).unwrap();
        live.refresh(Instant::now() + CHECK_EVERY);
        assert_eq!(
            served(&live),
            first,
            "a certificate without its key is refused"
        );

        // The key follows: the new pair is served.
        std::fs::copy(&other.key_file, &files.key_file).unwrap();
        live.refresh(Instant::now() + 2 * CHECK_EVERY);
        assert_eq!(served(&live), second);
    }

    #[test]
    fn files_are_looked_at_at_most_once_a_second() {
        let dir = tempfile::tempdir().unwrap();
        let (files, first) = pair(dir.path(), "a");
        let live = LiveCert::load("test", files.clone()).unwrap();
        let (other, _) = pair(dir.path(), "b");
        std::fs::rename(&other.cert_file, &files.cert_file).unwrap();
        std::fs::rename(&other.key_file, &files.key_file).unwrap();
        live.refresh(Instant::now());
        assert_eq!(served(&live), first, "looked again within the second");
    }

    #[test]
    fn unusable_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let (files, _) = pair(dir.path(), "a");
        let missing = CertFiles {
            cert_file: dir.path().join("none.crt"),
            ..files.clone()
        };
        let e = LiveCert::load("t", missing).unwrap_err();
        assert!(matches!(e, TlsError::Read { .. }), "{e}");
        let swapped = CertFiles {
            cert_file: files.key_file.clone(),
            key_file: files.cert_file.clone(),
        };
        let e = LiveCert::load("t", swapped).unwrap_err().to_string();
        assert!(e.contains("no certificate"), "{e}");
        let (other, _) = pair(dir.path(), "b");
        let mismatched = CertFiles {
            cert_file: files.cert_file.clone(),
            key_file: other.key_file,
        };
        let e = LiveCert::load("t", mismatched).unwrap_err();
        assert!(matches!(e, TlsError::Pair { .. }), "{e}");
    }
}
