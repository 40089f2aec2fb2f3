//! A SQLite VFS for the writer's connection that hands each commit's WAL frames to the
//! kernel in one write instead of two per page.
//!
//! SQLite writes a WAL frame as a 24-byte header and then the page, each its own `pwrite`, so
//! a commit touching 64 pages costs 128 system calls (counted with `perf` during
//! `cargo bench --bench load -- publish --api streams --conns 64`). On this project's machine
//! 128 such writes took ~140 µs against ~28 µs for one write of the same bytes, and the
//! `fsync` after them ~60 µs longer: a third of a 0.6 ms commit.
//!
//! The VFS wraps the default one ("unix") and changes nothing for any file but a WAL: there,
//! writes that continue one another are held in memory and written in one piece before
//! anything else touches the file — a sync, a read, a truncate, a size query, a file
//! control, a non-contiguous write, close — or once 1 MiB is held, and always before the
//! WAL's write lock is released. A commit therefore reaches the kernel in full before its
//! sync, and its sync before its 200; pages a transaction spilled before rolling back never
//! land after another process has appended to the WAL. A failed write of held bytes fails
//! every later sync until the write lock is released, so that transaction cannot commit.
//!
//! Only for `synchronous=FULL`: SQLite syncs the WAL before it publishes a commit in the
//! wal-index, so no other connection ever looks for frames still held here. Under NORMAL a
//! commit is published without a sync, so that connection uses the default VFS.
#![allow(unsafe_code)]

use std::ffi::{CStr, c_int, c_void};
use std::ptr;
use std::sync::OnceLock;

use rusqlite::ffi;

/// The name connections open the VFS by.
pub const NAME: &str = "eventserver-walbuf";
const NAME_C: &CStr = c"eventserver-walbuf";

/// Held bytes beyond which they are written at once (about 250 pages).
const MAX_HELD: usize = 1 << 20;

/// Our file object: SQLite allocates `szOsFile` bytes and hands them to `xOpen`; the
/// wrapped file of the default VFS lives right after this header.
#[repr(C)]
struct File {
    /// Must come first: SQLite sees only this.
    base: ffi::sqlite3_file,
    real: *mut ffi::sqlite3_file,
    /// Whether writes are held (a WAL whose database allows it).
    wal: bool,
    held: Vec<u8>,
    held_at: i64,
    /// A write of held bytes failed: syncs fail until the write lock is released, so the
    /// transaction that lost them cannot commit.
    broken: bool,
    /// A WAL's database file and a database file's WAL, while both are open.
    link: *mut File,
}

/// Where the wrapped file starts in the allocation, kept 8-aligned.
const REAL_OFFSET: usize = std::mem::size_of::<File>().next_multiple_of(8);

/// Registers the VFS (once per process). `Err` if SQLite has no default VFS to wrap or it is
/// not the unix one this module was written against; the caller then opens without it.
pub fn register() -> Result<(), String> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        // SAFETY: sqlite3_vfs_find and sqlite3_vfs_register are thread-safe; the struct we
        // register is leaked, so it outlives every connection that uses it.
        unsafe {
            let parent = ffi::sqlite3_vfs_find(ptr::null());
            if parent.is_null() {
                return Err("SQLite has no default VFS".into());
            }
            let parent_name = CStr::from_ptr((*parent).zName);
            // The unix VFS's methods other than xOpen ignore the VFS pointer they are given
            // (sqlite3.c: `UNUSED_PARAMETER(NotUsed)`), so ours can reuse them as they are.
            if !parent_name.to_bytes().starts_with(b"unix") {
                return Err(format!("default VFS {parent_name:?} is not unix"));
            }
            let szos = usize::try_from((*parent).szOsFile).map_err(|e| e.to_string())?;
            let vfs = Box::leak(Box::new(*parent));
            vfs.szOsFile = c_int::try_from(REAL_OFFSET + szos).map_err(|e| e.to_string())?;
            vfs.zName = NAME_C.as_ptr();
            vfs.pAppData = parent.cast();
            vfs.pNext = ptr::null_mut();
            vfs.xOpen = Some(open);
            match ffi::sqlite3_vfs_register(vfs, 0) {
                ffi::SQLITE_OK => Ok(()),
                rc => Err(format!("sqlite3_vfs_register failed: {rc}")),
            }
        }
    })
    .clone()
}

static METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 3,
    xClose: Some(close),
    xRead: Some(read),
    xWrite: Some(write),
    xTruncate: Some(truncate),
    xSync: Some(sync),
    xFileSize: Some(file_size),
    xLock: Some(lock),
    xUnlock: Some(unlock),
    xCheckReservedLock: Some(check_reserved_lock),
    xFileControl: Some(file_control),
    xSectorSize: Some(sector_size),
    xDeviceCharacteristics: Some(device_characteristics),
    xShmMap: Some(shm_map),
    xShmLock: Some(shm_lock),
    xShmBarrier: Some(shm_barrier),
    xShmUnmap: Some(shm_unmap),
    xFetch: Some(fetch),
    xUnfetch: Some(unfetch),
};

unsafe extern "C" fn open(
    vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    // SAFETY: SQLite gives us `szOsFile` bytes at `file`, 8-aligned; `pAppData` is the
    // parent VFS (set in `register`).
    unsafe {
        let parent: *mut ffi::sqlite3_vfs = (*vfs).pAppData.cast();
        let real: *mut ffi::sqlite3_file = file.cast::<u8>().add(REAL_OFFSET).cast();
        (*file).pMethods = ptr::null();
        let rc = ((*parent).xOpen.expect("the unix VFS has xOpen"))(
            parent, name, real, flags, out_flags,
        );
        if rc != ffi::SQLITE_OK {
            // The unix VFS leaves nothing open when it fails, and our `pMethods` stays null,
            // so SQLite calls no method on this file.
            return rc;
        }
        let f = file.cast::<File>();
        ptr::write(
            f,
            File {
                base: ffi::sqlite3_file { pMethods: &METHODS },
                real,
                wal: false,
                held: Vec::new(),
                held_at: 0,
                broken: false,
                link: ptr::null_mut(),
            },
        );
        if flags & ffi::SQLITE_OPEN_WAL != 0 {
            // The database this WAL belongs to was opened through this VFS too.
            let db = ffi::sqlite3_database_file_object(name);
            if !db.is_null() && ptr::eq((*db).pMethods, &METHODS) {
                let db = db.cast::<File>();
                (*f).link = db;
                (*db).link = f;
                // Without power-safe overwrite SQLite pads a commit to a sector and writes
                // part of the last frame after its sync: such a WAL is written as it comes.
                let characteristics = device_characteristics(db.cast());
                (*f).wal = characteristics & ffi::SQLITE_IOCAP_POWERSAFE_OVERWRITE != 0;
            }
        }
        ffi::SQLITE_OK
    }
}

/// Our file behind SQLite's pointer.
///
/// # Safety
/// `file` must have been opened by [`open`] and not closed.
unsafe fn ours<'a>(file: *mut ffi::sqlite3_file) -> &'a mut File {
    // SAFETY: per the contract above; SQLite never calls one file from two threads at once.
    unsafe { &mut *file.cast::<File>() }
}

/// The wrapped file's methods.
///
/// # Safety
/// `f.real` must be open.
unsafe fn real_methods(f: &File) -> &ffi::sqlite3_io_methods {
    // SAFETY: an open file of the unix VFS has its methods set.
    unsafe { &*(*f.real).pMethods }
}

/// The largest write handed to the unix VFS at once: it masks a write's length with
/// `0x1ffff` (sqlite3.c `seekAndWriteFd`), so a multiple of 128 KiB would write nothing.
const MAX_WRITE: usize = 0x1ffff;

/// Writes what is held, in as few calls of the wrapped `xWrite` as it takes. Held bytes are
/// dropped even when that fails, and the file is marked broken: the transaction they belong
/// to cannot commit (its sync fails), so SQLite rewrites those frames in a later one.
///
/// # Safety
/// `f.real` must be open.
unsafe fn flush(f: &mut File) -> c_int {
    let mut rc = ffi::SQLITE_OK;
    let mut at = f.held_at;
    for piece in f.held.chunks(MAX_WRITE) {
        // SAFETY: `piece` is readable for its length, which fits a c_int.
        rc = unsafe {
            (real_methods(f).xWrite.expect("the unix VFS has xWrite"))(
                f.real,
                piece.as_ptr().cast(),
                piece.len() as c_int,
                at,
            )
        };
        if rc != ffi::SQLITE_OK {
            f.broken = true;
            break;
        }
        at += piece.len() as i64;
    }
    // The allocation stays for the next commit.
    f.held.clear();
    rc
}

/// Flushes, then runs `call` on the wrapped file unless the flush failed.
///
/// # Safety
/// `file` must have been opened by [`open`] and not closed.
unsafe fn flushed(
    file: *mut ffi::sqlite3_file,
    call: impl FnOnce(&ffi::sqlite3_io_methods, *mut ffi::sqlite3_file) -> c_int,
) -> c_int {
    // SAFETY: per the contract above.
    unsafe {
        let f = ours(file);
        let rc = flush(f);
        if rc != ffi::SQLITE_OK {
            return rc;
        }
        call(real_methods(f), f.real)
    }
}

/// Runs `call` on the wrapped file.
///
/// # Safety
/// `file` must have been opened by [`open`] and not closed.
unsafe fn direct<T>(
    file: *mut ffi::sqlite3_file,
    call: impl FnOnce(&ffi::sqlite3_io_methods, *mut ffi::sqlite3_file) -> T,
) -> T {
    // SAFETY: per the contract above.
    unsafe {
        let f = ours(file);
        call(real_methods(f), f.real)
    }
}

unsafe extern "C" fn close(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: SQLite closes each opened file exactly once and frees it afterwards.
    unsafe {
        let f = ours(file);
        let flushed = flush(f);
        if !f.link.is_null() {
            (*f.link).link = ptr::null_mut();
        }
        let closed = (real_methods(f).xClose.expect("the unix VFS has xClose"))(f.real);
        ptr::drop_in_place(file.cast::<File>());
        if flushed != ffi::SQLITE_OK {
            flushed
        } else {
            closed
        }
    }
}

unsafe extern "C" fn write(
    file: *mut ffi::sqlite3_file,
    data: *const c_void,
    amount: c_int,
    offset: ffi::sqlite3_int64,
) -> c_int {
    // SAFETY: SQLite passes `amount` readable bytes at `data`.
    unsafe {
        let f = ours(file);
        if !f.wal || amount <= 0 {
            return (real_methods(f).xWrite.expect("the unix VFS has xWrite"))(
                f.real, data, amount, offset,
            );
        }
        if !f.held.is_empty() && offset != f.held_at + f.held.len() as i64 {
            let rc = flush(f);
            if rc != ffi::SQLITE_OK {
                return rc;
            }
        }
        if f.held.is_empty() {
            f.held_at = offset;
        }
        let bytes = std::slice::from_raw_parts(data.cast::<u8>(), amount as usize);
        f.held.extend_from_slice(bytes);
        if f.held.len() >= MAX_HELD {
            return flush(f);
        }
        ffi::SQLITE_OK
    }
}

unsafe extern "C" fn read(
    file: *mut ffi::sqlite3_file,
    data: *mut c_void,
    amount: c_int,
    offset: ffi::sqlite3_int64,
) -> c_int {
    // SAFETY: opened by `open`; arguments passed through.
    unsafe {
        flushed(file, |m, real| {
            m.xRead.expect("xRead")(real, data, amount, offset)
        })
    }
}

unsafe extern "C" fn truncate(file: *mut ffi::sqlite3_file, size: ffi::sqlite3_int64) -> c_int {
    // SAFETY: opened by `open`; arguments passed through.
    unsafe { flushed(file, |m, real| m.xTruncate.expect("xTruncate")(real, size)) }
}

unsafe extern "C" fn sync(file: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    // SAFETY: opened by `open`; arguments passed through.
    unsafe {
        if ours(file).broken {
            return ffi::SQLITE_IOERR_FSYNC;
        }
        flushed(file, |m, real| m.xSync.expect("xSync")(real, flags))
    }
}

unsafe extern "C" fn file_size(
    file: *mut ffi::sqlite3_file,
    size: *mut ffi::sqlite3_int64,
) -> c_int {
    // SAFETY: opened by `open`; arguments passed through.
    unsafe { flushed(file, |m, real| m.xFileSize.expect("xFileSize")(real, size)) }
}

unsafe extern "C" fn file_control(
    file: *mut ffi::sqlite3_file,
    op: c_int,
    arg: *mut c_void,
) -> c_int {
    // SAFETY: opened by `open`; arguments passed through.
    unsafe {
        flushed(file, |m, real| {
            m.xFileControl.expect("xFileControl")(real, op, arg)
        })
    }
}

unsafe extern "C" fn lock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    // SAFETY: opened by `open`; arguments passed through.
    unsafe { direct(file, |m, real| m.xLock.expect("xLock")(real, level)) }
}

unsafe extern "C" fn unlock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    // SAFETY: opened by `open`; arguments passed through.
    unsafe { direct(file, |m, real| m.xUnlock.expect("xUnlock")(real, level)) }
}

unsafe extern "C" fn check_reserved_lock(file: *mut ffi::sqlite3_file, out: *mut c_int) -> c_int {
    // SAFETY: opened by `open`; arguments passed through.
    unsafe {
        direct(file, |m, real| {
            m.xCheckReservedLock.expect("xCheckReservedLock")(real, out)
        })
    }
}

unsafe extern "C" fn sector_size(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: opened by `open`; arguments passed through.
    unsafe { direct(file, |m, real| m.xSectorSize.expect("xSectorSize")(real)) }
}

unsafe extern "C" fn device_characteristics(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: opened by `open`; arguments passed through.
    unsafe {
        direct(file, |m, real| {
            m.xDeviceCharacteristics.expect("xDeviceCharacteristics")(real)
        })
    }
}

unsafe extern "C" fn shm_map(
    file: *mut ffi::sqlite3_file,
    region: c_int,
    size: c_int,
    extend: c_int,
    out: *mut *mut c_void,
) -> c_int {
    // SAFETY: opened by `open`; arguments passed through.
    unsafe {
        direct(file, |m, real| match m.xShmMap {
            Some(map) => map(real, region, size, extend, out),
            None => ffi::SQLITE_IOERR,
        })
    }
}

unsafe extern "C" fn shm_lock(
    file: *mut ffi::sqlite3_file,
    offset: c_int,
    n: c_int,
    flags: c_int,
) -> c_int {
    // SAFETY: opened by `open`; arguments passed through; `link` is open while set.
    unsafe {
        let f = ours(file);
        let write_lock = offset <= WAL_WRITE_LOCK && WAL_WRITE_LOCK < offset + n;
        if write_lock && flags == ffi::SQLITE_SHM_UNLOCK | ffi::SQLITE_SHM_EXCLUSIVE {
            // Nothing held may outlive the write lock: another process could append at
            // those offsets next. A commit has flushed at its sync, so what is left belongs
            // to a transaction that rolled back (pages spilled before its end): it is
            // written beyond the last commit, harmlessly, while the lock is still ours.
            if let Some(wal) = f.link.as_mut() {
                let _ = flush(wal);
                wal.broken = false;
            }
        }
        direct(file, |m, real| match m.xShmLock {
            Some(lock) => lock(real, offset, n, flags),
            None => ffi::SQLITE_IOERR,
        })
    }
}

/// The wal-index lock slot of the WAL's single writer (sqlite3.c `WAL_WRITE_LOCK`).
const WAL_WRITE_LOCK: c_int = 0;

unsafe extern "C" fn shm_barrier(file: *mut ffi::sqlite3_file) {
    // SAFETY: opened by `open`; arguments passed through.
    unsafe {
        direct(file, |m, real| {
            if let Some(barrier) = m.xShmBarrier {
                barrier(real);
            }
        })
    }
}

unsafe extern "C" fn shm_unmap(file: *mut ffi::sqlite3_file, delete: c_int) -> c_int {
    // SAFETY: opened by `open`; arguments passed through.
    unsafe {
        direct(file, |m, real| match m.xShmUnmap {
            Some(unmap) => unmap(real, delete),
            None => ffi::SQLITE_OK,
        })
    }
}

unsafe extern "C" fn fetch(
    file: *mut ffi::sqlite3_file,
    offset: ffi::sqlite3_int64,
    amount: c_int,
    out: *mut *mut c_void,
) -> c_int {
    // SAFETY: opened by `open`; arguments passed through. Without xFetch, "no mapping".
    unsafe {
        flushed(file, |m, real| match m.xFetch {
            Some(fetch) if m.iVersion >= 3 => fetch(real, offset, amount, out),
            _ => {
                *out = ptr::null_mut();
                ffi::SQLITE_OK
            }
        })
    }
}

unsafe extern "C" fn unfetch(
    file: *mut ffi::sqlite3_file,
    offset: ffi::sqlite3_int64,
    page: *mut c_void,
) -> c_int {
    // SAFETY: opened by `open`; arguments passed through.
    unsafe {
        direct(file, |m, real| match m.xUnfetch {
            Some(unfetch) if m.iVersion >= 3 => unfetch(real, offset, page),
            _ => ffi::SQLITE_OK,
        })
    }
}

#[cfg(test)]
mod tests {
    use rusqlite::{Connection, OpenFlags};

    /// Every commit through the VFS is visible to a connection on the default VFS at once,
    /// and survives reopening.
    #[test]
    fn commits_are_visible_to_other_connections_and_after_reopening() {
        super::register().expect("the unix VFS is the default on Linux");
        let dir = std::env::temp_dir().join(format!("walbuf-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.db");
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE;
        let writer = Connection::open_with_flags_and_vfs(&path, flags, super::NAME).unwrap();
        writer
            .execute_batch(
                "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; \
                 CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB);",
            )
            .unwrap();
        let reader = Connection::open(&path).unwrap();
        for i in 0..200i64 {
            // Rows of 3 KiB over a few pages each: commits of many frames, some above
            // the hold limit when grouped.
            let tx = writer.unchecked_transaction().unwrap();
            for j in 0..(i % 7 + 1) {
                tx.execute(
                    "INSERT INTO t (k, v) VALUES (?1, zeroblob(3000))",
                    [i * 10 + j],
                )
                .unwrap();
            }
            tx.commit().unwrap();
            let n: i64 = reader
                .query_row("SELECT count(*) FROM t WHERE k >= ?1", [i * 10], |r| {
                    r.get(0)
                })
                .unwrap();
            assert_eq!(n, i % 7 + 1, "commit {i} is visible to the reader");
        }
        // One commit above the hold limit: written in pieces before its sync.
        let tx = writer.unchecked_transaction().unwrap();
        for k in 10_000..10_600i64 {
            tx.execute("INSERT INTO t (k, v) VALUES (?1, zeroblob(3000))", [k])
                .unwrap();
        }
        tx.commit().unwrap();
        let n: i64 = reader
            .query_row("SELECT count(*) FROM t WHERE k >= 10000", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 600, "the large commit is visible to the reader");
        writer
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
            .unwrap();
        let total: i64 = (0..200i64).map(|i| i % 7 + 1).sum::<i64>() + 600;
        drop((writer, reader));
        let again = Connection::open(&path).unwrap();
        let n: i64 = again
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, total);
        let check: String = again
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok");
        drop(again);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
