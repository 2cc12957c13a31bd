//! Hot reload: watches the config file's directory and listens for SIGHUP.
//!
//! The *directory* is watched, not the file, so every way a file gets replaced is seen: an
//! in-place write, an editor's write-to-temp-and-rename, and a Kubernetes ConfigMap update
//! (the `..data` symlink swapped to a new timestamped directory). Events are debounced, then
//! the file is parsed, validated and built off the request path (a blocking task: a new
//! endpoint name is resolved) and published whole by [`Control::reload_from_file`]. A bad file leaves the
//! old config serving; a deleted file changes nothing.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use notify::{RecursiveMode, Watcher};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::sync::mpsc;

use super::Control;

/// The background service that reloads the config.
pub struct Reloader {
    shared: Arc<Control>,
}

impl Reloader {
    pub fn new(shared: Arc<Control>) -> Self {
        Reloader { shared }
    }
}

/// Is a file event about our config? Its own name, or a ConfigMap's `..data` swap.
fn relevant(event: &notify::Event, file_name: &std::ffi::OsStr) -> bool {
    use notify::EventKind::*;
    matches!(event.kind, Create(_) | Modify(_) | Remove(_) | Any)
        && event.paths.iter().any(|p| {
            p.file_name().is_some_and(|n| {
                n == file_name || n.to_str().is_some_and(|s| s.starts_with("..data"))
            })
        })
}

/// Starts watching `path`'s directory; each relevant event sends one message.
fn watch(path: &Path, tx: mpsc::UnboundedSender<()>) -> notify::Result<notify::RecommendedWatcher> {
    let file_name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    let dir: PathBuf = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut watcher =
        notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
            Ok(ev) if relevant(&ev, &file_name) => {
                let _ = tx.send(());
            }
            Ok(_) => {}
            Err(e) => log::warn!("config watcher: {e}"),
        })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

impl Reloader {
    async fn reload(&self, trigger: &'static str) {
        if !self.shared.config_path.exists() {
            log::warn!(
                "config reload ({trigger}): {} does not exist; the running config stays",
                self.shared.config_path.display()
            );
            return;
        }
        let shared = self.shared.clone();
        // Parsing resolves endpoint host names: blocking work, kept off the async workers.
        match tokio::task::spawn_blocking(move || shared.reload_from_file(trigger)).await {
            Ok(_) => {}
            Err(e) => log::error!("config reload ({trigger}) task failed: {e}"),
        }
    }
}

#[async_trait]
impl BackgroundService for Reloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let settings = self.shared.snapshot().config.restart.reload.clone();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let _watcher = if settings.watch {
            match watch(&self.shared.config_path, tx) {
                Ok(w) => Some(w),
                Err(e) => {
                    log::error!(
                        "cannot watch {}: {e}; reload with SIGHUP instead",
                        self.shared.config_path.display()
                    );
                    None
                }
            }
        } else {
            None
        };
        // A change made between this process reading its file and the watcher starting
        // raises no event (an upgrade's new process waits for its listeners in between:
        // `make chaos` seed 300874 saw one run a new canary version's file with the old
        // version for as long as it lived): compare once now.
        if settings.watch {
            let shared = self.shared.clone();
            let differs = tokio::task::spawn_blocking(move || shared.file_differs())
                .await
                .unwrap_or(false);
            if differs {
                log::info!("the config file changed before it was watched; reloading");
                self.reload("watch").await;
            }
        }
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                log::error!("cannot listen for SIGHUP: {e}");
                None
            }
        };
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                Some(()) = rx.recv() => {
                    // Debounce: wait until the file has been quiet for a while, so a
                    // write in several chunks or a rename dance is read once, complete.
                    while let Ok(Some(())) =
                        tokio::time::timeout(settings.debounce, rx.recv()).await
                    {}
                    self.reload("watch").await;
                }
                Some(()) = async {
                    match hup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                } => self.reload("sighup").await,
            }
        }
    }
}
