//! The daemon's state in SQLite: sandboxes, processes, keys, templates.
//!
//! One thread owns the connection; async callers hand it closures through
//! [`Store::call`], so writes are serialized (as SQLite needs) without
//! blocking the async runtime. WAL journal, `synchronous=NORMAL`, foreign
//! keys on. The schema is migrated forward with `PRAGMA user_version`.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::oneshot;

/// Schema versions, applied in order. Never edit a released step: append.
const MIGRATIONS: &[&str] = &[
    // 1: the first schema.
    "CREATE TABLE sandboxes (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        state TEXT NOT NULL,
        reason TEXT,
        template TEXT NOT NULL,
        backend TEXT NOT NULL,
        spec TEXT NOT NULL,
        record TEXT,
        labels TEXT NOT NULL,
        metadata TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        started_at INTEGER,
        stopped_at INTEGER,
        expires_at INTEGER,
        updated_at INTEGER NOT NULL
    );
    CREATE INDEX sandboxes_by_owner ON sandboxes(owner, created_at, id);
    CREATE INDEX sandboxes_by_state ON sandboxes(state);
    CREATE TABLE processes (
        sandbox_id TEXT NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,
        pid INTEGER NOT NULL,
        tag TEXT,
        command TEXT NOT NULL,
        state TEXT NOT NULL,
        started_at INTEGER NOT NULL,
        exited_at INTEGER,
        result TEXT,
        PRIMARY KEY (sandbox_id, pid, started_at)
    );
    CREATE TABLE keys (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        owner TEXT NOT NULL,
        hash TEXT NOT NULL UNIQUE,
        scopes TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        last_used_at INTEGER,
        revoked_at INTEGER
    );
    CREATE TABLE templates (
        name TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        source TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        meta TEXT NOT NULL
    );",
    // 2: machines of the dialects that can stop and start again
    // (Hyperfleet machines, GBOX boxes); a started machine is the sandbox
    // of the same ID.
    "CREATE TABLE machines (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        owner TEXT NOT NULL,
        name TEXT NOT NULL,
        spec TEXT NOT NULL,
        status TEXT NOT NULL,
        reason TEXT,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    );
    CREATE UNIQUE INDEX machines_by_name ON machines(kind, owner, name);",
];

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the data directory's disk is full; free some space (nothing was written)")]
    DiskFull,
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("cannot open the database {path}: {source}")]
    Open {
        path: String,
        source: rusqlite::Error,
    },
    #[error("the database thread has stopped")]
    Gone,
    #[error(
        "the database was written by a newer cove (schema {found}, this build knows {known}); upgrade cove"
    )]
    TooNew { found: i64, known: i64 },
}

fn classify(err: rusqlite::Error) -> StoreError {
    match &err {
        rusqlite::Error::SqliteFailure(e, _) if e.code == rusqlite::ErrorCode::DiskFull => {
            StoreError::DiskFull
        }
        _ => StoreError::Sqlite(err),
    }
}

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// A handle to the database thread. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    jobs: std::sync::mpsc::Sender<Job>,
}

impl Store {
    /// Open (creating and migrating) the database at `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let mut conn = Connection::open(path).map_err(|source| StoreError::Open {
            path: path.display().to_string(),
            source,
        })?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        migrate(&mut conn)?;
        let (jobs, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("cove-store".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job(&mut conn);
                }
            })
            .map_err(|e| {
                StoreError::Sqlite(rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
            })?;
        Ok(Store { jobs })
    }

    /// Run `f` on the database thread.
    pub async fn call<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Connection) -> rusqlite::Result<R> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Box::new(move |conn| {
                let _ = tx.send(f(conn));
            }))
            .map_err(|_| StoreError::Gone)?;
        rx.await.map_err(|_| StoreError::Gone)?.map_err(classify)
    }

    /// Run `f` on the database thread and block for the answer (startup only).
    pub fn call_blocking<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Connection) -> rusqlite::Result<R> + Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::channel();
        self.jobs
            .send(Box::new(move |conn| {
                let _ = tx.send(f(conn));
            }))
            .map_err(|_| StoreError::Gone)?;
        rx.recv().map_err(|_| StoreError::Gone)?.map_err(classify)
    }
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    let known = MIGRATIONS.len() as i64;
    if version > known {
        return Err(StoreError::TooNew {
            found: version,
            known,
        });
    }
    for (i, step) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(step)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}

/// A sandbox row.
#[derive(Debug, Clone, PartialEq)]
pub struct SandboxRow {
    pub id: String,
    pub owner: String,
    pub state: String,
    pub reason: Option<String>,
    pub template: String,
    pub backend: String,
    pub spec: String,
    pub record: Option<String>,
    pub labels: String,
    pub metadata: String,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub stopped_at: Option<i64>,
    pub expires_at: Option<i64>,
}

const SANDBOX_COLUMNS: &str = "id, owner, state, reason, template, backend, spec, record, labels, metadata, \
     created_at, started_at, stopped_at, expires_at";

fn sandbox_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<SandboxRow> {
    Ok(SandboxRow {
        id: row.get(0)?,
        owner: row.get(1)?,
        state: row.get(2)?,
        reason: row.get(3)?,
        template: row.get(4)?,
        backend: row.get(5)?,
        spec: row.get(6)?,
        record: row.get(7)?,
        labels: row.get(8)?,
        metadata: row.get(9)?,
        created_at: row.get(10)?,
        started_at: row.get(11)?,
        stopped_at: row.get(12)?,
        expires_at: row.get(13)?,
    })
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Sandbox queries.
impl Store {
    pub async fn insert_sandbox(&self, row: SandboxRow) -> Result<(), StoreError> {
        self.call(move |conn| {
            // Cached, as are set_state's and get_sandbox's: all three are
            // on every create's path.
            conn.prepare_cached(
                &format!("INSERT INTO sandboxes ({SANDBOX_COLUMNS}, updated_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)"),
            )?
            .execute(
                params![
                    row.id, row.owner, row.state, row.reason, row.template, row.backend, row.spec, row.record,
                    row.labels, row.metadata, row.created_at, row.started_at, row.stopped_at, row.expires_at, now_ms()
                ],
            )
            .map(|_| ())
        })
        .await
    }

    /// Write a state transition (and optionally the backend record).
    pub async fn set_state(
        &self,
        id: &str,
        state: &str,
        reason: Option<String>,
        record: Option<String>,
    ) -> Result<(), StoreError> {
        let (id, state) = (id.to_string(), state.to_string());
        self.call(move |conn| {
            let now = now_ms();
            conn.prepare_cached(
                "UPDATE sandboxes SET state = ?2, reason = COALESCE(?3, reason), record = COALESCE(?4, record),
                    started_at = CASE WHEN ?2 = 'running' AND started_at IS NULL THEN ?5 ELSE started_at END,
                    stopped_at = CASE WHEN ?2 IN ('stopped', 'failed') THEN ?5 ELSE stopped_at END,
                    updated_at = ?5
                 WHERE id = ?1",
            )?
            .execute(params![id, state, reason, record, now])
            .map(|_| ())
        })
        .await
    }

    pub async fn set_expiry(&self, id: &str, expires_at: Option<i64>) -> Result<(), StoreError> {
        let id = id.to_string();
        self.call(move |conn| {
            conn.execute(
                "UPDATE sandboxes SET expires_at = ?2, updated_at = ?3 WHERE id = ?1",
                params![id, expires_at, now_ms()],
            )
            .map(|_| ())
        })
        .await
    }

    /// Every sandbox that has not ended.
    pub fn live_sandboxes_blocking(&self) -> Result<Vec<SandboxRow>, StoreError> {
        self.call_blocking(|conn| {
            let mut stmt = conn.prepare(&format!(
                "SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE state NOT IN ('stopped', 'failed') ORDER BY created_at, id"
            ))?;
            let rows = stmt.query_map([], sandbox_from_row)?.collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    pub async fn get_sandbox(&self, id: &str) -> Result<Option<SandboxRow>, StoreError> {
        let id = id.to_string();
        self.call(move |conn| {
            conn.prepare_cached(&format!(
                "SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE id = ?1"
            ))?
            .query_row([id], sandbox_from_row)
            .optional()
        })
        .await
    }

    /// Ended sandboxes (for listing), newest last.
    pub async fn ended_sandboxes(
        &self,
        owner: Option<String>,
    ) -> Result<Vec<SandboxRow>, StoreError> {
        self.call(move |conn| {
            let mut stmt = conn.prepare(&format!(
                "SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE state IN ('stopped', 'failed') AND (?1 IS NULL OR owner = ?1) ORDER BY created_at, id"
            ))?;
            let rows = stmt.query_map([owner], sandbox_from_row)?.collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
        .await
    }

    /// Forget one sandbox row (an ended one, before its ID is reused).
    pub async fn forget_sandbox(&self, id: &str) -> Result<(), StoreError> {
        let id = id.to_string();
        self.call(move |conn| {
            conn.execute(
                "DELETE FROM sandboxes WHERE id = ?1 AND state IN ('stopped', 'failed')",
                [id],
            )
            .map(|_| ())
        })
        .await
    }

    /// Forget sandboxes that ended before `before_ms`.
    pub async fn purge_ended(&self, before_ms: i64) -> Result<usize, StoreError> {
        self.call(move |conn| {
            conn.execute(
                "DELETE FROM sandboxes WHERE state IN ('stopped', 'failed') AND stopped_at < ?1",
                [before_ms],
            )
        })
        .await
    }
}

/// A key row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRow {
    pub id: String,
    pub name: String,
    pub owner: String,
    pub hash: String,
    pub scopes: String,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

fn key_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<KeyRow> {
    Ok(KeyRow {
        id: row.get(0)?,
        name: row.get(1)?,
        owner: row.get(2)?,
        hash: row.get(3)?,
        scopes: row.get(4)?,
        created_at: row.get(5)?,
        last_used_at: row.get(6)?,
        revoked_at: row.get(7)?,
    })
}

/// Key queries.
impl Store {
    pub async fn insert_key(&self, row: KeyRow) -> Result<(), StoreError> {
        self.call(move |conn| {
            conn.execute(
                "INSERT INTO keys (id, name, owner, hash, scopes, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![row.id, row.name, row.owner, row.hash, row.scopes, row.created_at],
            )
            .map(|_| ())
        })
        .await
    }

    pub fn insert_key_blocking(&self, row: KeyRow) -> Result<(), StoreError> {
        self.call_blocking(move |conn| {
            conn.execute(
                "INSERT INTO keys (id, name, owner, hash, scopes, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![row.id, row.name, row.owner, row.hash, row.scopes, row.created_at],
            )
            .map(|_| ())
        })
    }

    pub async fn keys(&self) -> Result<Vec<KeyRow>, StoreError> {
        self.call(|conn| {
            let mut stmt = conn.prepare(
                "SELECT id, name, owner, hash, scopes, created_at, last_used_at, revoked_at FROM keys ORDER BY created_at, id",
            )?;
            let rows = stmt.query_map([], key_from_row)?.collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
        .await
    }

    pub fn keys_blocking(&self) -> Result<Vec<KeyRow>, StoreError> {
        self.call_blocking(|conn| {
            let mut stmt = conn.prepare(
                "SELECT id, name, owner, hash, scopes, created_at, last_used_at, revoked_at FROM keys ORDER BY created_at, id",
            )?;
            let rows = stmt.query_map([], key_from_row)?.collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    /// Revoke a key; returns whether it existed and was not revoked yet.
    pub async fn revoke_key(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_string();
        self.call(move |conn| {
            conn.execute(
                "UPDATE keys SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
                params![id, now_ms()],
            )
            .map(|n| n > 0)
        })
        .await
    }

    pub fn revoke_key_blocking(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_string();
        self.call_blocking(move |conn| {
            conn.execute(
                "UPDATE keys SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
                params![id, now_ms()],
            )
            .map(|n| n > 0)
        })
    }

    pub async fn touch_key(&self, id: &str, at: i64) -> Result<(), StoreError> {
        let id = id.to_string();
        self.call(move |conn| {
            conn.execute(
                "UPDATE keys SET last_used_at = ?2 WHERE id = ?1",
                params![id, at],
            )
            .map(|_| ())
        })
        .await
    }
}

/// Template queries (a mirror of the template store's metadata).
impl Store {
    pub async fn put_template(
        &self,
        name: &str,
        kind: &str,
        source: &str,
        created_at: i64,
        meta: String,
    ) -> Result<(), StoreError> {
        let (name, kind, source) = (name.to_string(), kind.to_string(), source.to_string());
        self.call(move |conn| {
            conn.execute(
                "INSERT INTO templates (name, kind, source, created_at, meta) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(name) DO UPDATE SET kind = ?2, source = ?3, created_at = ?4, meta = ?5",
                params![name, kind, source, created_at, meta],
            )
            .map(|_| ())
        })
        .await
    }

    pub async fn delete_template(&self, name: &str) -> Result<(), StoreError> {
        let name = name.to_string();
        self.call(move |conn| {
            conn.execute("DELETE FROM templates WHERE name = ?1", [name])
                .map(|_| ())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str) -> SandboxRow {
        SandboxRow {
            id: id.into(),
            owner: "alice".into(),
            state: "starting".into(),
            reason: None,
            template: "host".into(),
            backend: "namespace".into(),
            spec: "{}".into(),
            record: None,
            labels: "{}".into(),
            metadata: "{}".into(),
            created_at: now_ms(),
            started_at: None,
            stopped_at: None,
            expires_at: None,
        }
    }

    #[tokio::test]
    async fn sandbox_rows_and_transitions() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("cove.db")).unwrap();
        store.insert_sandbox(row("sbx-aaaaaaaa")).await.unwrap();
        store
            .set_state("sbx-aaaaaaaa", "running", None, Some("{\"pid\":1}".into()))
            .await
            .unwrap();
        let got = store.get_sandbox("sbx-aaaaaaaa").await.unwrap().unwrap();
        assert_eq!(got.state, "running");
        assert!(got.started_at.is_some());
        assert_eq!(got.record.as_deref(), Some("{\"pid\":1}"));
        assert_eq!(store.live_sandboxes_blocking().unwrap().len(), 1);
        store
            .set_state("sbx-aaaaaaaa", "stopped", Some("deleted".into()), None)
            .await
            .unwrap();
        assert!(store.live_sandboxes_blocking().unwrap().is_empty());
        assert_eq!(
            store
                .ended_sandboxes(Some("alice".into()))
                .await
                .unwrap()
                .len(),
            1
        );
        assert_eq!(
            store
                .ended_sandboxes(Some("bob".into()))
                .await
                .unwrap()
                .len(),
            0
        );
        // Re-opening keeps the data and does not re-run migrations.
        drop(store);
        let store = Store::open(&dir.path().join("cove.db")).unwrap();
        assert_eq!(
            store
                .get_sandbox("sbx-aaaaaaaa")
                .await
                .unwrap()
                .unwrap()
                .reason
                .as_deref(),
            Some("deleted")
        );
    }

    #[tokio::test]
    async fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cove.db");
        drop(Store::open(&path).unwrap());
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        assert!(matches!(
            Store::open(&path),
            Err(StoreError::TooNew { found: 99, .. })
        ));
    }
}

/// A machine row (see migration 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineRow {
    pub id: String,
    pub kind: String,
    pub owner: String,
    pub name: String,
    pub spec: String,
    /// `pending`, `stopped` or `terminated` while no sandbox runs for it;
    /// `started` while one may.
    pub status: String,
    pub reason: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

fn machine_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<MachineRow> {
    Ok(MachineRow {
        id: row.get(0)?,
        kind: row.get(1)?,
        owner: row.get(2)?,
        name: row.get(3)?,
        spec: row.get(4)?,
        status: row.get(5)?,
        reason: row.get(6)?,
        created_at: row.get(7)?,
        updated_at: row.get(8)?,
    })
}

const MACHINE_COLUMNS: &str = "id, kind, owner, name, spec, status, reason, created_at, updated_at";

/// Machine queries.
impl Store {
    /// Insert a machine; `Ok(false)` when its name is taken for this owner.
    pub async fn insert_machine(&self, row: MachineRow) -> Result<bool, StoreError> {
        self.call(move |conn| {
            match conn.execute(
                &format!("INSERT INTO machines ({MACHINE_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"),
                params![row.id, row.kind, row.owner, row.name, row.spec, row.status, row.reason, row.created_at, row.updated_at],
            ) {
                Ok(_) => Ok(true),
                Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == rusqlite::ErrorCode::ConstraintViolation => Ok(false),
                Err(e) => Err(e),
            }
        })
        .await
    }

    pub async fn get_machine(
        &self,
        kind: &str,
        id: &str,
    ) -> Result<Option<MachineRow>, StoreError> {
        let (kind, id) = (kind.to_string(), id.to_string());
        self.call(move |conn| {
            conn.query_row(
                &format!("SELECT {MACHINE_COLUMNS} FROM machines WHERE kind = ?1 AND id = ?2"),
                [kind, id],
                machine_from_row,
            )
            .optional()
        })
        .await
    }

    pub async fn machines(
        &self,
        kind: &str,
        owner: Option<String>,
    ) -> Result<Vec<MachineRow>, StoreError> {
        let kind = kind.to_string();
        self.call(move |conn| {
            let mut stmt = conn.prepare(&format!(
                "SELECT {MACHINE_COLUMNS} FROM machines WHERE kind = ?1 AND (?2 IS NULL OR owner = ?2) ORDER BY created_at, id"
            ))?;
            let rows = stmt.query_map(params![kind, owner], machine_from_row)?.collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
        .await
    }

    pub async fn set_machine_status(
        &self,
        id: &str,
        status: &str,
        reason: Option<String>,
    ) -> Result<(), StoreError> {
        let (id, status) = (id.to_string(), status.to_string());
        self.call(move |conn| {
            conn.execute(
                "UPDATE machines SET status = ?2, reason = ?3, updated_at = ?4 WHERE id = ?1",
                params![id, status, reason, now_ms()],
            )
            .map(|_| ())
        })
        .await
    }

    pub async fn delete_machine(&self, id: &str) -> Result<(), StoreError> {
        let id = id.to_string();
        self.call(move |conn| {
            conn.execute("DELETE FROM machines WHERE id = ?1", [id.clone()])?;
            conn.execute(
                "DELETE FROM sandboxes WHERE id = ?1 AND state IN ('stopped', 'failed')",
                [id],
            )
            .map(|_| ())
        })
        .await
    }
}
