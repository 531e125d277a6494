//! One daemon per state directory: an `flock`ed lock file in the checkpoint directory.
//!
//! Two daemons on one directory would write checkpoints with independent sequence numbers,
//! prune each other's, and (with one client id) take the broker session from each other. So
//! `edgemt run` takes an exclusive `flock(2)` on `<dir>/edgemt.lock` before it opens the
//! checkpoint store or connects, and writes its pid and client id into the file; a second
//! daemon finds the lock held and refuses to start, naming the first from what the file says.
//! The kernel releases an `flock` when its holder dies, however it dies, so the file a killed
//! daemon leaves behind blocks nobody: the next one takes the lock and overwrites the content.
//! The file is never removed (removing it would let a third daemon lock a new file while the
//! second still holds the old one).
//!
//! Without a state directory there are no checkpoints to protect and nothing to lock: two
//! such daemons with one client id are told apart only by the broker, which hands the session
//! to the newer one; the MQTT task logs that ([`super::mqtt`]).

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
        "the state directory {dir} is in use by another edgemt ({holder}); two daemons must \
         not share checkpoints: stop that one, or give this one another [checkpoint] dir"
    )]
    Taken { dir: PathBuf, holder: String },
    #[error("cannot lock the state directory ({path}): {source}")]
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
        // Not truncated on open: the holder's pid must stay readable for the refusal.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
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
        file.set_len(0)
            .and_then(|()| file.seek(SeekFrom::Start(0)))
            .and_then(|_| file.write_all(record.as_bytes()))
            .and_then(|()| file.sync_data())
            .map_err(io)?;
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
        (Some(pid), Some(id)) => format!("pid {pid}, client id {id}"),
        (Some(pid), None) => format!("pid {pid}"),
        _ => "a process that has not written its pid yet".into(),
    }
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
    fn a_missing_state_directory_is_created_and_locked() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b");
        let lock = InstanceLock::acquire(&nested, "x").unwrap();
        assert!(lock.path.exists());
    }
}
