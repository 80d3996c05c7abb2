//! systemd integration without systemd as PID 1: sd_notify over a real NOTIFY_SOCKET, the
//! watchdog pings, socket activation through systemd-socket-activate, and the unit files
//! checked by systemd-analyze.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::daemon::{libc_kill, write_serve_config};
use common::*;

fn ask(socket: &Path) -> serde_json::Value {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    writeln!(stream, r#"{{"id":"s","prompt":"hi","max_tokens":3}}"#).unwrap();
    let mut last = serde_json::Value::Null;
    for line in BufReader::new(stream).lines() {
        last = serde_json::from_str(&line.unwrap()).unwrap();
        if last["type"] != "token" {
            break;
        }
    }
    last
}

#[test]
fn readiness_watchdog_and_stopping_are_notified_to_systemd() {
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let config = write_serve_config(dir.path(), "");
    let socket = dir.path().join("emberd.sock");
    let mut child = emberd_command()
        .args(["serve", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "1000000")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 4096];
    let mut next = || {
        let n = notify.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let mut messages = vec![next()];
    while !messages.last().unwrap().contains("READY=1") {
        messages.push(next());
    }
    assert!(messages[0].contains("STATUS=loading"), "{messages:?}");
    // Ready means the socket accepts and answers.
    assert_eq!(ask(&socket)["type"], "done");
    // The idle engine worker keeps the watchdog fed.
    let mut pings = 0;
    while pings < 2 {
        if next().contains("WATCHDOG=1") {
            pings += 1;
        }
    }
    unsafe { libc_kill(child.id() as i32, 15) };
    loop {
        if next().contains("STOPPING=1") {
            break;
        }
    }
    assert!(child.wait().unwrap().success());
}

#[test]
fn socket_activation_starts_emberd_on_the_first_connection() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_serve_config(dir.path(), "");
    let socket = dir.path().join("emberd.sock");
    let mut activator = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&socket)
        .args(emberd_argv())
        .args(["serve", "--config"])
        .arg(&config)
        .stderr(Stdio::piped())
        .spawn()
        .expect("systemd-socket-activate (Debian package systemd) must be installed");
    let stderr = activator.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    // The activator says when it listens; emberd itself is not running yet.
    loop {
        let line = lines.next().expect("activator output").unwrap();
        if line.contains("Listening on") {
            break;
        }
    }
    // The first connection starts emberd, which serves it on the inherited socket.
    assert_eq!(ask(&socket)["type"], "done");
    let ready = lines
        .find(|l| l.as_ref().is_ok_and(|l| l.contains("ready: model")))
        .is_some();
    assert!(ready, "emberd reported ready");
    unsafe { libc_kill(activator.id() as i32, 15) };
    let status = activator.wait().unwrap();
    assert!(status.success(), "{status:?}");
    // systemd owns an inherited socket file: emberd leaves it alone.
    assert!(socket.exists());
}

#[test]
fn the_units_pass_systemd_analyze_verify_without_warnings() {
    let dir = tempfile::tempdir().unwrap();
    // verify checks that ExecStart exists: point it at the built binary.
    let service = std::fs::read_to_string(repo().join("systemd/emberd.service"))
        .unwrap()
        .replace("/usr/bin/emberd", env!("CARGO_BIN_EXE_emberd"));
    std::fs::write(dir.path().join("emberd.service"), service).unwrap();
    std::fs::copy(
        repo().join("systemd/emberd.socket"),
        dir.path().join("emberd.socket"),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("emberd.socket"))
        .arg(dir.path().join("emberd.service"))
        .output()
        .expect("systemd-analyze must be installed");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // It exits 0 on warnings, so any output fails.
    assert!(
        out.status.success() && text.trim().is_empty(),
        "systemd-analyze verify:\n{text}"
    );

    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(dir.path().join("emberd.service"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let overall = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_default()
        .to_string();
    eprintln!("{overall}");
    let exposure: f64 = overall
        .split_whitespace()
        .find_map(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no exposure figure in:\n{text}"));
    // 1.4 with SystemCallErrorNumber=EPERM as with SIGSYS: the filter itself is the same.
    assert!(exposure <= 1.4, "exposure {exposure} > 1.4:\n{text}");
}
