//! The few operating-system knobs the server turns: the open-files limit.

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
