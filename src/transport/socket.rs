//! Newline-delimited JSON over a Unix socket: one request per line in, one event per line
//! out. A connection may carry several requests at once (events carry their `id`);
//! closing it cancels its requests.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

use crate::generate::CancelToken;
use crate::protocol::{id_hint, parse_request, ErrorCode, Event, RequestPolicy};
use crate::scheduler::Scheduler;
use crate::shutdown::Shutdown;

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("another emberd is already listening on {0}")]
    InUse(PathBuf),
    #[error("socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Binds the socket the way pueue does: a path that still accepts connections belongs to a
/// running daemon (refuse); one that does not is a stale file from a crash (replace it).
pub fn bind(path: &Path, mode: u32) -> Result<UnixListener, SocketError> {
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
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io)?;
    Ok(listener)
}

pub struct Listener {
    pub listener: UnixListener,
    pub path: Option<PathBuf>,
    pub scheduler: Scheduler,
    pub policy: Arc<RequestPolicy>,
    pub max_request_bytes: usize,
    pub shutdown: Shutdown,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn generated_id() -> String {
    format!("req-{}", NEXT_ID.fetch_add(1, Ordering::Relaxed))
}

impl Listener {
    /// Accepts connections until shutdown, then waits for every connection to finish.
    pub async fn run(mut self) {
        let mut connections = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                _ = self.shutdown.wait() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let handler = Handler {
                            scheduler: self.scheduler.clone(),
                            policy: self.policy.clone(),
                            max_request_bytes: self.max_request_bytes,
                            shutdown: self.shutdown.clone(),
                        };
                        connections.spawn(handler.run(stream));
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

struct Handler {
    scheduler: Scheduler,
    policy: Arc<RequestPolicy>,
    max_request_bytes: usize,
    shutdown: Shutdown,
}

/// Requests of one connection that have not ended, by id, for cancels and disconnects.
type Pending = Arc<Mutex<HashMap<String, CancelToken>>>;

impl Handler {
    async fn run(self, stream: UnixStream) {
        let (mut reader, mut writer) = stream.into_split();
        let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Event>();
        let pending: Pending = Arc::default();

        // The writer ends when every sender is gone: the reader and each request's forwarder.
        let writer_task = tokio::spawn(async move {
            while let Some(event) = out_rx.recv().await {
                let mut line = event.to_json();
                line.push('\n');
                if writer.write_all(line.as_bytes()).await.is_err() {
                    return false;
                }
            }
            true
        });

        let mut buf = Vec::with_capacity(4096);
        let mut chunk = vec![0u8; 8192];
        // True while skipping the rest of a line that was already too long.
        let mut discarding = false;
        let mut shutdown = self.shutdown.clone();
        loop {
            let n = tokio::select! {
                read = reader.read(&mut chunk) => match read {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                },
                // A connection stays open during shutdown so its requests can end, but takes
                // no new ones; the reader stops here.
                _ = shutdown.wait() => break,
            };
            let mut rest = &chunk[..n];
            while !rest.is_empty() {
                match rest.iter().position(|&b| b == b'\n') {
                    Some(at) => {
                        if !discarding {
                            buf.extend_from_slice(&rest[..at]);
                            let line = std::mem::take(&mut buf);
                            self.handle_line(&line, &out_tx, &pending);
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
                if !discarding && buf.len() > self.max_request_bytes {
                    buf.clear();
                    discarding = true;
                    let _ = out_tx.send(Event::error(
                        "",
                        ErrorCode::TooLong,
                        format!(
                            "request line exceeds max_request_bytes = {}",
                            self.max_request_bytes
                        ),
                    ));
                }
            }
        }
        // A closed connection, or shutdown: cancel what is still running for this client
        // (on shutdown the scheduler's drain does that after the grace period instead).
        if !self.shutdown.is_triggered() {
            for token in pending.lock().expect("pending lock").values() {
                token.cancel();
            }
        }
        drop(out_tx);
        let _ = writer_task.await;
    }

    fn handle_line(&self, line: &[u8], out: &mpsc::UnboundedSender<Event>, pending: &Pending) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(|b| b.is_ascii_whitespace()) {
            return;
        }
        if line.len() > self.max_request_bytes {
            let _ = out.send(Event::error(
                "",
                ErrorCode::TooLong,
                format!(
                    "request of {} bytes exceeds max_request_bytes = {}",
                    line.len(),
                    self.max_request_bytes
                ),
            ));
            return;
        }
        let accepted_at = Instant::now();
        let request = match parse_request(line) {
            Ok(r) => r,
            Err(e) => {
                let _ = out.send(Event::error(id_hint(line), e.code(), e.to_string()));
                return;
            }
        };
        if request.is_cancel() {
            match request
                .id
                .as_deref()
                .and_then(|id| pending.lock().expect("pending lock").get(id).cloned())
            {
                Some(token) => token.cancel(),
                None => {
                    let id = request.id.unwrap_or_default();
                    let _ = out.send(Event::error(
                        id.clone(),
                        ErrorCode::BadRequest,
                        format!("no running request with id {id:?} on this connection"),
                    ));
                }
            }
            return;
        }
        let raw_id = request.id.clone();
        let valid = match request.validate(&self.policy, generated_id) {
            Ok(v) => v,
            Err(e) => {
                let _ = out.send(Event::error(
                    raw_id.unwrap_or_default(),
                    e.code(),
                    e.to_string(),
                ));
                return;
            }
        };
        if pending
            .lock()
            .expect("pending lock")
            .contains_key(&valid.id)
        {
            let _ = out.send(Event::error(
                valid.id.clone(),
                ErrorCode::BadRequest,
                format!(
                    "a request with id {:?} is still running on this connection",
                    valid.id
                ),
            ));
            return;
        }
        match self.scheduler.submit(valid, accepted_at, "socket") {
            Err(event) => {
                let _ = out.send(*event);
            }
            Ok(mut submission) => {
                pending
                    .lock()
                    .expect("pending lock")
                    .insert(submission.id.clone(), submission.cancel.clone());
                let out = out.clone();
                let pending = pending.clone();
                tokio::spawn(async move {
                    while let Some(event) = submission.events.recv().await {
                        let terminal = event.is_terminal();
                        if terminal {
                            pending.lock().expect("pending lock").remove(&submission.id);
                        }
                        if out.send(event).is_err() {
                            // The connection is gone; stop the work.
                            submission.cancel.cancel();
                        }
                        if terminal {
                            break;
                        }
                    }
                });
            }
        }
    }
}
