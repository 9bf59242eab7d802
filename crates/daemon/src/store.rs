//! The daemon's durable state: VM definitions, their last known state and their event logs,
//! in SQLite under the data directory.
//!
//! The schema evolves by numbered, append-only migrations ([`MIGRATIONS`]); `PRAGMA
//! user_version` records how many are applied. Never edit a migration that has shipped: add one.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use ferro_api::rest::{RestartPolicy, VmEvent, VmState};
use ferro_api::VmConfig;
use rusqlite::{params, Connection, OptionalExtension, Transaction};

use crate::error::DaemonError;

/// Schema migrations, in order; migration `i` moves the schema from version `i` to `i + 1`.
pub const MIGRATIONS: &[&str] = &[
    // 1: VMs and their events.
    "CREATE TABLE vms (
        name TEXT PRIMARY KEY,
        config TEXT NOT NULL,
        restart TEXT NOT NULL,
        state TEXT NOT NULL,
        pid INTEGER,
        pid_start INTEGER,
        restarts INTEGER NOT NULL DEFAULT 0,
        created_ms INTEGER NOT NULL
    );
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        vm TEXT NOT NULL,
        at_ms INTEGER NOT NULL,
        kind TEXT NOT NULL,
        message TEXT NOT NULL
    );
    CREATE INDEX events_vm ON events (vm, id);",
    // 2: the image store; each row's `data` is the API's `Image` as JSON.
    "CREATE TABLE images (
        name TEXT PRIMARY KEY,
        data TEXT NOT NULL,
        created_ms INTEGER NOT NULL
    );",
    // 3: templates; each row's `data` is the API's `Template` as JSON.
    "CREATE TABLE templates (
        name TEXT PRIMARY KEY,
        data TEXT NOT NULL,
        created_ms INTEGER NOT NULL
    );",
    // 4: NICs: each one's MAC and, on the daemon's bridge, its tap and pool address, unique
    // across VMs.
    "CREATE TABLE nics (
        vm TEXT NOT NULL,
        idx INTEGER NOT NULL,
        mac TEXT NOT NULL UNIQUE,
        tap TEXT UNIQUE,
        ip TEXT UNIQUE,
        PRIMARY KEY (vm, idx)
    );",
    // 5: disk snapshots (external qcow2 overlays); see `snapshots.rs`.
    crate::snapshots::MIGRATION,
];

/// One VM as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmRecord {
    /// Unique name.
    pub name: String,
    /// What the VMM runs (the serial setting is replaced at start).
    pub config: VmConfig,
    /// Restart policy.
    pub restart: RestartPolicy,
    /// Last known state.
    pub state: VmState,
    /// The VMM's pid and its start time (clock ticks since boot) while one runs.
    pub pid: Option<(u32, u64)>,
    /// Automatic restarts so far.
    pub restarts: u32,
    /// Creation time, Unix ms.
    pub created_ms: u64,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The database.
pub struct Store {
    conn: Connection,
}

fn corrupt(what: &str) -> DaemonError {
    DaemonError::Store(rusqlite::Error::InvalidColumnType(
        0,
        what.to_string(),
        rusqlite::types::Type::Text,
    ))
}

fn row_to_record(row: &rusqlite::Row<'_>) -> rusqlite::Result<(VmRecordRaw,)> {
    Ok((VmRecordRaw {
        name: row.get(0)?,
        config: row.get(1)?,
        restart: row.get(2)?,
        state: row.get(3)?,
        pid: row.get(4)?,
        pid_start: row.get(5)?,
        restarts: row.get(6)?,
        created_ms: row.get(7)?,
    },))
}

struct VmRecordRaw {
    name: String,
    config: String,
    restart: String,
    state: String,
    pid: Option<i64>,
    pid_start: Option<i64>,
    restarts: i64,
    created_ms: i64,
}

impl VmRecordRaw {
    fn decode(self) -> Result<VmRecord, DaemonError> {
        let config: VmConfig =
            serde_json::from_str(&self.config).map_err(|_| corrupt("vms.config"))?;
        Ok(VmRecord {
            restart: self.restart.parse().map_err(|_| corrupt("vms.restart"))?,
            state: VmState::parse(&self.state).ok_or_else(|| corrupt("vms.state"))?,
            pid: match (self.pid, self.pid_start) {
                (Some(p), Some(s)) => Some((
                    u32::try_from(p).map_err(|_| corrupt("vms.pid"))?,
                    u64::try_from(s).map_err(|_| corrupt("vms.pid_start"))?,
                )),
                _ => None,
            },
            restarts: u32::try_from(self.restarts).unwrap_or(u32::MAX),
            created_ms: u64::try_from(self.created_ms).unwrap_or(0),
            name: self.name,
            config,
        })
    }
}

const SELECT: &str =
    "SELECT name, config, restart, state, pid, pid_start, restarts, created_ms FROM vms";

impl Store {
    /// Opens (creating) `path` and applies pending migrations.
    pub fn open(path: &Path) -> Result<Self, DaemonError> {
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        migrate(&mut conn)?;
        Ok(Self { conn })
    }

    /// The connection, for the modules that keep their own tables (`images`).
    pub(crate) fn conn(&self) -> &Connection {
        &self.conn
    }

    /// Applied migrations.
    pub fn schema_version(&self) -> Result<u32, DaemonError> {
        Ok(self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?)
    }

    /// Runs `f` in one transaction: everything or nothing.
    pub fn transaction<T>(
        &mut self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, DaemonError>,
    ) -> Result<T, DaemonError> {
        let tx = self.conn.transaction()?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }

    /// Every VM, by name.
    pub fn list(&self) -> Result<Vec<VmRecord>, DaemonError> {
        let mut st = self.conn.prepare(&format!("{SELECT} ORDER BY name"))?;
        let rows = st.query_map([], row_to_record)?;
        rows.map(|r| r?.0.decode()).collect()
    }

    /// One VM.
    pub fn get(&self, name: &str) -> Result<VmRecord, DaemonError> {
        self.conn
            .query_row(&format!("{SELECT} WHERE name = ?1"), [name], row_to_record)
            .optional()?
            .ok_or_else(|| DaemonError::NotFound(name.to_string()))?
            .0
            .decode()
    }

    /// Records the state, pid and restart count of a VM.
    pub fn set_state(
        &self,
        name: &str,
        state: VmState,
        pid: Option<(u32, u64)>,
    ) -> Result<(), DaemonError> {
        self.conn.execute(
            "UPDATE vms SET state = ?2, pid = ?3, pid_start = ?4 WHERE name = ?1",
            params![
                name,
                state.as_str(),
                pid.map(|p| i64::from(p.0)),
                pid.map(|p| i64::try_from(p.1).unwrap_or(i64::MAX))
            ],
        )?;
        Ok(())
    }

    /// Adds one to a VM's restart count.
    pub fn count_restart(&self, name: &str) -> Result<(), DaemonError> {
        self.conn.execute(
            "UPDATE vms SET restarts = restarts + 1 WHERE name = ?1",
            [name],
        )?;
        Ok(())
    }

    /// Appends to a VM's event log.
    pub fn event(&self, vm: &str, kind: &str, message: &str) -> Result<(), DaemonError> {
        insert_event(&self.conn, vm, kind, message)
    }

    /// A VM's event log, oldest first.
    pub fn events(&self, vm: &str) -> Result<Vec<VmEvent>, DaemonError> {
        let mut st = self
            .conn
            .prepare("SELECT at_ms, kind, message FROM events WHERE vm = ?1 ORDER BY id")?;
        let rows = st.query_map([vm], |r| {
            Ok(VmEvent {
                at_ms: u64::try_from(r.get::<_, i64>(0)?).unwrap_or(0),
                kind: r.get(1)?,
                message: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

/// Inserts a new VM (fails with [`DaemonError::Exists`] on a duplicate name).
pub fn insert_vm(tx: &Transaction<'_>, rec: &VmRecord) -> Result<(), DaemonError> {
    let config =
        serde_json::to_string(&rec.config).map_err(|e| DaemonError::BadRequest(e.to_string()))?;
    let r = tx.execute(
        "INSERT INTO vms (name, config, restart, state, restarts, created_ms)
         VALUES (?1, ?2, ?3, ?4, 0, ?5)",
        params![
            rec.name,
            config,
            rec.restart.as_str(),
            rec.state.as_str(),
            i64::try_from(rec.created_ms).unwrap_or(0)
        ],
    );
    match r {
        Err(rusqlite::Error::SqliteFailure(e, _))
            if e.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            Err(DaemonError::Exists(rec.name.clone()))
        }
        other => other.map(|_| ()).map_err(DaemonError::from),
    }
}

/// Replaces a VM's config and restart policy.
pub fn update_vm(tx: &Transaction<'_>, rec: &VmRecord) -> Result<(), DaemonError> {
    let config =
        serde_json::to_string(&rec.config).map_err(|e| DaemonError::BadRequest(e.to_string()))?;
    tx.execute(
        "UPDATE vms SET config = ?2, restart = ?3 WHERE name = ?1",
        params![rec.name, config, rec.restart.as_str()],
    )?;
    Ok(())
}

/// Deletes a VM and its events.
pub fn delete_vm(tx: &Transaction<'_>, name: &str) -> Result<(), DaemonError> {
    tx.execute("DELETE FROM events WHERE vm = ?1", [name])?;
    tx.execute("DELETE FROM nics WHERE vm = ?1", [name])?;
    tx.execute("DELETE FROM vms WHERE name = ?1", [name])?;
    Ok(())
}

/// Appends an event inside a transaction or on the connection.
pub fn insert_event(
    conn: &Connection,
    vm: &str,
    kind: &str,
    message: &str,
) -> Result<(), DaemonError> {
    conn.execute(
        "INSERT INTO events (vm, at_ms, kind, message) VALUES (?1, ?2, ?3, ?4)",
        params![vm, i64::try_from(now_ms()).unwrap_or(0), kind, message],
    )?;
    Ok(())
}

fn migrate(conn: &mut Connection) -> Result<(), DaemonError> {
    let have: u32 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let have = usize::try_from(have).unwrap_or(usize::MAX);
    if have > MIGRATIONS.len() {
        return Err(DaemonError::BadRequest(format!(
            "the database has schema version {have}, newer than this daemon knows ({}): use a newer ferro",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(have) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i + 1)?;
        tx.commit()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(name: &str) -> VmRecord {
        VmRecord {
            name: name.into(),
            config: VmConfig::new("/k"),
            restart: RestartPolicy::OnFailure,
            state: VmState::Stopped,
            pid: None,
            restarts: 0,
            created_ms: 1,
        }
    }

    #[test]
    fn crud_and_transactions() {
        let dir = std::env::temp_dir().join(format!("ferro-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = Store::open(&dir.join("db")).unwrap();
        assert_eq!(s.schema_version().unwrap() as usize, MIGRATIONS.len());
        s.transaction(|tx| insert_vm(tx, &rec("a"))).unwrap();
        assert!(matches!(
            s.transaction(|tx| insert_vm(tx, &rec("a"))),
            Err(DaemonError::Exists(_))
        ));
        // A failure after the insert leaves nothing.
        let r: Result<(), _> = s.transaction(|tx| {
            insert_vm(tx, &rec("b"))?;
            Err(DaemonError::BadRequest("no".into()))
        });
        assert!(r.is_err());
        assert_eq!(s.list().unwrap().len(), 1);
        s.set_state("a", VmState::Running, Some((42, 7))).unwrap();
        s.count_restart("a").unwrap();
        s.event("a", "started", "x").unwrap();
        let a = s.get("a").unwrap();
        assert_eq!(
            (a.state, a.pid, a.restarts),
            (VmState::Running, Some((42, 7)), 1)
        );
        assert_eq!(s.events("a").unwrap()[0].kind, "started");
        drop(s);
        // Reopening applies nothing twice.
        let mut s = Store::open(&dir.join("db")).unwrap();
        s.transaction(|tx| delete_vm(tx, "a")).unwrap();
        assert!(matches!(s.get("a"), Err(DaemonError::NotFound(_))));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
