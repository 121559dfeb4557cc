//! Reload: re-read the configuration file (SIGHUP, `toa-lb ctl reload`) and
//! apply it with the guarantees of a live switch, or reject it and keep the
//! running one.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use crate::control::ctl::listener_name;
use crate::control::health::HealthCheck;
use crate::datapath::Balancer;
use crate::file::LbConfig;

/// Why a reload was rejected; the running configuration stays.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReloadError {
    /// The file does not load (unreadable, syntax, invalid).
    #[error(transparent)]
    File(#[from] crate::file::FileError),
    /// It changes something only a restart can.
    #[error("{0} changed: that needs a restart; nothing was reloaded")]
    NeedsRestart(&'static str),
    /// The datapath refused it.
    #[error(transparent)]
    Datapath(#[from] crate::datapath::ControlError),
}

/// What a reload may not change, or `None` when it changes none of it.
pub fn needs_restart(old: &LbConfig, new: &LbConfig) -> Option<&'static str> {
    if (&new.client_interface, &new.backend_interface) != (&old.client_interface, &old.backend_interface) {
        return Some("client_interface or backend_interface");
    }
    if new.metrics != old.metrics {
        return Some("metrics");
    }
    if new.datapath != old.datapath {
        return Some("datapath");
    }
    if (new.workers, new.busy_poll, new.offloads) != (old.workers, old.busy_poll, old.offloads) {
        return Some("workers, busy_poll_us or offloads");
    }
    if (new.transparent_mark, new.engine.max_flows) != (old.transparent_mark, old.engine.max_flows) {
        return Some("transparent_mark or max_flows");
    }
    None
}

/// Reloads one running load balancer from its file.
pub struct Reloader {
    path: PathBuf,
    current: Mutex<LbConfig>,
    balancer: Arc<dyn Balancer>,
    health: Arc<Mutex<Option<HealthCheck>>>,
}

impl Reloader {
    /// A reloader for `balancer`, started from `current` (read from `path`);
    /// a reload also replaces the health check settings in `health`.
    pub fn new(
        path: PathBuf,
        current: LbConfig,
        balancer: Arc<dyn Balancer>,
        health: Arc<Mutex<Option<HealthCheck>>>,
    ) -> Self {
        Reloader { path, current: Mutex::new(current), balancer, health }
    }

    /// Re-reads the file and applies it. Returns a one-line summary.
    pub fn reload(&self) -> Result<String, ReloadError> {
        let new = LbConfig::load(&self.path)?;
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(what) = needs_restart(&current, &new) {
            return Err(ReloadError::NeedsRestart(what));
        }
        let dropped = self.balancer.reconfigure(&new)?;
        *self.health.lock().unwrap_or_else(PoisonError::into_inner) = new.health;
        let names: Vec<String> = new.engine.listeners.iter().map(listener_name).collect();
        let dropped = match dropped {
            Some(n) => format!("; {n} flows of removed listeners dropped"),
            None => String::new(),
        };
        let summary = format!(
            "reloaded {}: {} listeners ({}){dropped}\n",
            self.path.display(),
            new.engine.listeners.len(),
            names.join(", ")
        );
        *current = new;
        Ok(summary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::{ControlError, Snapshot};
    use crate::engine::ListenerKey;
    use crate::engine::config::{Backend, ObtainClientIp};
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A balancer that records reconfigurations and refuses when told.
    #[derive(Default)]
    struct Fake {
        applied: AtomicUsize,
        refuse: bool,
    }

    impl Balancer for Fake {
        fn snapshot(&self) -> Snapshot {
            Snapshot::default()
        }
        fn set_mode(&self, _: usize, _: ObtainClientIp) -> Result<(), ControlError> {
            Ok(())
        }
        fn add_backend(&self, _: usize, _: Backend) -> Result<(), ControlError> {
            Ok(())
        }
        fn remove_backend(&self, _: usize, _: SocketAddr) -> Result<(), ControlError> {
            Ok(())
        }
        fn drain(&self, _: usize, _: SocketAddr, _: bool) -> Result<(), ControlError> {
            Ok(())
        }
        fn set_backend_up(&self, _: ListenerKey, _: SocketAddr, _: bool) -> bool {
            false
        }
        fn reconfigure(&self, _: &LbConfig) -> Result<Option<usize>, ControlError> {
            if self.refuse {
                return Err(ControlError::Datapath("nft says no".into()));
            }
            self.applied.fetch_add(1, Ordering::Relaxed);
            Ok(Some(2))
        }
    }

    const FILE: &str = "client_interface = \"c\"\nbackend_interface = \"b\"\n[[listener]]\nvip = \"203.0.113.10:80\"\n[[listener.backend]]\naddress = \"100.125.2.1:80\"\n";

    fn setup(dir: &str, fake: Fake) -> (Reloader, PathBuf, Arc<Fake>) {
        let dir = std::env::temp_dir().join(format!("toa-reload-{dir}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("lb.toml");
        std::fs::write(&path, FILE).unwrap();
        let fake = Arc::new(fake);
        let config = LbConfig::load(&path).unwrap();
        let reloader = Reloader::new(path.clone(), config, fake.clone(), Arc::default());
        (reloader, path, fake)
    }

    #[test]
    fn good_file_applies_bad_file_and_restart_changes_do_not() {
        let (reloader, path, fake) = setup("a", Fake::default());
        let summary = reloader.reload().unwrap();
        assert!(summary.contains("1 listeners (203.0.113.10:80); 2 flows"), "{summary}");
        std::fs::write(&path, FILE.replace("vip = ", "vip = nope")).unwrap();
        let err = reloader.reload().unwrap_err().to_string();
        assert!(err.contains("line 4"), "{err}");
        std::fs::write(&path, FILE.replace("\"b\"", "\"b2\"")).unwrap();
        assert!(matches!(
            reloader.reload(),
            Err(ReloadError::NeedsRestart("client_interface or backend_interface"))
        ));
        std::fs::write(&path, format!("datapath = \"ring\"\n{FILE}")).unwrap();
        assert!(matches!(reloader.reload(), Err(ReloadError::NeedsRestart("datapath"))));
        assert_eq!(fake.applied.load(Ordering::Relaxed), 1, "only the good file reached the datapath");
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn a_refusing_datapath_keeps_the_running_configuration() {
        let (reloader, path, _) = setup("b", Fake { refuse: true, ..Fake::default() });
        let err = reloader.reload().unwrap_err().to_string();
        assert_eq!(err, "nft says no");
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }
}
