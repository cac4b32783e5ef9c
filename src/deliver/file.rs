//! The `file://DIR` transport: each message is written as `DIR/<message-id>.eml` (written to a
//! temporary name, then renamed, so a reader never sees half a file). A retry of the same message
//! rewrites the same file. Runs on the worker's runtime; the write is a short local file write.

use std::io::Write;
use std::path::PathBuf;

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
        let written = std::fs::File::create(&tmp)
            .and_then(|mut f| f.write_all(&m.raw).and_then(|_| f.sync_data()))
            .and_then(|_| std::fs::rename(&tmp, &path));
        match written {
            Ok(()) => Delivery::Accepted {
                reply: Reply::new(None, format!("written to {}", path.display())),
                provider_id: None,
                rejected: Vec::new(),
                deferred: Vec::new(),
                captured: None,
            },
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Delivery::Transient {
                    reply: Reply::new(None, format!("cannot write {}: {e}", path.display())),
                    retry_after: None,
                    rejected: Vec::new(),
                }
            }
        }
    }
}
