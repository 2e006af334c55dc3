//! The `file` sink: a local directory laid out like an S3 bucket (`<root>/<bucket>/<key>`), the
//! embedded default. An object appears whole or not at all: it is staged and fsynced under
//! `<root>/.edgehose-staging/`, renamed into place, and the directory is fsynced.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::{SinkError, Staging};

pub struct FileSink {
    root: PathBuf,
    bucket: String,
}

impl FileSink {
    pub fn new(root: &Path, bucket: &str) -> Self {
        Self {
            root: root.to_path_buf(),
            bucket: bucket.to_string(),
        }
    }

    /// Staging lives beside the bucket, on the same file system, so the final rename is atomic
    /// and a tool syncing the bucket directory never sees partial objects.
    pub fn staging_path(&self, name: &str) -> PathBuf {
        self.root
            .join(".edgehose-staging")
            .join(&self.bucket)
            .join(format!("{name}.part"))
    }

    pub fn describe(&self) -> String {
        format!("file://{}", self.root.join(&self.bucket).display())
    }

    /// The bucket directory exists (or can be made) and is a directory.
    pub async fn check(&self) -> Result<(), SinkError> {
        let dir = self.root.join(&self.bucket);
        tokio::task::spawn_blocking(move || -> Result<(), SinkError> {
            std::fs::create_dir_all(&dir)?;
            if !std::fs::metadata(&dir)?.is_dir() {
                return Err(SinkError::Io(std::io::Error::other(format!(
                    "{} is not a directory",
                    dir.display()
                ))));
            }
            Ok(())
        })
        .await
        .map_err(|e| SinkError::Io(std::io::Error::other(e)))?
    }

    /// Renames a staged file into place; an object in memory is first written and fsynced
    /// to a staging file of its own.
    pub async fn put(&self, staged: &Staging, key: &str) -> Result<(), SinkError> {
        let target = self.root.join(&self.bucket).join(key);
        let staged = staged.clone();
        // Named after the key's hash: a key may be longer than a file name can be, and puts of
        // different keys may run at once.
        let spare = self.staging_path(&format!(
            "memory-{:016x}",
            std::hash::BuildHasher::hash_one(
                &std::hash::BuildHasherDefault::<std::hash::DefaultHasher>::default(),
                key
            )
        ));
        tokio::task::spawn_blocking(move || -> Result<(), SinkError> {
            let dir = target.parent().unwrap_or(Path::new("."));
            std::fs::create_dir_all(dir)?;
            let path = match staged {
                Staging::File(path) => path,
                Staging::Memory(data) => {
                    if let Some(d) = spare.parent() {
                        std::fs::create_dir_all(d)?;
                    }
                    let mut file = File::create(&spare)?;
                    file.write_all(&data)?;
                    file.sync_all()?;
                    spare
                }
            };
            std::fs::rename(&path, &target)?;
            File::open(dir)?.sync_all()?;
            Ok(())
        })
        .await
        .map_err(|e| SinkError::Io(std::io::Error::other(e)))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn put_renames_into_the_bucket_layout() {
        let dir = tempfile::tempdir().unwrap();
        let sink = FileSink::new(dir.path(), "b");
        let staged = sink.staging_path("d");
        std::fs::create_dir_all(staged.parent().unwrap()).unwrap();
        std::fs::write(&staged, b"x\n").unwrap();
        let file = Staging::File(staged.clone());
        sink.put(&file, "2024/01/02/03/s-1-2024-01-02-03-04-05-u")
            .await
            .unwrap();
        let out = dir.path().join("b/2024/01/02/03/s-1-2024-01-02-03-04-05-u");
        assert_eq!(std::fs::read(&out).unwrap(), b"x\n");
        assert!(!staged.exists());
        // Putting the same key again (a retried batch) replaces it.
        std::fs::write(&staged, b"y\n").unwrap();
        sink.put(&file, "2024/01/02/03/s-1-2024-01-02-03-04-05-u")
            .await
            .unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"y\n");
        // An object held in memory lands the same way.
        let memory = Staging::Memory(bytes::Bytes::from_static(b"z\n"));
        sink.put(&memory, "2024/01/02/03/s-1-2024-01-02-03-04-05-u")
            .await
            .unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"z\n");
        // A key longer than a file name may be (the staged copy is named after its hash).
        let long = format!("{}k", "p/".repeat(150));
        sink.put(&memory, &long).await.unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("b").join(&long)).unwrap(),
            b"z\n"
        );
    }

    #[tokio::test]
    async fn a_missing_staged_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let sink = FileSink::new(dir.path(), "b");
        let missing = Staging::File(dir.path().join("nope"));
        assert!(sink.put(&missing, "k").await.is_err());
    }
}
