//! Reading config files with bounds: only regular files (a FIFO would hang
//! the reader, `/dev/zero` would never end), at most [`MAX_FILE_BYTES`] each.

use std::io::Read;
use std::path::Path;

/// The largest config file read (workflow, resource or memory file).
pub const MAX_FILE_BYTES: u64 = 2 * 1024 * 1024;

/// Why a file was not read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// It does not exist.
    #[error("cannot read: {0}")]
    NotFound(std::io::Error),
    /// A FIFO, a device, a socket or a folder.
    #[error("not a regular file ({0}): refusing to read it")]
    NotRegular(&'static str),
    /// Over [`MAX_FILE_BYTES`].
    #[error("larger than {MAX_FILE_BYTES} bytes: refusing to read it")]
    TooLarge,
    /// Any other I/O error, or text that is not UTF-8.
    #[error("cannot read: {0}")]
    Io(std::io::Error),
}

/// The text of the regular file at `path` (symlinks followed), bounded.
///
/// # Errors
/// [`ReadError`] saying why it was not read.
pub fn read_text(path: &Path) -> Result<String, ReadError> {
    use std::os::unix::fs::FileTypeExt;
    // Checked before opening: opening a FIFO blocks until a writer comes.
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ReadError::NotFound(e),
        _ => ReadError::Io(e),
    })?;
    let kind = meta.file_type();
    if !kind.is_file() {
        return Err(ReadError::NotRegular(if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_char_device() || kind.is_block_device() {
            "a device"
        } else if kind.is_dir() {
            "a folder"
        } else {
            "a socket"
        }));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(ReadError::TooLarge);
    }
    // The file may grow between the check and the read: read at most one byte more.
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes))
        .map_err(ReadError::Io)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(ReadError::TooLarge);
    }
    String::from_utf8(bytes).map_err(|e| ReadError::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn only_bounded_regular_files_are_read() {
        let dir = tempfile::TempDir::new().unwrap();
        let fine = dir.path().join("fine.yaml");
        std::fs::write(&fine, "steps: []\n").unwrap();
        assert_eq!(read_text(&fine).unwrap(), "steps: []\n");
        let zero = dir.path().join("zero.yaml");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        assert_eq!(
            read_text(&zero).unwrap_err().to_string(),
            "not a regular file (a device): refusing to read it"
        );
        let fifo = dir.path().join("fifo.yaml");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        assert_eq!(
            read_text(&fifo).unwrap_err().to_string(),
            "not a regular file (a FIFO): refusing to read it"
        );
        let big = dir.path().join("big.yaml");
        std::fs::write(&big, vec![b'#'; MAX_FILE_BYTES as usize + 1]).unwrap();
        assert_eq!(
            read_text(&big).unwrap_err().to_string(),
            format!("larger than {MAX_FILE_BYTES} bytes: refusing to read it")
        );
        assert!(matches!(
            read_text(&dir.path().join("missing")),
            Err(ReadError::NotFound(_))
        ));
    }
}
