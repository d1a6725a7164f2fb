//! Where a command that makes files keeps them: the directory its `--dir` names, or a
//! fresh temporary directory that is removed when the command ends.

use std::path::{Path, PathBuf};

use tempfile::TempDir;

/// A command's working directory; a temporary one is removed when this drops.
pub struct WorkDir {
    path: PathBuf,
    /// The temporary directory, held only to be removed on drop.
    _temp: Option<TempDir>,
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
                    _temp: None,
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
        Ok(WorkDir {
            path: temp.path().to_path_buf(),
            _temp: Some(temp),
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
