//! A `sqlite3` workload: numbered transactions whose commits are confirmed one by one, and a
//! check of a replica's copy of the database with SQLite itself.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Whether `sqlite3` is installed; if not, the test is skipped, or fails under
/// `DOPPEL_TEST_STRICT=1`.
pub fn available() -> bool {
    doppel_testkit::require(
        Command::new("sqlite3").arg("--version").output().is_ok(),
        "sqlite3 is not installed",
    )
}

/// A `sqlite3` shell running one numbered transaction at a time.
pub struct Sqlite {
    child: Child,
    stdin: std::process::ChildStdin,
    /// Transactions whose commit returned, in order.
    pub confirmed: Arc<Mutex<Vec<u64>>>,
}

impl Sqlite {
    /// A shell on `db`.
    pub fn start(db: &Path) -> Sqlite {
        Sqlite::start_with(Command::new("sqlite3"), db)
    }

    /// A shell on `db` started by `cmd` (`sqlite3`, or a wrapper such as `nsenter ... sqlite3`).
    pub fn start_with(mut cmd: Command, db: &Path) -> Sqlite {
        let mut child = cmd
            .arg(db)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("sqlite3");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let confirmed = Arc::new(Mutex::new(Vec::new()));
        let c = confirmed.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(n) = line.strip_prefix("C|").and_then(|n| n.parse().ok()) {
                    c.lock().push(n);
                }
            }
        });
        Sqlite { child, stdin, confirmed }
    }

    /// Sends SQL; false if the shell is gone.
    pub fn send(&mut self, sql: &str) -> bool {
        self.stdin.write_all(sql.as_bytes()).and_then(|_| self.stdin.flush()).is_ok()
    }

    /// Runs transaction `i`; waits (up to `timeout`) for its commit to be confirmed.
    pub fn transaction(&mut self, i: u64, timeout: Duration) -> bool {
        self.transaction_at(i, "EXTRA", timeout)
    }

    /// [`Sqlite::transaction`] at `PRAGMA synchronous=SYNC` (`FULL` is what WAL needs).
    pub fn transaction_at(&mut self, i: u64, sync: &str, timeout: Duration) -> bool {
        // With a rollback journal, a commit is the journal's unlink, which SQLite makes durable
        // (syncs the directory) only at `synchronous=EXTRA`; at the default `FULL` a local disk
        // may lose the last commit too, so the transaction asks for what the tests assert. (Set
        // here rather than when the shell starts: a pragma then would open the database while
        // the test reads it.)
        let sql = format!(
            "PRAGMA synchronous={sync}; BEGIN; INSERT INTO t(id, v, pad) VALUES({i}, 'v{i}', randomblob(700)); \
             UPDATE t SET v = 'u{i}' WHERE id = {}; COMMIT; SELECT 'C', {i};\n",
            i / 2
        );
        if !self.send(&sql) {
            return false;
        }
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.confirmed.lock().last() == Some(&i) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    /// The last confirmed transaction.
    pub fn last(&self) -> u64 {
        self.confirmed.lock().last().copied().unwrap_or(0)
    }
}

impl Drop for Sqlite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Copies the replica's database files and checks them with SQLite itself.
pub fn check_replica_db(replica: &Path, scratch: &Path) -> (String, u64) {
    let _ = std::fs::remove_dir_all(scratch);
    std::fs::create_dir_all(scratch).unwrap();
    for suffix in ["", "-journal", "-wal"] {
        let from = replica.join(format!("app.db{suffix}"));
        if from.exists() {
            std::fs::copy(&from, scratch.join(format!("app.db{suffix}"))).unwrap();
        }
    }
    let out = Command::new("sqlite3")
        .arg(scratch.join("app.db"))
        .arg("PRAGMA integrity_check; SELECT coalesce(max(id), 0) FROM t;")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = text.lines();
    let integrity = lines.next().unwrap_or_default().to_string();
    let max = lines.next().and_then(|l| l.parse().ok()).unwrap_or(0);
    (format!("{integrity}{}", String::from_utf8_lossy(&out.stderr)), max)
}
