//! A private OpenSSH server for the remote-transport tests: `sshd -D` on a free loopback port
//! with a host key and a user key generated for the test, serving git over SSH as any git
//! host does (`git-upload-pack` / `git-receive-pack` run by the login shell).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::TempDir;

/// `sshd` on 127.0.0.1, admitting one generated user key.
#[derive(Debug)]
pub struct Sshd {
    /// Its port.
    pub port: u16,
    /// Keys, config and the repositories.
    pub dir: TempDir,
    child: Child,
}

/// The `sshd` binary: on the PATH, or where Debian puts it. `.ci/run` installs
/// `openssh-server` when it is missing.
pub fn sshd_binary() -> PathBuf {
    let on_path = Command::new("sh")
        .args(["-c", "command -v sshd"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let found = on_path
        .into_iter()
        .chain([PathBuf::from("/usr/sbin/sshd")])
        .find(|p| p.is_absolute() && p.exists());
    found.unwrap_or_else(|| {
        panic!("sshd is not installed: `apt-get install -y openssh-server` (.ci/run does)")
    })
}

/// A new ed25519 key pair without passphrase at `path` (and `path.pub`).
pub fn keygen(path: &Path) {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "e2e", "-f"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ssh-keygen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `ssh-keygen` public key line: `type base64`.
fn public_key(path: &Path) -> String {
    let text = std::fs::read_to_string(path.with_extension("pub")).unwrap();
    let mut fields = text.split_whitespace();
    format!("{} {}", fields.next().unwrap(), fields.next().unwrap())
}

impl Sshd {
    /// Generates the keys and starts `sshd`; returns once it greets clients.
    pub fn start(name: &str) -> Self {
        let dir = TempDir::new(&format!("{name}-sshd"));
        let host_key = dir.0.join("host_key");
        let user_key = dir.0.join("user_key");
        keygen(&host_key);
        keygen(&user_key);
        std::fs::write(
            dir.0.join("authorized_keys"),
            format!("{}\n", public_key(&user_key)),
        )
        .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let user = whoami();
        let config = dir.0.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "ListenAddress 127.0.0.1\nHostKey {host}\nPidFile none\n\
                 AuthorizedKeysFile {keys}\nPubkeyAuthentication yes\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
                 StrictModes no\nPermitRootLogin prohibit-password\nAllowUsers {user}\n\
                 LogLevel ERROR\n",
                host = host_key.display(),
                keys = dir.0.join("authorized_keys").display(),
            ),
        )
        .unwrap();
        // sshd insists on its privilege-separation directory when started as root.
        let _ = std::fs::create_dir_all("/run/sshd");
        let child = Command::new(sshd_binary())
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .arg("-p")
            .arg(port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let sshd = Self { port, dir, child };
        sshd.wait_for_greeting();
        sshd
    }

    fn wait_for_greeting(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut tcp) = TcpStream::connect(("127.0.0.1", self.port)) {
                tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut banner = [0u8; 4];
                if tcp.read_exact(&mut banner).is_ok() && &banner == b"SSH-" {
                    // Answer with a version line of our own, so sshd logs no error for the probe.
                    let _ = tcp.write_all(b"SSH-2.0-e2e-probe\r\n");
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "sshd did not greet on port {} within 20 s",
                self.port
            );
            std::thread::yield_now();
        }
    }

    /// The user's private key (mode 0600, as ssh-keygen writes it).
    pub fn user_key(&self) -> PathBuf {
        self.dir.0.join("user_key")
    }

    /// A `known_hosts` line for this server's real host key.
    pub fn known_hosts_line(&self) -> String {
        format!(
            "[127.0.0.1]:{} {}\n",
            self.port,
            public_key(&self.dir.0.join("host_key"))
        )
    }

    /// A bare repository under the server's directory, and its `ssh://` URL.
    pub fn repo(&self, name: &str) -> (PathBuf, String) {
        let path = self.dir.0.join(name);
        git2::Repository::init_bare(&path).unwrap();
        let url = format!(
            "ssh://{}@127.0.0.1:{}{}",
            whoami(),
            self.port,
            path.display()
        );
        (path, url)
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn whoami() -> String {
    let out = Command::new("id").arg("-un").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}
