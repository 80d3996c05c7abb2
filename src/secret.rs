//! Reading a secret from a file (the MQTT password, the HTTP API key). A file every user on
//! the device may read is refused, with the fix in the message: a secret there is no secret.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is readable by every user (mode {mode:04o}); it holds a secret: \
         `chmod o-rwx {path}` (and give it to emberd's user or group)"
    )]
    WorldReadable { path: PathBuf, mode: u32 },
}

/// The file's contents, once its mode shows that only its owner and group may read it.
pub fn read_secret(path: &Path) -> Result<String, SecretError> {
    let read_error = |source| SecretError::Read {
        path: path.to_path_buf(),
        source,
    };
    let metadata = std::fs::metadata(path).map_err(read_error)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = metadata.permissions().mode() & 0o7777;
        if mode & 0o004 != 0 {
            return Err(SecretError::WorldReadable {
                path: path.to_path_buf(),
                mode,
            });
        }
    }
    #[cfg(not(unix))]
    let _ = metadata;
    std::fs::read_to_string(path).map_err(read_error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_secret_every_user_may_read_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "s3cret\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_secret(&path).unwrap_err().to_string();
        assert!(
            err.contains("readable by every user") && err.contains("mode 0644"),
            "{err}"
        );
        assert!(err.contains("chmod o-rwx"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(read_secret(&path).unwrap(), "s3cret\n");
        let missing = read_secret(&dir.path().join("none")).unwrap_err();
        assert!(matches!(missing, SecretError::Read { .. }), "{missing}");
    }
}
