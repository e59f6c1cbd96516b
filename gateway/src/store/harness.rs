//! The backends the store's shared tests run against: [`both_backends!`] instantiates each
//! test once on a SQLite file and once on a PostgreSQL database of its own. PostgreSQL is the
//! server in `OMNIRELAY_TEST_POSTGRES` (default `postgres://postgres@127.0.0.1:5432/test`);
//! when none answers there, a private one is started from the installed binaries (`initdb`,
//! `pg_ctl`) on a free port and stopped when the test process exits. With neither, the tests
//! fail saying how to get one: they never skip.

use std::ops::Deref;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::tests::TempDir;
use super::*;
use crate::audit::ChainHead;

/// Instantiates each named `async fn NAME(kind: Kind)` as a test per backend, in the modules
/// `sqlite` and `postgres`.
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(crate::store::harness::Kind::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(crate::store::harness::Kind::Postgres).await
                }
            )*
        }
    };
}
pub(super) use both_backends;

/// Which backend a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Sqlite,
    Postgres,
}

/// One test's state: a directory (the audit file, and the SQLite file) and, on PostgreSQL, a
/// database of its own, dropped with it.
pub(super) struct Harness {
    pub dir: TempDir,
    database: Option<TestDatabase>,
}

/// A store of either backend.
pub(super) enum TestStore {
    Sqlite(SqliteStore),
    Postgres(PostgresStore),
}

impl Deref for TestStore {
    type Target = dyn Store;

    fn deref(&self) -> &(dyn Store + 'static) {
        match self {
            TestStore::Sqlite(s) => s,
            TestStore::Postgres(s) => s,
        }
    }
}

impl TestStore {
    /// Closes the store: signs the chain, mirrors it, releases the audit file.
    pub async fn close(self) {
        match self {
            TestStore::Sqlite(s) => s.close().await,
            TestStore::Postgres(s) => s.close().await,
        }
    }
}

impl Harness {
    pub async fn new(kind: Kind, name: &str) -> Self {
        let dir = TempDir::new(name);
        let database = match kind {
            Kind::Sqlite => None,
            Kind::Postgres => Some(TestDatabase::create().await),
        };
        Self { dir, database }
    }

    pub fn config(&self) -> StoreConfig {
        let mut config = self.dir.config();
        if let Some(db) = &self.database {
            config.backend = Backend::Postgres(db.config());
        }
        config
    }

    pub fn audit_file(&self) -> PathBuf {
        self.dir.config().audit_file
    }

    pub async fn open(&self, checkpoints: Checkpoints) -> Result<TestStore, StoreError> {
        let config = self.config();
        Ok(match &config.backend {
            Backend::Sqlite => TestStore::Sqlite(SqliteStore::open(&config, checkpoints)?),
            Backend::Postgres(pg) => {
                TestStore::Postgres(PostgresStore::open(pg, &config.audit_file, checkpoints).await?)
            }
        })
    }

    /// Runs one statement (SQL both backends read alike) on the database directly.
    pub async fn execute(&self, sql: &str) {
        match &self.database {
            None => {
                let conn = rusqlite::Connection::open(&self.dir.config().sqlite).unwrap();
                conn.execute(sql, []).unwrap();
            }
            Some(db) => {
                db.client().await.batch_execute(sql).await.unwrap();
            }
        }
    }

    /// The first column of every row of a query, as optional text.
    pub async fn texts(&self, sql: &str) -> Vec<Option<String>> {
        match &self.database {
            None => {
                let conn = rusqlite::Connection::open(&self.dir.config().sqlite).unwrap();
                let mut stmt = conn.prepare(sql).unwrap();
                stmt.query_map([], |r| r.get(0))
                    .unwrap()
                    .collect::<Result<_, _>>()
                    .unwrap()
            }
            Some(db) => db
                .client()
                .await
                .query(sql, &[])
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect(),
        }
    }

    /// The seq and hash of the database's last audit row (of the newest chain, on
    /// PostgreSQL: the one the store opened last writes).
    pub async fn db_head(&self) -> ChainHead {
        let order = match self.database {
            None => "seq DESC",
            Some(_) => "chain DESC, seq DESC",
        };
        let rows = self
            .texts(&format!(
                "SELECT CAST(seq AS TEXT) || ':' || hash FROM audit ORDER BY {order} LIMIT 1"
            ))
            .await;
        let text = rows[0].clone().unwrap();
        let (seq, hash) = text.split_once(':').unwrap();
        ChainHead {
            seq: seq.parse().unwrap(),
            hash: hex::decode(hash).unwrap().try_into().unwrap(),
        }
    }
}

/// Where the test server is: parts of a `key=value` connection string without `dbname`.
struct Server {
    params: String,
    /// A private server, stopped when the test process exits (a static is never dropped, but
    /// its pipe closes with the process).
    _private: Option<PrivateServer>,
}

static SERVER: OnceLock<Server> = OnceLock::new();

fn server() -> &'static Server {
    SERVER.get_or_init(|| {
        let url = std::env::var("OMNIRELAY_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let config: tokio_postgres::Config = url
            .parse()
            .unwrap_or_else(|e| panic!("OMNIRELAY_TEST_POSTGRES={url:?} does not parse: {e}"));
        let host = match config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            _ => "127.0.0.1".into(),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let user = config.get_user().unwrap_or("postgres").to_string();
        let mut params = format!("host={host} port={port} user={user}");
        if let Some(password) = config.get_password() {
            params.push_str(&format!(" password={}", String::from_utf8_lossy(password)));
        }
        let answers = format!("{host}:{port}")
            .parse::<std::net::SocketAddr>()
            .ok()
            .and_then(|addr| {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()
            })
            .is_some();
        if answers {
            return Server {
                params,
                _private: None,
            };
        }
        let private = start_private_server(&url, None);
        let port = private.port;
        Server {
            params: format!("host=127.0.0.1 port={port} user=postgres"),
            _private: Some(private),
        }
    })
}

/// `initdb` and `pg_ctl` on the PATH, or in the newest `/usr/lib/postgresql/*/bin`.
fn binaries() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .find(|dir| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file())
    });
    on_path.or_else(|| {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|bin| bin.join("initdb").is_file() && bin.join("pg_ctl").is_file())
            .collect();
        dirs.sort();
        dirs.pop()
    })
}

/// A private PostgreSQL server: stopped, and its directory removed, when this is dropped (or,
/// for the shared one kept in a static, when the test process exits and its pipe closes).
pub(super) struct PrivateServer {
    pub port: u16,
    watchdog: std::process::Child,
    /// Never written: its closing tells the watchdog to stop the server.
    pipe: Option<std::process::ChildStdin>,
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        drop(self.pipe.take());
        let _ = self.watchdog.wait();
    }
}

/// Starts a private server (trust authentication, loopback only, a free port) in a temp
/// directory, as the `postgres` user when running as root (PostgreSQL refuses root). With
/// `tls` (certificate and key, PEM), it also serves TLS with them.
pub(super) fn start_private_server(url: &str, tls: Option<(&str, &str)>) -> PrivateServer {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let Some(bin) = binaries() else {
        panic!(
            "no PostgreSQL server answers at {url} (OMNIRELAY_TEST_POSTGRES) and no initdb/pg_ctl \
             is installed to start one: install PostgreSQL (e.g. `apt-get install -y postgresql`) \
             or point OMNIRELAY_TEST_POSTGRES at a server"
        )
    };
    let dir = std::env::temp_dir().join(format!(
        "omnirelay-pg-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut options = String::from("-c fsync=off");
    let mut install_tls = String::new();
    if let Some((cert, key)) = tls {
        std::fs::write(dir.join("tls.crt"), cert).unwrap();
        std::fs::write(dir.join("tls.key"), key).unwrap();
        options.push_str(" -c ssl=on");
        install_tls = format!(
            "cp '{d}/tls.crt' '{d}/data/server.crt'; cp '{d}/tls.key' '{d}/data/server.key'; \
             chmod 600 '{d}/data/server.key'; rm '{d}/tls.key';",
            d = dir.display()
        );
    }
    let as_root = Command::new("id").arg("-u").output().unwrap().stdout == b"0\n";
    if as_root {
        let status = Command::new("chown")
            .args(["-R", "postgres:"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(status.success(), "chown {} to postgres", dir.display());
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (data, bin) = (dir.join("data"), bin.display().to_string());
    let script = format!(
        "set -e; '{bin}/initdb' -D '{data}' -U postgres --auth=trust -E UTF8 --no-sync >'{dir}/initdb.log' 2>&1; \
         {install_tls} \
         '{bin}/pg_ctl' -D '{data}' -l '{dir}/server.log' -w -o \"-p {port} -k '{dir}' -c listen_addresses=127.0.0.1 {options}\" start >/dev/null",
        data = data.display(),
        dir = dir.display(),
    );
    let status = shell(as_root, &script).status().unwrap();
    assert!(
        status.success(),
        "starting a private PostgreSQL in {} failed (see its logs there)",
        dir.display()
    );
    let stop = format!(
        "read _ignored; '{bin}/pg_ctl' -D '{data}' -m fast stop >/dev/null 2>&1; rm -rf '{dir}'",
        data = data.display(),
        dir = dir.display(),
    );
    let mut watchdog = shell(as_root, &stop).stdin(Stdio::piped()).spawn().unwrap();
    let pipe = watchdog.stdin.take();
    PrivateServer {
        port,
        watchdog,
        pipe,
    }
}

fn shell(as_root: bool, script: &str) -> Command {
    if as_root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", "sh", "-c", script]);
        c
    } else {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        c
    }
}

/// A database created for one test and dropped after it.
struct TestDatabase {
    name: String,
}

impl TestDatabase {
    async fn create() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "omnirelay_test_{}_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
        );
        admin()
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        Self { name }
    }

    fn params(&self) -> String {
        format!("{} dbname={}", server().params, self.name)
    }

    fn config(&self) -> PostgresConfig {
        let mut config = PostgresConfig::new(self.params());
        config.pool_size = std::num::NonZeroUsize::new(8).unwrap();
        config
    }

    async fn client(&self) -> tokio_postgres::Client {
        connect(&self.params()).await
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs outside any runtime's reach: a thread of its own runs the statement.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                admin()
                    .await
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop the test database {}", self.name);
        }
    }
}

/// A connection to the server's maintenance database.
async fn admin() -> tokio_postgres::Client {
    connect(&format!("{} dbname=postgres", server().params)).await
}

async fn connect(params: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(params, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to the test PostgreSQL: {e}"));
    tokio::spawn(connection);
    client
}
