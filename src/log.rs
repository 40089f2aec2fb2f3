//! A small leveled logger to stderr, where journald picks it up.
//!
//! The level comes from `EVENTSERVER_LOG` (`error`, `warn`, `info`, `debug`; default `info`).
//! Callers never pass secrets: credentials are logged by user name only.

use std::io::Write;
use std::sync::atomic::{AtomicU8, Ordering};

/// How much to log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Something failed.
    Error = 0,
    /// Something is wrong but the server carries on.
    Warn = 1,
    /// Start-up, shutdown and one line per request.
    Info = 2,
    /// Internals.
    Debug = 3,
}

static LEVEL: AtomicU8 = AtomicU8::new(Level::Info as u8);

/// Sets the level from `EVENTSERVER_LOG`; an unknown value is an error naming the setting.
pub fn init_from_env() -> Result<(), String> {
    let Ok(value) = std::env::var("EVENTSERVER_LOG") else {
        return Ok(());
    };
    let level = match value.to_ascii_lowercase().as_str() {
        "error" => Level::Error,
        "warn" => Level::Warn,
        "info" => Level::Info,
        "debug" => Level::Debug,
        _ => {
            return Err(format!(
                "EVENTSERVER_LOG must be error, warn, info or debug, not {value:?}"
            ));
        }
    };
    set_level(level);
    Ok(())
}

/// Sets the level.
pub fn set_level(level: Level) {
    LEVEL.store(level as u8, Ordering::Relaxed);
}

/// Whether messages at `level` are written.
pub fn enabled(level: Level) -> bool {
    level as u8 <= LEVEL.load(Ordering::Relaxed)
}

fn write(level: Level, tag: &str, message: &str) {
    if enabled(level) {
        // One write call per line so lines from different threads do not interleave.
        let line = format!("{tag} {message}\n");
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }
}

/// Logs an error.
pub fn error(message: &str) {
    write(Level::Error, "ERROR", message);
}

/// Logs a warning.
pub fn warn(message: &str) {
    write(Level::Warn, "WARN", message);
}

/// Logs an informational line.
pub fn info(message: &str) {
    write(Level::Info, "INFO", message);
}

/// Logs a debugging line.
pub fn debug(message: &str) {
    write(Level::Debug, "DEBUG", message);
}
