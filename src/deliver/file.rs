//! The `file://DIR` transport: each message is written as `DIR/<message-id>.eml` (written to a
//! temporary name, synced to disk, then renamed, so a reader never sees half a file). A retry of
//! the same message rewrites the same file. The write and its fsync run on tokio's blocking pool,
//! so they never stall the other sends on the worker's I/O thread.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::dsn::Dsn;
use super::{Delivery, Outgoing, Reply};

pub struct FileTransport {
    dir: PathBuf,
}

impl FileTransport {
    pub fn new(d: &Dsn) -> FileTransport {
        FileTransport { dir: PathBuf::from(d.path.clone().unwrap_or_else(|| "/nonexistent".into())) }
    }

    pub async fn send(&self, m: &Outgoing) -> Delivery {
        let stem: String = m
            .message_id
            .trim_matches(|c| c == '<' || c == '>')
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || "@._-".contains(c) { c } else { '_' })
            .collect();
        let path = self.dir.join(format!("{stem}.eml"));
        let tmp = self.dir.join(format!(".{stem}.tmp"));
        let raw = m.raw.clone();
        let target = path.clone();
        let written = tokio::task::spawn_blocking(move || write_durably(&tmp, &target, &raw)).await;
        let failure = match written {
            Ok(Ok(())) => {
                return Delivery::Accepted {
                    reply: Reply::new(None, format!("written to {}", path.display())),
                    provider_id: None,
                    rejected: Vec::new(),
                    deferred: Vec::new(),
                    captured: None,
                }
            }
            // A directory that is missing or not writable is a configuration error: retrying
            // cannot help, so the message fails at once with the cause. Anything else (a full
            // disk, an I/O error) may pass: it is retried.
            Ok(Err(e)) if is_configuration(&e) => {
                let text =
                    format!("cannot write {}: {e} (check the directory of the file:// transport)", path.display());
                return Delivery::permanent(Reply::new(None, text));
            }
            Ok(Err(e)) => e.to_string(),
            // The write panicked or the runtime is shutting down.
            Err(e) => e.to_string(),
        };
        Delivery::transient(Reply::new(None, format!("cannot write {}: {failure}", path.display())))
    }
}

fn is_configuration(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{NotADirectory, NotFound, PermissionDenied, ReadOnlyFilesystem};
    matches!(e.kind(), NotFound | PermissionDenied | NotADirectory | ReadOnlyFilesystem)
}

/// Checks that `dir` is a directory this process can create files in (creates and removes a
/// probe file).
pub fn probe(dir: &Path) -> std::io::Result<()> {
    if !dir.is_dir() {
        return Err(std::io::Error::new(std::io::ErrorKind::NotFound, "no such directory"));
    }
    let probe = dir.join(format!(".pg_email-probe-{}", std::process::id()));
    File::create(&probe)?;
    std::fs::remove_file(&probe)
}

/// Writes `raw` to `tmp`, syncs it, and renames it to `path`; removes `tmp` on failure.
fn write_durably(tmp: &Path, path: &Path, raw: &[u8]) -> std::io::Result<()> {
    let written = File::create(tmp)
        .and_then(|mut f| f.write_all(raw).and_then(|_| f.sync_data()))
        .and_then(|_| std::fs::rename(tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn outgoing(message_id: &str, raw: &[u8]) -> Outgoing {
        Outgoing {
            id: 1,
            attempt: 1,
            from: "a@example.org".parse().unwrap(),
            to: vec!["b@example.org".parse().unwrap()],
            raw: Arc::new(raw.to_vec()),
            message_id: message_id.into(),
            fields: None,
        }
    }

    fn send(t: &FileTransport, m: &Outgoing) -> Delivery {
        let rt = tokio::runtime::Builder::new_current_thread().max_blocking_threads(2).build().unwrap();
        rt.block_on(t.send(m))
    }

    #[test]
    fn writes_one_file_per_message_id_and_rewrites_it_on_retry() {
        let dir = std::env::temp_dir().join(format!("pg_email-file-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let t = FileTransport { dir: dir.clone() };
        let d = send(&t, &outgoing("<a/b c@example.org>", b"first"));
        let want = dir.join("a_b_c@example.org.eml");
        assert_eq!(
            d,
            Delivery::Accepted {
                reply: Reply::new(None, format!("written to {}", want.display())),
                provider_id: None,
                rejected: vec![],
                deferred: vec![],
                captured: None,
            }
        );
        assert_eq!(std::fs::read(&want).unwrap(), b"first");
        send(&t, &outgoing("<a/b c@example.org>", b"second"));
        assert_eq!(std::fs::read(&want).unwrap(), b"second");
        let names: Vec<String> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["a_b_c@example.org.eml"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_directory_is_a_permanent_failure_naming_the_cause() {
        let t = FileTransport { dir: PathBuf::from("/nonexistent/pg_email") };
        let Delivery::Permanent { reply, rejected } = send(&t, &outgoing("<m@x>", b"x")) else {
            panic!("not permanent")
        };
        assert!(reply.text.starts_with("cannot write /nonexistent/pg_email/m@x.eml: "), "{}", reply.text);
        assert!(reply.text.ends_with("(check the directory of the file:// transport)"), "{}", reply.text);
        assert!(rejected.is_empty());
    }

    #[test]
    fn probe_accepts_a_writable_directory_and_refuses_a_missing_one() {
        let dir = std::env::temp_dir().join(format!("pg_email-probe-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        probe(&dir).unwrap();
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "the probe file is removed");
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(probe(&dir).unwrap_err().kind(), std::io::ErrorKind::NotFound);
    }
}
