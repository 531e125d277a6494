//! One writer per state directory: an `flock`ed lock file in the checkpoint directory.
//!
//! Two writers on one directory would write checkpoints with independent sequence numbers,
//! prune each other's, and (two daemons with one client id) take the broker session from
//! each other. So `edgemt run` takes an exclusive `flock(2)` on `<dir>/edgemt.lock` before it
//! opens the checkpoint store or connects, and `edgemt replay --checkpoint DIR` before it
//! opens the store; each writes its pid and client id (a replay: `edgemt replay`) into the
//! file, and a second writer finds the lock held and refuses to start, naming the first from
//! what the file says. Readers (`edgemt check`, `edgemt export`) take no lock: they open the
//! store read-only ([`super::CheckpointStore::open_read_only`]), which removes nothing a
//! writer may be in the middle of writing.
//! The kernel releases an `flock` when its holder dies, however it dies, so the file a killed
//! daemon leaves behind blocks nobody: the next one takes the lock and overwrites the content.
//! The file is never removed (removing it would let a third daemon lock a new file while the
//! second still holds the old one).
//!
//! A lock file that can be neither created nor opened (a read-only or broken disk) does not
//! stop the daemon: it runs without the guard and says so, as it runs without checkpoints
//! when they cannot be written.
//!
//! Without a state directory there are no checkpoints to protect and nothing to lock: two
//! such daemons with one client id are told apart only by the broker, which hands the session
//! to the newer one; the daemon's MQTT task logs that.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// The lock file's name inside the state directory.
pub const LOCK_FILE: &str = "edgemt.lock";

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    /// Another live process holds the lock.
    #[error(
        "the state directory {dir} is in use by another edgemt ({holder}); two edgemt \
         processes must not write one checkpoint directory: stop that one, or use another \
         directory ([checkpoint] dir, or replay --checkpoint DIR)"
    )]
    Taken { dir: PathBuf, holder: String },
    /// The lock file can be neither created nor opened.
    #[error("cannot lock the state directory ({path})")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The held lock; dropping it (or the process ending) releases it.
#[derive(Debug)]
pub struct InstanceLock {
    /// Open for as long as the lock is held: the lock belongs to this open file.
    _file: File,
    pub path: PathBuf,
}

impl InstanceLock {
    /// Locks `dir` (creating it if needed) for this process, or says who holds it.
    pub fn acquire(dir: &Path, client_id: &str) -> Result<InstanceLock, InstanceError> {
        let path = dir.join(LOCK_FILE);
        let io = |source| InstanceError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        // Not truncated on open: the holder's pid must stay readable for the refusal. On a
        // read-only directory an existing lock file still locks (flock needs no write access).
        let (mut file, writable) = match OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
        {
            Ok(file) => (file, true),
            Err(e) => (File::open(&path).map_err(|_| io(e))?, false),
        };
        // SAFETY: flock on a descriptor this function owns; it touches no memory.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::WouldBlock {
                return Err(io(e));
            }
            let mut said = String::new();
            let _ = file.read_to_string(&mut said);
            return Err(InstanceError::Taken {
                dir: dir.to_path_buf(),
                holder: holder(&said),
            });
        }
        let record = format!("pid {}\nclient_id {client_id}\n", std::process::id());
        let written = if writable {
            file.set_len(0)
                .and_then(|()| file.seek(SeekFrom::Start(0)))
                .and_then(|_| file.write_all(record.as_bytes()))
                .and_then(|()| file.sync_data())
        } else {
            Err(std::io::ErrorKind::PermissionDenied.into())
        };
        // The lock holds without the record; a second daemon is refused all the same, it
        // just cannot name this one (a full or read-only disk must not stop the service).
        if let Err(e) = written {
            tracing::warn!(
                "locked {} but could not write this daemon's pid into it: {e}",
                path.display()
            );
        }
        Ok(InstanceLock { _file: file, path })
    }
}

/// "pid 123, client id X" from a lock file's content; what it can when the holder has not
/// written it yet (it locks first, then writes).
fn holder(said: &str) -> String {
    let field = |key: &str| {
        said.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    match (field("pid "), field("client_id ")) {
        (Some(pid), _) if !is_edgemt(&pid) => format!(
            "one that could not write its pid: the lock file still names pid {pid}, which is \
             not a running edgemt"
        ),
        (Some(pid), Some(id)) => format!("pid {pid}, client id {id}"),
        (Some(pid), None) => format!("pid {pid}"),
        _ => "a process that has not written its pid yet".into(),
    }
}

/// Whether `pid` is a running edgemt (its command name in /proc starts so; a test binary is
/// `edgemt-<hash>`): a lock file that could not be written (a read-only disk) still names an
/// earlier holder.
fn is_edgemt(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .is_ok_and(|comm| comm.starts_with("edgemt"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_directory_is_refused_naming_the_first_holder() {
        let dir = tempfile::tempdir().unwrap();
        let first = InstanceLock::acquire(dir.path(), "edgemt-a").unwrap();
        // flock locks belong to open files, so a second open in one process conflicts too.
        let err = InstanceLock::acquire(dir.path(), "edgemt-b").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(&format!("pid {}", std::process::id())) && text.contains("edgemt-a"),
            "{text}"
        );
        drop(first);
        let again = InstanceLock::acquire(dir.path(), "edgemt-b").unwrap();
        let said = std::fs::read_to_string(&again.path).unwrap();
        assert_eq!(
            said,
            format!("pid {}\nclient_id edgemt-b\n", std::process::id())
        );
    }

    #[test]
    fn a_lock_file_that_cannot_be_written_still_locks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOCK_FILE);
        std::fs::write(&path, "pid 1\nclient_id old\n").unwrap();
        // A lock file the daemon may read but not write. Root ignores mode bits, so as root
        // this only shows that a file left by another pid is taken; the read-only open was
        // checked by hand on a read-only tmpfs.
        let mut perms = std::fs::metadata(&path).unwrap().permissions();
        perms.set_readonly(true);
        std::fs::set_permissions(&path, perms).unwrap();
        let first = InstanceLock::acquire(dir.path(), "a").unwrap();
        let err = InstanceLock::acquire(dir.path(), "b").unwrap_err();
        assert!(matches!(err, InstanceError::Taken { .. }), "{err}");
        drop(first);
    }

    #[test]
    fn a_state_directory_that_is_a_file_cannot_be_locked() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("state");
        std::fs::write(&file, "").unwrap();
        assert!(matches!(
            InstanceLock::acquire(&file, "a"),
            Err(InstanceError::Io { .. })
        ));
    }

    #[test]
    fn a_missing_state_directory_is_created_and_locked() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b");
        let lock = InstanceLock::acquire(&nested, "x").unwrap();
        assert!(lock.path.exists());
    }
}
