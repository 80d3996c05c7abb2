//! Running under systemd: readiness and status notifications (sd_notify), the watchdog
//! driven by the engine worker's heartbeat, socket activation, and journald logging with a
//! plain stderr fallback.

use std::os::unix::net::{UnixDatagram, UnixListener};
use std::time::Duration;

use crate::config::JournaldMode;

/// Sends one sd_notify message ("READY=1", "STATUS=...") to systemd; a no-op outside systemd.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(socket) = UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        // An abstract socket name (Linux).
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|addr| socket.send_to_addr(state.as_bytes(), &addr))
    } else {
        socket.send_to(state.as_bytes(), &path)
    };
    if let Err(e) = sent {
        log::debug!("sd_notify {state:?} failed: {e}");
    }
}

/// The watchdog interval systemd asked for (WatchdogSec), when this process is its target.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Some(pid) = std::env::var("WATCHDOG_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
    {
        if pid != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// The listening socket systemd passed (socket activation: LISTEN_PID/LISTEN_FDS, fd 3).
pub fn inherited_listener() -> Option<UnixListener> {
    let pid: u32 = std::env::var("LISTEN_PID").ok()?.parse().ok()?;
    let fds: u32 = std::env::var("LISTEN_FDS").ok()?.parse().ok()?;
    if pid != std::process::id() || fds < 1 {
        return None;
    }
    // So that a child process does not take the socket for itself.
    std::env::remove_var("LISTEN_PID");
    std::env::remove_var("LISTEN_FDS");
    std::env::remove_var("LISTEN_FDNAMES");
    use std::os::fd::FromRawFd;
    // SAFETY: systemd hands over fd 3 (SD_LISTEN_FDS_START) as an open listening socket that
    // nothing else in this process owns.
    Some(unsafe { UnixListener::from_raw_fd(3) })
}

/// Test-only fault injection: with `EMBERD_DEBUG_DENIED_SYSCALL` set, makes one system call
/// that the shipped unit's filter denies (`sched_setaffinity` to the CPUs already allowed: a
/// no-op where it is permitted) and logs what came of it, so the service tests can see that
/// a denied call fails with an error under the unit instead of killing emberd.
pub fn debug_call_denied_syscall() {
    if std::env::var_os("EMBERD_DEBUG_DENIED_SYSCALL").is_none() {
        return;
    }
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: a zeroed cpu_set_t is a valid empty set; both calls get its true size.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let outcome = if unsafe { libc::sched_getaffinity(0, size, &mut set) } != 0 {
        format!("sched_getaffinity: {}", std::io::Error::last_os_error())
    } else if unsafe { libc::sched_setaffinity(0, size, &set) } != 0 {
        format!("sched_setaffinity: {}", std::io::Error::last_os_error())
    } else {
        "sched_setaffinity: allowed".to_string()
    };
    log::warn!("EMBERD_DEBUG_DENIED_SYSCALL: {outcome}; still running");
}

/// Logs to journald (with structured fields) under systemd, else to stderr.
pub fn init_logging(mode: JournaldMode, level: log::LevelFilter) {
    let use_journal = match mode {
        JournaldMode::On => true,
        JournaldMode::Off => false,
        JournaldMode::Auto => systemd_journal_logger::connected_to_journal(),
    };
    log::set_max_level(level);
    if use_journal {
        match systemd_journal_logger::JournalLog::new() {
            Ok(journal) => {
                if journal
                    .with_syslog_identifier("emberd".into())
                    .install()
                    .is_ok()
                {
                    return;
                }
            }
            Err(e) => eprintln!("emberd: journald unavailable ({e}); logging to stderr"),
        }
    }
    let _ = log::set_boxed_logger(Box::new(StderrLogger));
}

/// Plain stderr lines, with the key-value fields appended.
pub struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level() && metadata.target().starts_with("emberd")
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        struct Fields(String);
        impl<'kvs> log::kv::VisitSource<'kvs> for Fields {
            fn visit_pair(
                &mut self,
                key: log::kv::Key<'kvs>,
                value: log::kv::Value<'kvs>,
            ) -> Result<(), log::kv::Error> {
                self.0.push_str(&format!(" {key}={value}"));
                Ok(())
            }
        }
        let mut fields = Fields(String::new());
        let _ = record.key_values().visit(&mut fields);
        eprintln!(
            "emberd: {}: {}{}",
            record.level().as_str().to_lowercase(),
            record.args(),
            fields.0
        );
    }

    fn flush(&self) {}
}
