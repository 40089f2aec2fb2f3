//! Running a [`Server`](crate::Server) as a long-lived service, as the `eventserver` binary
//! does: small thread stacks, the open-files limit, stop signals, and systemd's notify
//! protocol, watchdog and socket activation. An embedder that runs the server as its own
//! daemon calls the same functions.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{RecvTimeoutError, Sender};

use crate::log;

/// Restarts this process with `RUST_MIN_STACK=65536` and `MALLOC_ARENA_MAX=2`, unless
/// `RUST_MIN_STACK` is set already; call it first thing in `main`, before any thread.
/// Returns only if the restart failed (logged) or was not needed.
///
/// tiny_http runs every connection on a thread of its own, spawned with the default stack,
/// which is reserved in virtual memory: 2 MiB by default, so 10,000 parked long-polls would
/// reserve 20 GB. The server's own threads set their stacks, so this default is only
/// tiny_http's, and 64 KiB is plenty for it: the test
/// `abuse::two_thousand_idle_connections_reserve_well_under_a_gigabyte` measures the
/// binary's virtual memory with 2,000 idle connections and holds it under 1 GiB. Rust reads
/// `RUST_MIN_STACK` once, at the first thread spawn, and glibc reads `MALLOC_ARENA_MAX` at
/// its first allocation: neither can be changed later from inside, so the process restarts
/// itself with them.
pub fn use_small_thread_stacks() {
    use std::os::unix::process::CommandExt;
    if std::env::var_os("RUST_MIN_STACK").is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut command = std::process::Command::new(exe);
    command
        .args(std::env::args_os().skip(1))
        .env("RUST_MIN_STACK", "65536");
    // glibc gives each busy thread its own 64 MiB arena (16 on 2 cores): with a thread per
    // connection that is a gigabyte of address space for nothing.
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        command.env("MALLOC_ARENA_MAX", "2");
    }
    let error = command.exec();
    log::warn(&format!(
        "could not restart with small thread stacks: {error}"
    ));
}

/// Raises the soft open-files limit to the hard one, so parked long-polls are bounded by
/// [`Config::max_parked`](crate::Config::max_parked) rather than by a low default; call it
/// before [`Config::new`](crate::Config::new), whose defaults follow the limit.
pub fn raise_open_files_limit() {
    crate::sys::raise_open_files_limit();
}

/// The listening socket systemd passed by socket activation (`LISTEN_PID`/`LISTEN_FDS`),
/// if it passed one to this process; serve on it with
/// [`Server::start_on`](crate::Server::start_on).
pub fn systemd_listener() -> io::Result<Option<TcpListener>> {
    crate::sys::systemd_listener()
}

/// Tells systemd (under `Type=notify`) that the server at `addr` is ready, and starts the
/// watchdog if systemd asked for one; does nothing when systemd does not supervise us.
/// The watchdog pings until the returned [`Watchdog`] is dropped.
pub fn ready(addr: SocketAddr) -> Watchdog {
    crate::sys::notify(&format!("READY=1\nSTATUS=serving on {addr}"));
    Watchdog(crate::sys::watchdog_interval().and_then(|interval| start_watchdog(addr, interval)))
}

/// The watchdog's thread, stopped and joined when this is dropped (before shutdown, whose
/// failing health checks would otherwise be logged as such).
pub struct Watchdog(Option<(Sender<()>, JoinHandle<()>)>);

impl Drop for Watchdog {
    fn drop(&mut self) {
        if let Some((stop, thread)) = self.0.take() {
            drop(stop);
            if thread.join().is_err() {
                log::error("the watchdog thread panicked");
            }
        }
    }
}

/// Tells systemd that the server is shutting down.
pub fn stopping() {
    crate::sys::notify("STOPPING=1\nSTATUS=shutting down");
}

/// The signals that stop a service (SIGTERM, SIGINT), caught instead of killing it.
pub struct StopSignals(signal_hook::iterator::Signals);

impl StopSignals {
    /// Catches the stop signals from now on, and ignores SIGXFSZ: past `RLIMIT_FSIZE` a
    /// write should fail (and answer 500), not kill the process.
    pub fn install() -> io::Result<StopSignals> {
        use signal_hook::consts::{SIGINT, SIGTERM, SIGXFSZ};
        let xfsz = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        signal_hook::flag::register(SIGXFSZ, xfsz)?;
        Ok(StopSignals(signal_hook::iterator::Signals::new([
            SIGTERM, SIGINT,
        ])?))
    }

    /// Waits for a stop signal and returns its number.
    pub fn wait(mut self) -> Option<i32> {
        self.0.forever().next()
    }
}

/// Pings systemd's watchdog while the server answers its own health check: a dead accept
/// loop, stuck workers or an unwritable database all stop the pings and systemd restarts
/// the service.
fn start_watchdog(addr: SocketAddr, interval: Duration) -> Option<(Sender<()>, JoinHandle<()>)> {
    let target = crate::http::reachable(addr);
    // Three checks per interval, so one slow check does not miss a ping.
    let period = interval / 3;
    let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
    let spawned = std::thread::Builder::new()
        .name("watchdog".into())
        .stack_size(256 << 10)
        .spawn(move || {
            loop {
                if healthy(target, period) {
                    crate::sys::notify("WATCHDOG=1");
                } else {
                    log::warn("the health self-check failed; not pinging the watchdog");
                }
                if stopped.recv_timeout(period) != Err(RecvTimeoutError::Timeout) {
                    return;
                }
            }
        });
    match spawned {
        Ok(thread) => Some((stop, thread)),
        Err(e) => {
            log::error(&format!("cannot start the watchdog thread: {e}"));
            None
        }
    }
}

/// `GET /healthz` on our own address answers 200 within `timeout`. Over the network on
/// purpose: the check passes only if the accept loop, a worker and a database write all
/// work.
fn healthy(addr: SocketAddr, timeout: Duration) -> bool {
    crate::http::ask_self(addr, "/healthz", timeout).is_ok_and(|head| head == *b"HTTP/1.1 200")
}
