//! Where a command that makes files keeps them: the directory its `--dir` names, or a
//! fresh temporary directory that is removed when the command ends, however it ends.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use tempfile::TempDir;

/// A command's working directory; a temporary one is removed when this drops, or by its
/// reaper when the process dies first (SIGINT, SIGTERM, a kill: a signal's default action
/// runs no destructor, and a benchmark's images take gigabytes).
pub struct WorkDir {
    path: PathBuf,
    /// The temporary directory, held only to be removed on drop.
    temp: Option<TempDir>,
    /// The temporary directory's reaper (see [`reaper`]), if it could be started.
    reaper: Option<Child>,
}

/// A process that removes `dir` once this one ends, whatever ends it: `sh` reads its stdin
/// to end of file and then runs `rm -rf` on the directory (only then: a `cat` that fails,
/// missing or killed, leaves the directory to the drop instead of removing it early). Only this process holds the
/// pipe's write end (std opens it close-on-exec, so no program this one starts inherits
/// it), and the kernel closes it when this process goes. The reaper ignores SIGINT,
/// SIGTERM and SIGHUP, which a terminal sends the whole process group.
fn reaper(dir: &Path) -> Option<Child> {
    Command::new("sh")
        .args([
            "-c",
            "trap '' INT TERM HUP; cat > /dev/null && exec rm -rf -- \"$1\"",
            "dbm-reaper",
        ])
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        // The directory goes first; then the reaper hears the end of its input and finds
        // nothing left to remove.
        drop(self.temp.take());
        if let Some(mut r) = self.reaper.take() {
            drop(r.stdin.take());
            let _ = r.wait();
        }
    }
}

impl WorkDir {
    /// `dir` itself, created if missing, whose files stay for the user to look at; or,
    /// without `dir`, a new temporary directory.
    pub fn given_or_temp(dir: Option<&Path>) -> std::io::Result<Self> {
        match dir {
            Some(d) => {
                std::fs::create_dir_all(d)?;
                Ok(WorkDir {
                    path: d.to_path_buf(),
                    temp: None,
                    reaper: None,
                })
            }
            None => Self::temp_in(None),
        }
    }

    /// A new temporary directory inside `dir`, or in the system's temporary directory
    /// without one; removed on drop either way.
    pub fn temp_in(dir: Option<&Path>) -> std::io::Result<Self> {
        let temp = match dir {
            Some(d) => tempfile::tempdir_in(d)?,
            None => tempfile::tempdir()?,
        };
        let reaper = reaper(temp.path());
        Ok(WorkDir {
            path: temp.path().to_path_buf(),
            temp: Some(temp),
            reaper,
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::WorkDir;

    #[test]
    fn a_given_directory_is_created_and_kept_and_a_temporary_one_removed() {
        let root = tempfile::tempdir().unwrap();
        let given = root.path().join("a/b");
        let work = WorkDir::given_or_temp(Some(&given)).unwrap();
        assert_eq!(work.path(), given);
        drop(work);
        assert!(given.is_dir());

        let temp = WorkDir::given_or_temp(None).unwrap();
        let path = temp.path().to_path_buf();
        assert!(path.is_dir());
        drop(temp);
        assert!(!path.exists());

        let inside = WorkDir::temp_in(Some(root.path())).unwrap();
        let path = inside.path().to_path_buf();
        assert_eq!(path.parent(), Some(root.path()));
        drop(inside);
        assert!(!path.exists());
    }
}
