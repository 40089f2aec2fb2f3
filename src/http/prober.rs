//! The prober: one thread that keeps tiny_http moving and watches it, every [`TICK`].
//!
//! - **Pump connections.** A race in tiny_http 0.12's connection pool leaves some
//!   connections of a burst queued with no thread to read them until other work arrives
//!   (`abuse::a_burst_of_300_connections_is_answered_within_2_s`). So the prober opens empty
//!   connections, closed at once: a few every tick, up to [`PUMP_CONNECTIONS`] while
//!   requests arrive or probe requests are slow. Each makes the pool take the oldest
//!   stranded connection.
//! - **Engine deaths.** Every tick it looks for an engine whose accept thread is gone (its
//!   listener clone closed) and starts any successor that is due.
//! - **Probe requests.** Twice a second it sends a request to [`PROBE_PATH`], answered by
//!   the HTTP layer itself; [`PROBE_MISSES`] unanswered in a row (a hung accept loop, or no
//!   /proc to watch) and the accept loop is presumed dead and replaced. The same tick
//!   re-estimates open connections from the descriptor count, since tiny_http cannot count
//!   them.
//! - **Hang-up scans.** tiny_http notices a client's hang-up only on its next read, which a
//!   parked request never makes; a reset may end its connection thread, never the request,
//!   which holds a descriptor and its place under the parked-poll cap until answered. Every
//!   [`HANGUP_TICKS`] ticks, while requests are parked, the server is handed a way to read
//!   which peers are still connected (`ESTABLISHED` in the kernel's socket table) and by
//!   which socket, and releases the polls of the others, whether they closed, half-closed
//!   or reset, or a new connection took the port
//!   (`longpoll::a_poll_whose_client_hangs_up_is_released`,
//!   `longpoll::a_poll_whose_client_half_closes_is_released_and_answered`,
//!   `abuse::a_poll_whose_client_resets_is_released_with_its_descriptors`,
//!   `longpoll::a_client_reconnecting_from_a_reset_connections_port_is_not_held_behind_its_old_poll`).

use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::engine::{Engine, replace_engine, start_successor, want_successor};
use super::{Shared, lock};

/// The prober's tick.
const TICK: Duration = Duration::from_millis(100);
/// Ticks between probe requests.
const PROBE_TICKS: u32 = 5;
/// How long a connection (pump or probe) or a probe's answer may take.
const PATIENCE: Duration = Duration::from_millis(500);
/// Unanswered probe requests in a row before the accept loop is presumed dead and replaced.
const PROBE_MISSES: u32 = 4;
/// Ticks between looks for clients that went away, so a poll is released within ~2 s. Each
/// look reads the kernel's socket table, twice when a parked poll's peer is missing from
/// it: ~25 ms of CPU a read here with 18,000 sockets listed (9,000 connections whose
/// clients are on this host), ~1% of a core.
const HANGUP_TICKS: u32 = 20;
/// Most pump connections opened in one tick.
const PUMP_CONNECTIONS: usize = 16;
/// Pump connections opened every tick regardless (20 a second: negligible work).
const IDLE_PUMPS: usize = 2;
/// Ticks of pumping hard after the last request arrived.
const PUMP_TICKS: u32 = 10;
/// The path of probe requests; answered by the HTTP layer itself.
pub(super) const PROBE_PATH: &str = "/.eventserver-probe";

/// The prober thread's loop, until the server stops.
pub(super) fn run(shared: &Arc<Shared>) {
    let (mut tick, mut misses, mut active) = (0u32, 0u32, 0u32);
    let mut seen = shared.arrivals.load(Ordering::Relaxed);
    loop {
        if shared
            .stopped
            .recv_timeout(TICK)
            .is_err_and(|e| e.is_disconnected())
        {
            return;
        }
        let dead: Vec<Arc<Engine>> = lock(&shared.engines)
            .iter()
            .filter(|e| !e.replaced.load(Ordering::SeqCst) && e.dead(shared))
            .cloned()
            .collect();
        for engine in dead {
            replace_engine(shared, &engine, Some("its thread ended"));
        }
        start_successor(shared);
        let arrivals = shared.arrivals.load(Ordering::Relaxed);
        let fresh = arrivals.wrapping_sub(seen);
        seen = arrivals;
        if fresh > 0 {
            active = PUMP_TICKS;
        }
        // A few pumps every tick: connections that never complete a request (idle or slow
        // clients) get stranded too, and they do not count as arrivals.
        let pumps = if active > 0 {
            active -= 1;
            fresh.clamp(IDLE_PUMPS, PUMP_CONNECTIONS)
        } else {
            IDLE_PUMPS
        };
        for _ in 0..pumps {
            let _ = TcpStream::connect_timeout(&shared.self_addr, PATIENCE);
        }
        tick += 1;
        if tick % HANGUP_TICKS == 0 && shared.front.holding() {
            let local = shared.self_addr;
            shared
                .front
                .release_gone(&|| crate::sys::connected_peers(local));
        }
        if tick % PROBE_TICKS != 0 {
            continue;
        }
        if let Some(fds) = crate::sys::open_fds() {
            // tiny_http holds two descriptors per connection.
            let estimate = fds.saturating_sub(shared.baseline_fds) / 2;
            shared.connections.store(estimate, Ordering::Relaxed);
        }
        let started = Instant::now();
        if probe(shared) {
            misses = 0;
            if started.elapsed() > TICK {
                // A slow probe waited in the pool's queue: pump hard for a while.
                active = PUMP_TICKS;
            }
            continue;
        }
        active = PUMP_TICKS;
        misses += 1;
        if misses == PROBE_MISSES && !shared.stopping.load(Ordering::SeqCst) {
            crate::log::error("probe requests go unanswered; starting a new HTTP accept loop");
            want_successor(shared, Duration::ZERO, true);
        }
    }
}

/// Sends a probe request; whether it is answered within [`PATIENCE`].
fn probe(shared: &Shared) -> bool {
    let before = shared.probes_answered.load(Ordering::SeqCst);
    super::ask_self(shared.self_addr, PROBE_PATH, PATIENCE).is_ok()
        || shared.probes_answered.load(Ordering::SeqCst) > before
}
