//! A temporary directory removed on drop (the tests crate keeps its dependencies small).
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::names;

#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// `$TMPDIR/svclbt-<pid>-<n>`, created with mode 0700.
    pub fn new() -> Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let path = std::env::temp_dir().join(names::unique());
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .with_context(|| format!("create temp dir {}", path.display()))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!(
                "svclb-harness: teardown: remove {}: {e}",
                self.path.display()
            );
        }
    }
}
