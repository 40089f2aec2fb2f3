//! The few operating-system interfaces the server uses directly: the open-files limit,
//! systemd's notification socket and socket activation, and the `/proc` files the HTTP
//! layer reads to watch tiny_http from outside (what a descriptor is, how many are open,
//! which connections the client has closed).
//!
//! Each `/proc` format is parsed from text by a function of its own, unit-tested below on
//! well-formed and malformed input; without a /proc the readers answer `None` or nothing.

use std::collections::HashSet;
use std::io::{self, BufRead};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::os::fd::RawFd;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;

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

/// What `/proc/self/fd` says descriptor `fd` is (`socket:[inode]` for a socket), if there is
/// a /proc and the descriptor is open.
pub(crate) fn fd_link(fd: RawFd) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()
}

/// Descriptors this process has open, if /proc tells.
pub(crate) fn open_fds() -> Option<usize> {
    std::fs::read_dir("/proc/self/fd").ok().map(Iterator::count)
}

/// Peers of this process's connections on local `port` that the client has closed while we
/// still hold them (`CLOSE_WAIT`), from the kernel's socket tables; an empty set without
/// /proc.
pub(crate) fn closed_by_peer(port: u16) -> HashSet<SocketAddr> {
    let mut peers = HashSet::new();
    for table in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
        // Line by line: the table has a line per socket, megabytes at 10,000 connections.
        if let Ok(file) = std::fs::File::open(table) {
            peers.extend(close_wait_peers(io::BufReader::new(file), port));
        }
    }
    peers
}

/// The peers of the `CLOSE_WAIT` rows on local `port` in one `/proc/net/tcp{,6}` table
/// (a heading line, then a row per socket). Rows that do not parse are skipped; reading
/// stops at the first line that cannot be read.
fn close_wait_peers(table: impl BufRead, port: u16) -> Vec<SocketAddr> {
    table
        .lines()
        .skip(1)
        .map_while(Result::ok)
        .filter_map(|row| close_wait_peer(&row, port))
        .collect()
}

/// The peer of one `/proc/net/tcp{,6}` row (`sl local_address rem_address st …`), if the
/// socket is on local `port` and in `CLOSE_WAIT` (state `08`).
fn close_wait_peer(row: &str, port: u16) -> Option<SocketAddr> {
    const CLOSE_WAIT: &str = "08";
    let mut fields = row.split_whitespace().skip(1);
    let (Some(local), Some(remote), Some(CLOSE_WAIT)) =
        (fields.next(), fields.next(), fields.next())
    else {
        return None;
    };
    if proc_net_addr(local).is_some_and(|a| a.port() == port) {
        proc_net_addr(remote)
    } else {
        None
    }
}

/// An address as `/proc/net/tcp{,6}` write it: the IP as 32-bit words in host byte order,
/// then `:` and the port, all in hex (`0100007F:1F90` is 127.0.0.1:8080 here).
fn proc_net_addr(field: &str) -> Option<SocketAddr> {
    let (ip, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    if ip.len() != 8 && ip.len() != 32 {
        return None;
    }
    let mut bytes = Vec::with_capacity(16);
    for word in ip.as_bytes().chunks(8) {
        let word = u32::from_str_radix(std::str::from_utf8(word).ok()?, 16).ok()?;
        bytes.extend_from_slice(&word.to_ne_bytes());
    }
    let ip = match <[u8; 4]>::try_from(bytes.as_slice()) {
        Ok(v4) => IpAddr::from(v4),
        Err(_) => IpAddr::from(<[u8; 16]>::try_from(bytes.as_slice()).ok()?),
    };
    Some(SocketAddr::new(ip, port))
}

/// A descriptor of our own for the connection accepted on local `port` from `peer`, found
/// through the kernel's socket tables, while the caller holds that connection open
/// (tiny_http owns its descriptors and hands out none). `None` without a /proc, or if it
/// is gone. It costs a pass over the socket tables and the process's descriptors, so its
/// time grows with the number of open connections.
pub(crate) fn connection_socket(port: u16, peer: SocketAddr) -> Option<socket2::Socket> {
    let links: HashSet<PathBuf> = ["/proc/self/net/tcp", "/proc/self/net/tcp6"]
        .into_iter()
        .filter_map(|table| std::fs::File::open(table).ok())
        .flat_map(|file| connection_inodes(io::BufReader::new(file), port, peer))
        .map(|inode| PathBuf::from(format!("socket:[{inode}]")))
        .collect();
    // tiny_http holds two descriptors of a connection and may be closing one right now: any
    // of them that is still the connection will do.
    std::fs::read_dir("/proc/self/fd")
        .ok()?
        .filter_map(Result::ok)
        .filter(|entry| std::fs::read_link(entry.path()).is_ok_and(|l| links.contains(&l)))
        .filter_map(|entry| entry.file_name().to_str()?.parse::<RawFd>().ok())
        .filter_map(duplicate)
        .map(socket2::Socket::from)
        .find(|socket| {
            // A descriptor number can be reused between the lookup and the duplicate: the
            // copy is trusted only if it is the connection asked for.
            let addr = |a: io::Result<socket2::SockAddr>| a.ok().and_then(|a| a.as_socket());
            let local = addr(socket.local_addr()).map(|a| a.port());
            let remote = addr(socket.peer_addr()).map(canonical);
            local == Some(port) && remote == Some(canonical(peer))
        })
}

/// A duplicate of descriptor `fd`, which the process holds open.
#[allow(unsafe_code)]
fn duplicate(fd: RawFd) -> Option<std::os::fd::OwnedFd> {
    // SAFETY: `fd` was just listed in /proc/self/fd as a socket of a connection that the
    // caller holds open. The borrow lives for the one `dup` below and nothing else is done
    // with it: if another thread closed that number meanwhile, `dup` fails, and if the
    // number was reused, the copy is of another descriptor, which the caller's check of
    // its peer address rejects and closes. No descriptor but our own copy is ever closed.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    borrowed.try_clone_to_owned().ok()
}

/// The socket inodes of the connections on local `port` from `peer` in one
/// `/proc/net/tcp{,6}` table (`sl local rem st tx:rx tr:when retrnsmt uid timeout inode`):
/// one, unless a closed one lingers.
fn connection_inodes(table: impl BufRead, port: u16, peer: SocketAddr) -> Vec<u64> {
    let inode = |row: &str| {
        let fields: Vec<&str> = row.split_whitespace().collect();
        let local = proc_net_addr(fields.get(1)?)?;
        let remote = proc_net_addr(fields.get(2)?)?;
        if local.port() != port || canonical(remote) != canonical(peer) {
            return None;
        }
        fields.get(9)?.parse().ok().filter(|inode| *inode != 0)
    };
    table
        .lines()
        .skip(1)
        .map_while(Result::ok)
        .filter_map(|row| inode(&row))
        .collect()
}

/// `addr` with an IPv4-mapped IPv6 address written as IPv4, as a dual-stack listener's
/// table writes an IPv4 client.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::time::{Duration, Instant};

    /// 127.0.0.1 as `/proc/net/tcp` writes it.
    fn localhost() -> String {
        format!("{:08X}", u32::from_ne_bytes([127, 0, 0, 1]))
    }

    /// A `/proc/net/tcp` row from local `:port` to `127.0.0.1:peer_port` in state `st`.
    fn row(port: u16, peer_port: u16, st: &str) -> String {
        let ip = localhost();
        format!(
            "   0: {ip}:{port:04X} {ip}:{peer_port:04X} {st} 00000000:00000000 00:00000000 \
             00000000     0        0 12345 1 0000000000000000 20 4 30 10 -1"
        )
    }

    #[test]
    fn proc_net_addresses_parse_in_host_order() {
        let v4 = u32::from_ne_bytes([127, 0, 0, 1]);
        let field = format!("{v4:08X}:1F90");
        assert_eq!(
            proc_net_addr(&field),
            Some("127.0.0.1:8080".parse().unwrap())
        );
        let one = u32::from_ne_bytes([0, 0, 0, 1]);
        let field = format!("000000000000000000000000{one:08X}:0050");
        assert_eq!(proc_net_addr(&field), Some("[::1]:80".parse().unwrap()));
        for bad in [
            "",
            "0100007F",
            "0100007F:",
            "XYZ:1F90",
            "0100:1F90",
            "0100007F:1F90:1",
        ] {
            assert_eq!(proc_net_addr(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_row_names_its_peer_only_in_close_wait_on_our_port() {
        let peer: SocketAddr = "127.0.0.1:50000".parse().unwrap();
        assert_eq!(close_wait_peer(&row(8080, 50000, "08"), 8080), Some(peer));
        // Established (01) and listening (0A) sockets, and other ports, are not hang-ups.
        assert_eq!(close_wait_peer(&row(8080, 50000, "01"), 8080), None);
        assert_eq!(close_wait_peer(&row(8080, 0, "0A"), 8080), None);
        assert_eq!(close_wait_peer(&row(8081, 50000, "08"), 8080), None);
        let ip = localhost();
        for bad in [
            String::new(),
            "   0:".to_owned(),
            format!("   0: {ip}:1F90"),
            format!("   0: {ip}:1F90 {ip}:C350"),
            format!("   0: {ip}:1F90 garbage 08"),
            format!("   0: garbage {ip}:C350 08"),
            format!("{ip}:1F90 {ip}:C350 08"),
        ] {
            assert_eq!(close_wait_peer(&bad, 8080), None, "{bad:?}");
        }
    }

    #[test]
    fn a_table_yields_the_peers_of_its_close_wait_rows() {
        let heading = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when";
        let table = [
            heading.to_owned(),
            row(8080, 50000, "08"),
            "not a row".to_owned(),
            row(8080, 50001, "01"),
            row(8080, 50002, "08"),
        ]
        .join("\n");
        let peers = close_wait_peers(table.as_bytes(), 8080);
        let expected: Vec<SocketAddr> = ["127.0.0.1:50000", "127.0.0.1:50002"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(peers, expected);
        // The first line is the heading, whatever it holds.
        assert!(close_wait_peers(row(8080, 50000, "08").as_bytes(), 8080).is_empty());
        // Reading stops at a line that is not text.
        let mut broken = format!("{heading}\n{}\n", row(8080, 50000, "08")).into_bytes();
        broken.extend_from_slice(b"\xff\xfe\n");
        broken.extend_from_slice(row(8080, 50002, "08").as_bytes());
        assert_eq!(close_wait_peers(broken.as_slice(), 8080), expected[..1]);
        assert!(close_wait_peers(&b""[..], 8080).is_empty());
    }

    #[test]
    fn a_client_that_hangs_up_is_found_in_close_wait() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let client_addr = client.local_addr().unwrap();
        let (_held, _) = listener.accept().unwrap();
        assert!(!closed_by_peer(port).contains(&client_addr), "still open");
        drop(client);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !closed_by_peer(port).contains(&client_addr) {
            assert!(Instant::now() < deadline, "the hang-up was not seen");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn descriptors_are_read_from_proc() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let link = fd_link(listener.as_raw_fd()).expect("the listener's descriptor");
        assert!(link.to_string_lossy().starts_with("socket:["), "{link:?}");
        assert!(open_fds().is_some_and(|n| n >= 4), "stdio and the listener");
    }

    #[test]
    fn a_connection_socket_is_found_by_its_peer() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (held, peer) = listener.accept().unwrap();
        let port = held.local_addr().unwrap().port();
        let socket = connection_socket(port, peer).expect("found through /proc");
        assert_eq!(socket.peer_addr().unwrap().as_socket(), Some(peer));
        assert!(
            connection_socket(port + 1, peer).is_none(),
            "another port's"
        );
        drop(held);
        let table = format!("heading\n{}", row(8080, 50000, "01"));
        let peer: SocketAddr = "127.0.0.1:50000".parse().unwrap();
        assert_eq!(connection_inodes(table.as_bytes(), 8080, peer), [12345]);
        assert!(connection_inodes(table.as_bytes(), 8081, peer).is_empty());
        let other: SocketAddr = "127.0.0.1:50001".parse().unwrap();
        assert!(connection_inodes(table.as_bytes(), 8080, other).is_empty());
    }
}
