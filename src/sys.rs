//! The few operating-system interfaces the server uses directly: the open-files limit,
//! systemd's notification socket and socket activation.

use std::io;
use std::net::TcpListener;
use std::os::unix::net::UnixDatagram;

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// The process's current (soft) open-files limit, if it is finite.
pub fn open_files_limit() -> Option<u64> {
    getrlimit(Resource::Nofile).current
}

/// Raises the soft open-files limit to the hard limit, so parked long-polls are bounded by
/// our own cap rather than by a low default. Returns the limit now in force.
pub fn raise_open_files_limit() -> Option<u64> {
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            crate::log::warn(&format!("could not raise the open-files limit: {e}"));
        }
    }
    open_files_limit()
}

/// Sends a state line (`READY=1`, `STATUS=…`, `STOPPING=1`, `WATCHDOG=1`) to systemd when
/// it supervises us (`NOTIFY_SOCKET` is set); does nothing otherwise.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = UnixDatagram::unbound().and_then(|sock| {
        let path = path.to_string_lossy();
        match path.strip_prefix('@') {
            // A leading '@' names a socket in the abstract namespace.
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
                sock.send_to_addr(state.as_bytes(), &addr)
            }
            None => sock.send_to(state.as_bytes(), &*path),
        }
    });
    if let Err(e) = sent {
        crate::log::warn(&format!("could not notify systemd ({state}): {e}"));
    }
}

/// The watchdog interval systemd asked for (`WATCHDOG_USEC`), if it addressed us.
pub fn watchdog_interval() -> Option<std::time::Duration> {
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| std::time::Duration::from_micros(usec))
}

/// The listening socket systemd passed us (`LISTEN_PID`/`LISTEN_FDS`), if any.
pub fn systemd_listener() -> io::Result<Option<TcpListener>> {
    let for_us = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let count: usize = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    if !for_us || count == 0 {
        return Ok(None);
    }
    if count > 1 {
        crate::log::warn("systemd passed several sockets; serving on the first only");
    }
    Ok(Some(adopt_fd3()?))
}

/// Descriptor 3 (SD_LISTEN_FDS_START) as a TCP listener.
#[allow(unsafe_code)]
fn adopt_fd3() -> io::Result<TcpListener> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: by the socket-activation protocol, descriptor 3 is an open socket that
    // systemd passed to the process named by LISTEN_PID, which the caller checked is this
    // one; nothing else in this process owns or closes it, so taking ownership is sound.
    let fd = unsafe { OwnedFd::from_raw_fd(3) };
    let socket = socket2::Socket::from(fd);
    if socket.r#type()? != socket2::Type::STREAM {
        return Err(io::Error::other(
            "the socket systemd passed is not a stream socket",
        ));
    }
    socket.set_cloexec(true)?;
    Ok(socket.into())
}
