//! The few operating-system interfaces the server uses directly: the open-files limit,
//! systemd's notification socket and socket activation, and the `/proc` files the HTTP
//! layer reads to watch tiny_http from outside (what a descriptor is, how many are open,
//! which connections are still open both ways).
//!
//! Each `/proc` format is parsed from text by a function of its own, unit-tested below on
//! well-formed and malformed input; without a /proc the readers answer `None`.

use std::collections::{HashMap, HashSet};
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

/// Descriptors this process has open, if /proc tells. Linux 6.2 and later give the count
/// as the size of `/proc/self/fd`; listing the directory instead (older kernels) costs a
/// lookup and an allocation per descriptor: with 18,000 open (9,000 parked polls), the
/// prober's count twice a second took ~4% of the server's CPU in the fanout bench
/// (`perf record` on the server).
pub(crate) fn open_fds() -> Option<usize> {
    match std::fs::metadata("/proc/self/fd") {
        Ok(dir) if dir.len() > 0 => Some(dir.len() as usize),
        Ok(_) => std::fs::read_dir("/proc/self/fd").ok().map(Iterator::count),
        Err(_) => None,
    }
}

/// Connected peers, each with the inode of its socket, which tells a new connection from an
/// old one on the same address and port (the kernel may give a reset connection's port to
/// a new one at once); `None` when several sockets share the address, which then is only
/// known to be connected.
pub(crate) type Peers = HashMap<SocketAddr, Option<u64>>;

/// The peers of the connections on `local`'s port that are open both ways (`ESTABLISHED`),
/// from the kernel's socket table for `local`'s address family (a dual-stack IPv6 listener's
/// IPv4 clients are in the IPv6 table, as mapped addresses). `None` when the table cannot
/// be read to its end, or without /proc: then nobody is known to be gone.
///
/// The table lists every socket of the network namespace; extra peers (another process's
/// connections on the same port number) only make a caller let go of fewer requests. A
/// client that reset its connection (`SO_LINGER 0`, a killed process, a NAT timing out) is
/// not listed at all: the kernel drops a reset socket from the table while our descriptor
/// stays open. One that closed or half-closed it is listed in `CLOSE_WAIT`
/// (`sys::tests::a_connection_leaves_the_connected_peers_when_its_client_closes_or_resets`).
pub(crate) fn connected_peers(local: SocketAddr) -> Option<Peers> {
    let table = match local {
        SocketAddr::V4(_) => "/proc/self/net/tcp",
        SocketAddr::V6(_) => "/proc/self/net/tcp6",
    };
    // Line by line: the table has a line per socket, megabytes at 10,000 connections.
    let file = std::fs::File::open(table).ok()?;
    established_peers(io::BufReader::new(file), local.port()).ok()
}

/// The peers of the `ESTABLISHED` rows on local `port` in one `/proc/net/tcp{,6}` table (a
/// heading line, then a row per socket), with their sockets. Rows that do not parse are
/// skipped; a line that cannot be read is an error, since a peer on it would be missed.
fn established_peers(table: impl BufRead, port: u16) -> io::Result<Peers> {
    let mut peers = Peers::new();
    for row in table.lines().skip(1) {
        if let Some((peer, socket)) = established_peer(&row?, port) {
            peers
                .entry(peer)
                .and_modify(|known| {
                    if *known != Some(socket) {
                        *known = None;
                    }
                })
                .or_insert(Some(socket));
        }
    }
    Ok(peers)
}

/// The peer and socket inode of one `/proc/net/tcp{,6}` row, if the socket is on local
/// `port` and `ESTABLISHED`.
fn established_peer(row: &str, port: u16) -> Option<(SocketAddr, u64)> {
    let row = TableRow::parse(row)?;
    (row.established && row.local.port() == port).then_some((row.remote, row.inode))
}

/// What the readers here use of one `/proc/net/tcp{,6}` row (`sl local_address
/// rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode …`).
struct TableRow {
    local: SocketAddr,
    remote: SocketAddr,
    /// State `01`: open both ways.
    established: bool,
    /// The socket's inode (0 for one that is closing and has none left).
    inode: u64,
}

impl TableRow {
    fn parse(row: &str) -> Option<TableRow> {
        const ESTABLISHED: &str = "01";
        let mut fields = row.split_whitespace().skip(1);
        let local = proc_net_addr(fields.next()?)?;
        let remote = proc_net_addr(fields.next()?)?;
        let established = fields.next()? == ESTABLISHED;
        let inode = fields.nth(5)?.parse().ok()?;
        Some(TableRow {
            local,
            remote,
            established,
            inode,
        })
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
    let peer = canonical(peer);
    table
        .lines()
        .skip(1)
        .map_while(Result::ok)
        .filter_map(|row| TableRow::parse(&row))
        .filter(|row| row.local.port() == port && canonical(row.remote) == peer && row.inode != 0)
        .map(|row| row.inode)
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

    #[test]
    fn open_fds_follows_descriptors_opened_and_closed() {
        let before = open_fds().expect("a /proc");
        let files: Vec<std::fs::File> = (0..200)
            .map(|_| std::fs::File::open("/dev/null").expect("open /dev/null"))
            .collect();
        let during = open_fds().expect("a /proc");
        drop(files);
        let after = open_fds().expect("a /proc");
        // Other tests open and close descriptors meanwhile: a margin for them.
        assert!(during.abs_diff(before + 200) < 50, "{before} then {during}");
        assert!(after.abs_diff(before) < 50, "{before} then {after}");
    }

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
    fn a_row_names_its_peer_only_when_established_on_our_port() {
        let peer: SocketAddr = "127.0.0.1:50000".parse().unwrap();
        assert_eq!(
            established_peer(&row(8080, 50000, "01"), 8080),
            Some((peer, 12345))
        );
        // Closed by the client (CLOSE_WAIT, 08), closing (LAST_ACK, 09), listening (0A), and
        // other ports are not connected peers.
        assert_eq!(established_peer(&row(8080, 50000, "08"), 8080), None);
        assert_eq!(established_peer(&row(8080, 50000, "09"), 8080), None);
        assert_eq!(established_peer(&row(8080, 0, "0A"), 8080), None);
        assert_eq!(established_peer(&row(8081, 50000, "01"), 8080), None);
        let ip = localhost();
        for bad in [
            String::new(),
            "   0:".to_owned(),
            format!("   0: {ip}:1F90"),
            format!("   0: {ip}:1F90 {ip}:C350"),
            format!("   0: {ip}:1F90 garbage 01 0:0 0:0 0 0 0 12345"),
            format!("   0: garbage {ip}:C350 01 0:0 0:0 0 0 0 12345"),
            format!("{ip}:1F90 {ip}:C350 01 0:0 0:0 0 0 0 12345"),
            format!("   0: {ip}:1F90 {ip}:C350 01 0:0 0:0 0 0 0"),
            format!("   0: {ip}:1F90 {ip}:C350 01 0:0 0:0 0 0 0 inode"),
        ] {
            assert_eq!(established_peer(&bad, 8080), None, "{bad:?}");
        }
    }

    #[test]
    fn a_table_yields_the_peers_of_its_established_rows() {
        let heading = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when";
        let table = [
            heading.to_owned(),
            row(8080, 50000, "01"),
            "not a row".to_owned(),
            row(8080, 50001, "08"),
            row(8080, 50002, "01").replace("12345", "777"),
        ]
        .join("\n");
        let peers = established_peers(table.as_bytes(), 8080).unwrap();
        let expected: Peers = [("127.0.0.1:50000", 12345), ("127.0.0.1:50002", 777)]
            .iter()
            .map(|(a, inode)| (a.parse().unwrap(), Some(*inode)))
            .collect();
        assert_eq!(peers, expected);
        // Two sockets with one peer address (connections to two of our addresses): the
        // address is connected, by no one socket.
        let twice = [
            heading.to_owned(),
            row(8080, 50000, "01"),
            row(8080, 50000, "01").replace("12345", "777"),
        ]
        .join("\n");
        let peers = established_peers(twice.as_bytes(), 8080).unwrap();
        assert_eq!(peers[&"127.0.0.1:50000".parse().unwrap()], None);
        // The first line is the heading, whatever it holds.
        let one = established_peers(row(8080, 50000, "01").as_bytes(), 8080).unwrap();
        assert!(one.is_empty());
        assert!(established_peers(&b""[..], 8080).unwrap().is_empty());
        // A line that is not text fails the whole read: the peers after it are unknown.
        let mut broken = format!("{heading}\n{}\n", row(8080, 50000, "01")).into_bytes();
        broken.extend_from_slice(b"\xff\xfe\n");
        broken.extend_from_slice(row(8080, 50002, "01").as_bytes());
        assert!(established_peers(broken.as_slice(), 8080).is_err());
    }

    #[test]
    fn a_connection_leaves_the_connected_peers_when_its_client_closes_or_resets() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let local = listener.local_addr().unwrap();
        let connect = || {
            let client = std::net::TcpStream::connect(local).unwrap();
            let (held, _) = listener.accept().unwrap();
            (client.local_addr().unwrap(), client, held)
        };
        let (closes, closing, _held) = connect();
        let (resets, resetting, _held) = connect();
        let (stays, _staying, held) = connect();
        let connected = || connected_peers(local).expect("/proc/self/net/tcp");
        let now = connected();
        assert!(
            [closes, resets, stays].iter().all(|p| now.contains_key(p)),
            "{now:?}"
        );
        // Each with its socket, as /proc/self/fd names it.
        let inode = now[&stays].expect("one socket");
        let link = fd_link(held.as_raw_fd()).expect("the held socket's descriptor");
        assert_eq!(link.to_string_lossy(), format!("socket:[{inode}]"));
        drop(closing);
        let resetting = socket2::Socket::from(resetting);
        resetting.set_linger(Some(Duration::ZERO)).unwrap();
        drop(resetting);
        // The server side of both stays open (`_held`), as tiny_http's would.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let now = connected();
            assert!(
                now.contains_key(&stays),
                "an open connection is always listed"
            );
            if !now.contains_key(&closes) && !now.contains_key(&resets) {
                break;
            }
            assert!(Instant::now() < deadline, "still listed: {now:?}");
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
