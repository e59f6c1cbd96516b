//! git over SSH through the system's OpenSSH client: `ssh` runs `git-upload-pack` or
//! `git-receive-pack` on the server and the protocol flows over its stdin and stdout. Key
//! formats, ciphers and host-key checking stay OpenSSH's; this module pins what a gateway must
//! not inherit from a user's setup: no `~/.ssh/config`, no agent, no prompt, exactly the
//! configured key, and host keys checked strictly against exactly the configured
//! `known_hosts` (an unknown or changed key is refused, never learnt).

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use git2::transport::{Service, SmartSubtransport, SmartSubtransportStream};

use super::session::Session;
use super::url::Scheme;
use super::{TransportError, fail, fail_io};

/// How long `ssh` may take to exit once the protocol is done (or its output ended).
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How much of `ssh`'s stderr an error quotes.
const STDERR_TAIL: usize = 1024;

/// The SSH subtransport of one operation: at most one `ssh` process.
pub(super) struct Subtransport {
    session: Arc<Session>,
    process: Mutex<Option<Arc<Mutex<Process>>>>,
}

impl Subtransport {
    pub fn new(session: Arc<Session>) -> Self {
        Self {
            session,
            process: Mutex::new(None),
        }
    }

    /// The `ssh` command line for `program` (`git-upload-pack` or `git-receive-pack`).
    fn command(&self, program: &str) -> Result<Command, TransportError> {
        let missing = |what| TransportError::Protocol(what);
        let parts = self
            .session
            .url
            .parts()
            .ok_or(missing("an SSH remote without a host"))?;
        let key = self
            .session
            .ssh_key
            .as_deref()
            .ok_or(missing("no ssh_key"))?;
        let known = self
            .session
            .known_hosts
            .as_deref()
            .ok_or(missing("no known_hosts"))?;
        // `ssh://host/~user/repo` names a path under a home directory, as git reads it.
        let path = match (self.session.url.scheme(), parts.path.strip_prefix("/~")) {
            (Scheme::Ssh, Some(home)) if self.session.url.as_str().contains("://") => {
                format!("~{home}")
            }
            _ => parts.path.clone(),
        };
        let mut ssh = Command::new("ssh");
        ssh.args(["-F", "/dev/null"])
            .args(["-o", "BatchMode=yes"])
            .args(["-o", "StrictHostKeyChecking=yes"])
            .args(["-o", "UpdateHostKeys=no"])
            .args(["-o", "GlobalKnownHostsFile=/dev/null"])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", quoted(known)?))
            .args(["-o", "IdentitiesOnly=yes"])
            .args(["-o", "IdentityAgent=none"])
            .args(["-o", "PasswordAuthentication=no"])
            .args(["-o", "KbdInteractiveAuthentication=no"])
            .args(["-o", "ConnectTimeout=30"])
            .args(["-o", "ServerAliveInterval=15"])
            .args(["-o", "LogLevel=ERROR"])
            .arg("-i")
            .arg(key);
        if let Some(port) = parts.port {
            ssh.arg("-p").arg(port.to_string());
        }
        if let Some(user) = &parts.user {
            ssh.arg("-l").arg(user);
        }
        ssh.arg("--")
            .arg(&parts.host)
            .arg(format!("{program} {}", shell_quote(&path)))
            .env_remove("SSH_AUTH_SOCK")
            .env_remove("SSH_ASKPASS")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Ok(ssh)
    }
}

impl SmartSubtransport for Subtransport {
    fn action(
        &self,
        _url: &str,
        action: Service,
    ) -> Result<Box<dyn SmartSubtransportStream>, git2::Error> {
        let program = match action {
            Service::UploadPackLs => "git-upload-pack",
            Service::ReceivePackLs => "git-receive-pack",
            // Stateful: libgit2 keeps using the stream of the listing.
            Service::UploadPack | Service::ReceivePack => {
                return Err(fail(TransportError::Protocol(
                    "a second stream on a stateful transport",
                )));
            }
        };
        let mut child = self
            .command(program)
            .map_err(fail)?
            .spawn()
            .map_err(|e| fail(TransportError::SshSpawn(e)))?;
        let (Some(stdin), Some(stdout), Some(mut stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            let _ = child.kill();
            return Err(fail(TransportError::Protocol("ssh without its pipes")));
        };
        // Drained on a thread of its own so ssh never blocks on a full pipe; the tail names
        // what went wrong (host key, authentication).
        let tail = std::thread::spawn(move || {
            let mut all = Vec::new();
            let _ = stderr.read_to_end(&mut all);
            let text = String::from_utf8_lossy(&all).trim().to_string();
            let cut = text.len().saturating_sub(STDERR_TAIL);
            let cut = (cut..=text.len())
                .find(|i| text.is_char_boundary(*i))
                .unwrap_or(text.len());
            text[cut..].to_string()
        });
        let process = Arc::new(Mutex::new(Process {
            child,
            stdin: Some(stdin),
            stderr: Some(tail),
            status: None,
        }));
        if let Ok(mut slot) = self.process.lock()
            && let Some(previous) = slot.replace(process.clone())
        {
            lock(&previous).finish();
        }
        Ok(Box::new(Stream { stdout, process }))
    }

    fn close(&self) -> Result<(), git2::Error> {
        if let Some(process) = self.process.lock().ok().and_then(|mut p| p.take()) {
            lock(&process).finish();
        }
        Ok(())
    }
}

/// One `ssh` process.
struct Process {
    child: Child,
    stdin: Option<ChildStdin>,
    stderr: Option<JoinHandle<String>>,
    status: Option<ExitStatus>,
}

impl Process {
    /// Waits (bounded) for `ssh` to exit, killing it at the limit.
    fn wait(&mut self) -> Option<ExitStatus> {
        let deadline = Instant::now() + EXIT_TIMEOUT;
        while self.status.is_none() {
            match self.child.try_wait() {
                Ok(Some(status)) => self.status = Some(status),
                Ok(None) if Instant::now() < deadline => {
                    // std has no wait with a timeout: poll the child's exit, bounded by the
                    // deadline (on the thread libgit2 calls the transport from).
                    std::thread::sleep(Duration::from_millis(5));
                }
                Ok(None) | Err(_) => {
                    let _ = self.child.kill();
                    self.status = self.child.wait().ok();
                    break;
                }
            }
        }
        self.status
    }

    /// Why `ssh` failed, once its output has ended: `None` if it exited cleanly.
    fn failure(&mut self) -> Option<TransportError> {
        self.stdin = None;
        let status = self.wait()?;
        if status.success() {
            return None;
        }
        let stderr = self
            .stderr
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        Some(TransportError::Ssh {
            status: status.to_string(),
            stderr,
        })
    }

    /// Ends the session: no more input, then a bounded wait.
    fn finish(&mut self) {
        self.stdin = None;
        self.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn lock(process: &Mutex<Process>) -> MutexGuard<'_, Process> {
    process
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The protocol's channel: `ssh`'s stdout to read, its stdin to write.
struct Stream {
    stdout: ChildStdout,
    process: Arc<Mutex<Process>>,
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.stdout.read(buf) {
            Ok(0) => match lock(&self.process).failure() {
                Some(reason) => Err(fail_io(reason)),
                None => Ok(0),
            },
            other => other,
        }
    }
}

impl Write for Stream {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let mut process = lock(&self.process);
        let written = match process.stdin.as_mut() {
            Some(stdin) => stdin.write(data),
            None => return Err(fail_io(TransportError::Protocol("a write after the end"))),
        };
        written.map_err(|e| match process.failure() {
            Some(reason) => fail_io(reason),
            None => e,
        })
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match lock(&self.process).stdin.as_mut() {
            Some(stdin) => stdin.flush(),
            None => Ok(()),
        }
    }
}

/// A path as an OpenSSH option value (double-quoted; a `"` in it cannot be expressed).
fn quoted(path: &Path) -> Result<String, TransportError> {
    let text = path.display().to_string();
    if text.contains('"') {
        return Err(TransportError::Protocol(
            "a known_hosts path containing '\"'",
        ));
    }
    Ok(format!("\"{text}\""))
}

/// `text` as one word for the remote shell.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_paths_are_one_shell_word() {
        assert_eq!(shell_quote("/srv/p.git"), "'/srv/p.git'");
        assert_eq!(shell_quote("it's; rm -rf /"), r"'it'\''s; rm -rf /'");
        assert!(quoted(Path::new("/a \"b")).is_err());
        assert_eq!(quoted(Path::new("/a b")).unwrap(), "\"/a b\"");
    }
}
