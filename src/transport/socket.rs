//! Newline-delimited JSON over a Unix socket: one request per line in, one event per line
//! out. A connection may carry several requests at once (events carry their `id`);
//! closing it cancels its requests.

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, Notify};

use crate::ingress::{Ingress, Intent, Origin, Reply, Scope};
use crate::protocol::{ErrorCode, Event};
use crate::shutdown::Shutdown;

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("another emberd is already listening on {0}")]
    InUse(PathBuf),
    #[error("socket.group: {0:?} is not a group on this system")]
    UnknownGroup(String),
    #[error("socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Binds the socket the way pueue does: a path that still accepts connections belongs to a
/// running daemon (refuse); one that does not is a stale file from a crash (replace it).
/// `group` (a name or a number), when given, becomes the socket file's group, so that its
/// members may connect under a mode like 0660.
pub fn bind(path: &Path, mode: u32, group: Option<&str>) -> Result<UnixListener, SocketError> {
    let io = |source| SocketError::Io {
        path: path.to_path_buf(),
        source,
    };
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(SocketError::InUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(io)?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    if let Some(group) = group {
        let gid = group_id(group).ok_or_else(|| SocketError::UnknownGroup(group.into()))?;
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(io)?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io)?;
    Ok(listener)
}

/// The id of group `name` (or `name` itself, when it is a number), from the system's
/// group database.
fn group_id(name: &str) -> Option<u32> {
    if let Ok(gid) = name.parse() {
        return Some(gid);
    }
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: a C struct of integers and pointers, for which all zeros is a valid value.
    let mut group: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; `found` points into `group` on success.
    let rc = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            &mut group,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    (rc == 0 && !found.is_null()).then_some(group.gr_gid)
}

pub struct Listener {
    pub listener: UnixListener,
    pub path: Option<PathBuf>,
    /// Connections served at once (`socket.max_connections`).
    pub max_connections: usize,
    /// Bytes of events a connection may leave unread before it is cut off
    /// (`socket.max_unread_bytes`).
    pub max_unread_bytes: usize,
    pub ingress: Ingress,
    pub shutdown: Shutdown,
}

impl Listener {
    /// Accepts connections until shutdown, then waits for every connection to finish.
    pub async fn run(mut self) {
        let mut connections = tokio::task::JoinSet::new();
        let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(self.max_connections));
        let held = self.ingress.metrics().socket_connections();
        loop {
            held.set(connections.len() as i64);
            tokio::select! {
                _ = self.shutdown.wait() => break,
                // A finished connection's task stays in the set until joined: reap it, or the
                // set grows by one task per connection ever made (the soak's memory drift).
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        // Who connected, as the kernel says (SO_PEERCRED); the socket's mode
                        // and group decide who may.
                        match stream.peer_cred() {
                            Ok(peer) => log::info!(
                                "socket: connection from uid {} gid {} pid {}",
                                peer.uid(),
                                peer.gid(),
                                peer.pid().map_or_else(|| "unknown".into(), |p| p.to_string())
                            ),
                            Err(e) => log::debug!("socket: the peer's credentials are unknown: {e}"),
                        }
                        let Ok(permit) = slots.clone().try_acquire_owned() else {
                            log::warn!(
                                "socket: refusing a connection: {} are open (socket.max_connections)",
                                self.max_connections
                            );
                            connections.spawn(refuse(stream, self.max_connections));
                            continue;
                        };
                        let handler = Handler {
                            ingress: self.ingress.clone(),
                            shutdown: self.shutdown.clone(),
                            max_unread_bytes: self.max_unread_bytes,
                        };
                        connections.spawn(async move {
                            handler.run(stream).await;
                            drop(permit);
                        });
                    }
                    Err(e) => {
                        log::warn!("socket accept failed: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                },
            }
        }
        drop(self.listener);
        if let Some(path) = &self.path {
            let _ = std::fs::remove_file(path);
        }
        while connections.join_next().await.is_some() {}
    }
}

/// Tells a connection over the cap why it is closed: one `busy` error event.
async fn refuse(mut stream: UnixStream, max_connections: usize) {
    let event = Event::error(
        String::new(),
        ErrorCode::Busy,
        format!("too many connections: {max_connections} are open (socket.max_connections); try again later"),
    );
    let mut line = event.to_json();
    line.push('\n');
    let _ = stream.write_all(line.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// A connection's outgoing events, serialized as they are delivered, with the bytes not yet
/// written counted. A client that stops reading must not grow the daemon's memory: past the
/// limit the connection is cut off (its requests cancelled, the connection closed).
#[derive(Clone)]
struct Outbox {
    lines: mpsc::UnboundedSender<String>,
    unread: Arc<AtomicUsize>,
    limit: usize,
    cut_off: Arc<AtomicBool>,
    /// Wakes the connection's reader to close it.
    cut: Arc<Notify>,
}

impl Outbox {
    fn push(&self, event: Event) -> bool {
        if self.cut_off.load(Ordering::Relaxed) {
            return false;
        }
        let mut line = event.to_json();
        line.push('\n');
        let unread = self.unread.fetch_add(line.len(), Ordering::Relaxed) + line.len();
        if unread > self.limit {
            if !self.cut_off.swap(true, Ordering::Relaxed) {
                log::warn!(
                    "socket: cutting off a client that left {unread} bytes of events unread \
                     (socket.max_unread_bytes = {}); its requests are cancelled",
                    self.limit
                );
                self.cut.notify_one();
            }
            return false;
        }
        self.lines.send(line).is_ok()
    }
}

impl Reply for Outbox {
    fn deliver(&self, event: Event) -> impl Future<Output = bool> + Send + 'static {
        std::future::ready(self.push(event))
    }

    fn closed(&self) -> impl Future<Output = ()> + Send + '_ {
        self.lines.closed()
    }
}

/// How often a connection read on during shutdown checks whether its requests have ended.
const DRAIN_POLL: Duration = Duration::from_millis(50);

struct Handler {
    ingress: Ingress,
    shutdown: Shutdown,
    max_unread_bytes: usize,
}

impl Handler {
    async fn run(self, stream: UnixStream) {
        let (mut reader, mut writer) = stream.into_split();
        let (lines_tx, mut lines_rx) = mpsc::unbounded_channel::<String>();
        let out = Outbox {
            lines: lines_tx,
            unread: Arc::new(AtomicUsize::new(0)),
            limit: self.max_unread_bytes,
            cut_off: Arc::new(AtomicBool::new(false)),
            cut: Arc::new(Notify::new()),
        };
        // The connection's requests that have not ended, for cancels and the disconnect.
        let scope = Scope::default();
        let max_request_bytes = self.ingress.max_request_bytes();

        // The writer ends when every sender is gone: the reader and each request's forwarder.
        let unread = out.unread.clone();
        let writer_task = tokio::spawn(async move {
            while let Some(line) = lines_rx.recv().await {
                if writer.write_all(line.as_bytes()).await.is_err() {
                    return;
                }
                unread.fetch_sub(line.len(), Ordering::Relaxed);
            }
        });

        let mut buf = Vec::with_capacity(4096);
        let mut chunk = vec![0u8; 8192];
        // True while skipping the rest of a line that was already too long.
        let mut discarding = false;
        let mut shutdown = self.shutdown.clone();
        // A connection stays open during shutdown while its requests run, and is read on:
        // a request sent then is answered `shutting_down` instead of going unread.
        let mut draining = false;
        loop {
            if draining && scope.is_empty() {
                break;
            }
            let n = tokio::select! {
                read = reader.read(&mut chunk) => match read {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                },
                _ = shutdown.wait(), if !draining => {
                    draining = true;
                    continue;
                }
                _ = tokio::time::sleep(DRAIN_POLL), if draining => continue,
                _ = out.cut.notified() => break,
            };
            let mut rest = &chunk[..n];
            while !rest.is_empty() {
                match rest.iter().position(|&b| b == b'\n') {
                    Some(at) => {
                        if !discarding {
                            buf.extend_from_slice(&rest[..at]);
                            let line = std::mem::take(&mut buf);
                            self.handle_line(&line, &out, &scope);
                        }
                        discarding = false;
                        rest = &rest[at + 1..];
                    }
                    None => {
                        if !discarding {
                            buf.extend_from_slice(rest);
                        }
                        rest = &[];
                    }
                }
                // Cap the line before it grows without bound.
                if !discarding && buf.len() > max_request_bytes {
                    buf.clear();
                    discarding = true;
                    out.push(Event::error(
                        "",
                        ErrorCode::TooLong,
                        format!("request line exceeds max_request_bytes = {max_request_bytes}"),
                    ));
                }
            }
        }
        // A closed connection, or shutdown: cancel what is still running for this client
        // (on shutdown the scheduler's drain does that after the grace period instead).
        let cut_off = out.cut_off.load(Ordering::Relaxed);
        if cut_off || !self.shutdown.is_triggered() {
            scope.cancel_all();
        }
        drop(out);
        // A client cut off is not read from again: its writer would wait on it for ever.
        if cut_off {
            writer_task.abort();
        }
        let _ = writer_task.await;
    }

    fn handle_line(&self, line: &[u8], out: &Outbox, scope: &Scope) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(|b| b.is_ascii_whitespace()) {
            return;
        }
        // Every reply of this connection goes to its writer, whatever the request says.
        let origin = Origin {
            transport: "socket",
            scope,
            intent: Intent::Any,
        };
        self.ingress.handle(line, origin, |_| out.clone());
    }
}
