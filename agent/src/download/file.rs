//! Local bundle files (and block devices): a plain positioned reader.

use super::{BundleReader, DownloadError, Inner};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::PathBuf;

pub(super) struct FileReader {
    file: File,
    pub(super) path: PathBuf,
    pos: u64,
}

pub(super) fn open_file(path: PathBuf, offset: u64) -> Result<BundleReader, DownloadError> {
    let fail = |path: &PathBuf, source: io::Error| DownloadError::OpenFile {
        path: path.clone(),
        source,
    };
    let mut file = File::open(&path).map_err(|e| fail(&path, e))?;
    let meta = file.metadata().map_err(|e| fail(&path, e))?;
    if meta.is_dir() {
        return Err(fail(
            &path,
            io::Error::new(io::ErrorKind::InvalidInput, "is a directory"),
        ));
    }
    // Block devices report 0 here; only check regular files.
    let total = meta.is_file().then_some(meta.len());
    if let Some(len) = total
        && offset > len
    {
        return Err(fail(
            &path,
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("offset {offset} is past the end of the {len}-byte file"),
            ),
        ));
    }
    file.seek(SeekFrom::Start(offset)).map_err(|e| fail(&path, e))?;
    Ok(BundleReader {
        total,
        remaining: None,
        inner: Inner::File(FileReader {
            file,
            path,
            pos: offset,
        }),
    })
}

impl FileReader {
    pub(super) fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.file.read(buf) {
            Ok(n) => {
                self.pos += n as u64;
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(e),
            Err(source) => Err(io::Error::other(DownloadError::ReadFile {
                path: self.path.clone(),
                offset: self.pos,
                source,
            })),
        }
    }
}
