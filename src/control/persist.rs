//! Persistence of rollout phases: one JSON file per route, `<state.dir>/<route>.json`,
//! keyed by the canary's version label, so a restart or a crash resumes where it was: a
//! rolled-back version stays rolled back, a rollout resumes at its step. An unreadable
//! file puts the route on the safe side (rolled back) until the version changes or an
//! operator resumes it.
//!
//! A file is written atomically (a temp file named for this process and write, fsync,
//! rename, fsync of the directory), so a crash leaves the old file or the new one, and an
//! old and a new process (`--upgrade`) never write the same temp file. Writes happen on the
//! [`Persister`]'s own thread, in the order the control module decided them, never under
//! the control lock.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;

use crate::rollout::phase::Record;

/// Errors of the state store, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not a Kanaria state file: {msg}")]
    Corrupt { path: String, msg: String },
}

/// The directory of state files.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub fn new(dir: &Path) -> Result<Store, StoreError> {
        fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.display().to_string(),
            source,
        })?;
        Ok(Store {
            dir: dir.to_path_buf(),
        })
    }

    pub fn path(&self, route: &str) -> PathBuf {
        self.dir.join(format!("{route}.json"))
    }

    /// The saved record of a route: `Ok(None)` when there is none.
    pub fn load(&self, route: &str) -> Result<Option<Record>, StoreError> {
        let path = self.path(route);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StoreError::Io {
                    path: path.display().to_string(),
                    source,
                })
            }
        };
        let rec: Record = serde_json::from_str(&text).map_err(|e| StoreError::Corrupt {
            path: path.display().to_string(),
            msg: e.to_string(),
        })?;
        if rec.route != route {
            return Err(StoreError::Corrupt {
                path: path.display().to_string(),
                msg: format!("it is for route {:?}", rec.route),
            });
        }
        Ok(Some(rec))
    }

    /// Saves atomically: a crash leaves the old file or the new one, never a torn one.
    pub fn save(&self, rec: &Record) -> Result<(), StoreError> {
        let path = self.path(&rec.route);
        // Unique per process and write: during `--upgrade` the old and the new process may
        // both save, and must never write into each other's temp file.
        static WRITES: AtomicU64 = AtomicU64::new(0);
        let tmp = self.dir.join(format!(
            ".{}.json.{}.{}.tmp",
            rec.route,
            std::process::id(),
            WRITES.fetch_add(1, Ordering::Relaxed)
        ));
        let io = |source| StoreError::Io {
            path: path.display().to_string(),
            source,
        };
        let body = serde_json::to_vec_pretty(rec).map_err(|e| io(std::io::Error::other(e)))?;
        let mut f = fs::File::create(&tmp).map_err(io)?;
        f.write_all(&body).map_err(io)?;
        f.sync_all().map_err(io)?;
        drop(f);
        if let Err(e) = fs::rename(&tmp, &path) {
            let _ = fs::remove_file(&tmp);
            return Err(io(e));
        }
        // The rename is durable only once the directory is.
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        Ok(())
    }

    /// Removes a route's file (the route left the config: re-adding it starts afresh).
    pub fn remove(&self, route: &str) -> Result<(), StoreError> {
        let path = self.path(route);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StoreError::Io {
                path: path.display().to_string(),
                source,
            }),
        }
    }
}

/// A write for the persister thread.
pub enum Write {
    Save(Record),
    Remove(String),
}

/// Saves and removes state files on a thread of its own, in the order they were queued.
/// Queueing never blocks; whoever must know the file is durable (an operator's action
/// answered only once it is) waits on [`Persister::flush`] outside every lock.
#[derive(Clone)]
pub struct Persister {
    tx: mpsc::Sender<(Option<Write>, Option<mpsc::SyncSender<()>>)>,
    store: Store,
}

impl Persister {
    pub fn start(store: Store) -> std::io::Result<Persister> {
        let (tx, rx) = mpsc::channel::<(Option<Write>, Option<mpsc::SyncSender<()>>)>();
        let s = store.clone();
        std::thread::Builder::new()
            .name("kanaria-state".into())
            .spawn(move || {
                for (write, done) in rx {
                    let result = match &write {
                        Some(Write::Save(rec)) => s.save(rec),
                        Some(Write::Remove(route)) => s.remove(route),
                        None => Ok(()),
                    };
                    if let Err(e) = result {
                        log::error!("cannot persist rollout state: {e}");
                    }
                    if let Some(done) = done {
                        let _ = done.send(());
                    }
                }
            })?;
        Ok(Persister { tx, store })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Queues a write. Never blocks.
    pub fn queue(&self, write: Write) {
        if self.tx.send((Some(write), None)).is_err() {
            log::error!("the state writer thread is gone: a rollout state was not saved");
        }
    }

    /// Waits until every write queued before this call is on disk.
    pub fn flush(&self) {
        let (done, wait) = mpsc::sync_channel(1);
        if self.tx.send((None, Some(done))).is_ok() {
            let _ = wait.recv();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::phase::Phase;

    #[test]
    fn records_round_trip_and_corruption_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path()).unwrap();
        assert!(store.load("app").unwrap().is_none());
        let rec = Record {
            route: "app".into(),
            canary_version: "v2".into(),
            phase: Phase::Progressing {
                step: 2,
                since_ms: 42,
            },
            updated_ms: 43,
            unshared: false,
            resumes: 0,
        };
        store.save(&rec).unwrap();
        assert_eq!(store.load("app").unwrap(), Some(rec.clone()));
        // No temp file is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("app.json")]);
        // Through the writer thread, in order; removal forgets the route.
        let persister = Persister::start(store.clone()).unwrap();
        persister.queue(Write::Remove("app".into()));
        persister.flush();
        assert!(store.load("app").unwrap().is_none());
        persister.queue(Write::Save(rec.clone()));
        persister.flush();
        assert_eq!(store.load("app").unwrap(), Some(rec));
        std::fs::write(store.path("app"), "{ not json").unwrap();
        let err = store.load("app").unwrap_err().to_string();
        assert!(err.contains("app.json: not a Kanaria state file"), "{err}");
    }

    /// A file written before the "not yet shared" mark existed reads as shared; a
    /// pending rollback round-trips, and a file with nothing pending looks as before.
    #[test]
    fn the_unshared_mark_is_optional_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path()).unwrap();
        std::fs::write(
            store.path("app"),
            r#"{ "route": "app", "canary_version": "v2", "phase": { "state": "rolled_back", "reason": "manual" }, "updated_ms": 1 }"#,
        )
        .unwrap();
        let old = store.load("app").unwrap().unwrap();
        assert!(!old.unshared);
        let pending = Record {
            unshared: true,
            ..old.clone()
        };
        store.save(&pending).unwrap();
        assert!(std::fs::read_to_string(store.path("app"))
            .unwrap()
            .contains("\"unshared\": true"));
        assert_eq!(store.load("app").unwrap(), Some(pending));
        store.save(&old).unwrap();
        assert!(!std::fs::read_to_string(store.path("app"))
            .unwrap()
            .contains("unshared"));
    }

    /// Two writers of one route (an old and a new process during `--upgrade`) never share
    /// a temp file: every save succeeds and the file is always whole. With one fixed temp
    /// name, one writer's rename took the other's half-written file, or found none.
    #[test]
    fn concurrent_writers_of_one_route_never_collide() {
        let dir = tempfile::tempdir().unwrap();
        let writers: Vec<_> = (0..2)
            .map(|w| {
                let store = Store::new(dir.path()).unwrap();
                std::thread::spawn(move || {
                    for i in 0..100 {
                        let rec = Record {
                            route: "app".into(),
                            canary_version: format!("v{w}"),
                            phase: Phase::Paused { step: i },
                            updated_ms: i as u64,
                            unshared: false,
                            resumes: 0,
                        };
                        store.save(&rec).unwrap();
                        // Every read in between finds a whole file.
                        store.load("app").unwrap().unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        let store = Store::new(dir.path()).unwrap();
        let rec = store.load("app").unwrap().unwrap();
        assert_eq!(rec.phase, Phase::Paused { step: 99 });
    }
}
