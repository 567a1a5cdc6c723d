//! The cache file: an SQLite database in WAL mode, results stored in chunks.
//!
//! One row of `chunks` holds the results one flush wrote for one function: their keys (32
//! bytes each, back to back), the end offset of each record (`u32` little-endian), the records
//! themselves, and a BLAKE3 checksum of ends and records. A row per chunk rather than per
//! result is what makes storing a million tiny results cost milliseconds: SQLite's cost is
//! per row. See docs/MEMORY.md for the layout and the crash guarantees.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};

use crate::Error;

/// The schema's version, in `PRAGMA user_version`: a file of another version is refused.
pub(crate) const SCHEMA_VERSION: i64 = 1;

/// How long a connection waits for another process's write lock before it gives up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(60);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS functions (
    id INTEGER PRIMARY KEY,
    key BLOB NOT NULL UNIQUE,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    args_type TEXT NOT NULL,
    output_type TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    function INTEGER NOT NULL REFERENCES functions(id),
    count INTEGER NOT NULL,
    keys BLOB NOT NULL,
    ends BLOB NOT NULL,
    records BLOB NOT NULL,
    bytes INTEGER NOT NULL,
    checksum BLOB NOT NULL,
    created_ms INTEGER NOT NULL,
    last_used_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_by_function ON chunks(function, id);
CREATE INDEX IF NOT EXISTS chunks_by_use ON chunks(last_used_ms);
";

/// Opens (creating if needed) the cache file, in WAL mode with the schema in place.
pub(crate) fn open(path: &Path) -> Result<Connection, Error> {
    let open_error = |source| Error::Open {
        path: path.to_path_buf(),
        source,
    };
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(open_error)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(open_error)?;
    let refuse = |reason: String| Error::Refused {
        path: path.to_path_buf(),
        reason,
    };
    // SQLite opens a file it cannot write read-only, without a word: every result would then
    // be computed and none stored.
    if conn.is_readonly(rusqlite::MAIN_DB).map_err(open_error)? {
        return Err(refuse(
            "the file cannot be written (check its permissions, and those of its folder and \
             of FILE-wal and FILE-shm beside it)"
                .into(),
        ));
    }
    // A database of something else is left alone (switching it to WAL mode and adding
    // tables would change another program's file): parjob makes its tables and sets its
    // schema version in one transaction, so a file at version 0 with tables is not one of
    // its own, even one being made by another process right now (both read in one snapshot).
    let (version, application, objects) = (|| {
        let tx = conn.unchecked_transaction()?;
        let version: i64 = tx.query_row("PRAGMA user_version", [], |row| row.get(0))?;
        let application: i64 = tx.query_row("PRAGMA application_id", [], |row| row.get(0))?;
        let objects: Vec<String> = tx
            .prepare("SELECT name FROM sqlite_master ORDER BY name")?
            .query_map([], |row| row.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        tx.commit()?;
        Ok((version, application, objects))
    })()
    .map_err(open_error)?;
    if version != 0 && version != SCHEMA_VERSION {
        return Err(refuse(format!(
            "its schema is version {version}, this parjob reads version {SCHEMA_VERSION}; \
             use another file, or delete this one"
        )));
    }
    let ours = |name: &String| {
        matches!(
            name.as_str(),
            "functions" | "chunks" | "sqlite_sequence" | "chunks_by_function" | "chunks_by_use"
        ) || name.starts_with("sqlite_") // SQLite's own: autoindexes, ANALYZE's statistics
    };
    let foreign = objects.iter().any(|name| !ours(name));
    let has_ours = ["functions", "chunks"]
        .iter()
        .all(|table| objects.iter().any(|name| name == table));
    let another_program = application != 0
        || foreign
        || (version == SCHEMA_VERSION && !has_ours)
        || (version == 0 && !objects.is_empty());
    if another_program {
        let what = if objects.is_empty() {
            format!("its application id is {application}")
        } else {
            format!(
                "it holds {}",
                objects
                    .iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        return Err(refuse(format!(
            "it is an SQLite database of another program ({what}), not a cache made by \
             parjob::Memory; use another file"
        )));
    }
    // Big pages for a new file (an existing one keeps its own): a chunk is one blob of
    // megabytes, written as a chain of pages, each with its own frame in the log, its own
    // checksum and its own write; 64 KiB pages make a sixteenth of them.
    conn.execute_batch("PRAGMA page_size=65536")
        .map_err(open_error)?;
    // WAL: readers never block the writer, and a commit is one append to the log. NORMAL
    // synchronous: a commit survives a crash of the process (SIGKILL) at once, and a power
    // loss from the next checkpoint on; never a corrupt file.
    //
    // Changing the journal mode needs the file to itself, and SQLite answers SQLITE_BUSY at
    // once (without its busy handler) while another process is opening or writing the same
    // new file: asked again, with short pauses, within the same time limit.
    let mode: String =
        retry_while_busy(|| conn.query_row("PRAGMA journal_mode=WAL", [], |row| row.get(0)))
            .map_err(open_error)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(refuse(format!(
            "the file refuses WAL mode (journal mode {mode})"
        )));
    }
    conn.execute_batch("PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=OFF;")
        .map_err(open_error)?;
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(open_error)?;
    if version != 0 && version != SCHEMA_VERSION {
        return Err(refuse(format!(
            "its schema is version {version}, this parjob reads version {SCHEMA_VERSION}; \
             use another file, or delete this one"
        )));
    }
    if version == 0 {
        let tx = immediate(&conn).map_err(open_error)?;
        tx.execute_batch(SCHEMA).map_err(open_error)?;
        tx.execute_batch(&format!("PRAGMA user_version={SCHEMA_VERSION}"))
            .map_err(open_error)?;
        tx.commit().map_err(open_error)?;
    } else {
        // A write lock taken and given back writes nothing, but needs the WAL index
        // (`FILE-shm`) writable: SQLite opens one this user cannot write (another user made it
        // first) read-only without a word, and then every write fails, so every run would
        // compute everything and store nothing. Asked without waiting: SQLite answers
        // SQLITE_READONLY for a read-only index before it looks at the lock, so "busy"
        // (another process is writing, perhaps for long) means the index is writable, and an
        // open never waits behind a writer for this.
        conn.busy_timeout(std::time::Duration::ZERO)
            .map_err(open_error)?;
        let probe = immediate(&conn).and_then(|tx| tx.commit());
        conn.busy_timeout(BUSY_TIMEOUT).map_err(open_error)?;
        match probe {
            Ok(()) => {}
            Err(rusqlite::Error::SqliteFailure(e, _))
                if matches!(
                    e.code,
                    rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                ) => {}
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ReadOnly =>
            {
                return Err(refuse(
                    "its WAL index FILE-shm beside it cannot be written (another user's? \
                     check its owner and permissions; while no process uses the cache, deleting \
                     FILE-shm is safe: SQLite makes it again)"
                        .into(),
                ));
            }
            Err(other) => return Err(open_error(other)),
        }
    }
    Ok(conn)
}

/// Runs `step` again while SQLite says the file is busy or locked, for up to
/// [`BUSY_TIMEOUT`], pausing a little longer each time; then returns its last answer.
fn retry_while_busy<T>(mut step: impl FnMut() -> rusqlite::Result<T>) -> rusqlite::Result<T> {
    let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
    let mut pause = std::time::Duration::from_millis(1);
    loop {
        match step() {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if matches!(
                    e.code,
                    rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                ) && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_millis(50));
            }
            answer => return answer,
        }
    }
}

/// A write transaction that takes the write lock at once, so that it never has to give up
/// half way because another process wrote first.
pub(crate) fn immediate(conn: &Connection) -> rusqlite::Result<rusqlite::Transaction<'_>> {
    // `new_unchecked` takes `&Connection`: each connection lives in a Mutex and opens no
    // nested transaction.
    rusqlite::Transaction::new_unchecked(conn, TransactionBehavior::Immediate)
}

/// Milliseconds since the Unix epoch, for `created_ms` and `last_used_ms`.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// What the functions table knows about one function and version.
#[derive(Debug, Clone)]
pub(crate) struct FnMeta {
    pub(crate) key: [u8; 32],
    pub(crate) name: &'static str,
    pub(crate) version: String,
    pub(crate) args_type: &'static str,
    pub(crate) output_type: &'static str,
}

/// One chunk's results as they are written and read back.
#[derive(Debug, Default)]
pub(crate) struct ChunkData {
    /// The key of each record (empty while the chunk is being built: the builder keeps
    /// them). Lookups walk them in order to skip the index when results come back in the
    /// order they were stored.
    pub(crate) keys: Vec<[u8; 32]>,
    /// Where each record ends in `records`.
    pub(crate) ends: Vec<u32>,
    /// The records, back to back: a tag byte, then the value's or the failure's bytes.
    pub(crate) records: Vec<u8>,
}

impl ChunkData {
    /// Record `pos`, or `None` if there is no such record.
    pub(crate) fn record(&self, pos: usize) -> Option<&[u8]> {
        let end = *self.ends.get(pos)? as usize;
        let start = match pos {
            0 => 0,
            _ => *self.ends.get(pos - 1)? as usize,
        };
        self.records.get(start..end)
    }

    fn ends_bytes(&self) -> Vec<u8> {
        self.ends.iter().flat_map(|e| e.to_le_bytes()).collect()
    }

    fn checksum(ends: &[u8], records: &[u8]) -> [u8; 32] {
        let mut hasher = blake3::Hasher::new();
        hasher.update(&(ends.len() as u64).to_le_bytes());
        hasher.update(ends);
        hasher.update(records);
        *hasher.finalize().as_bytes()
    }
}

/// The id of a function's row, made if it is not there yet. Called inside a write
/// transaction.
pub(crate) fn function_id(tx: &Connection, meta: &FnMeta) -> rusqlite::Result<i64> {
    tx.prepare_cached(
        "INSERT OR IGNORE INTO functions (key, name, version, args_type, output_type) \
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![
        &meta.key[..],
        meta.name,
        meta.version,
        meta.args_type,
        meta.output_type
    ])?;
    tx.prepare_cached("SELECT id FROM functions WHERE key = ?1")?
        .query_row([&meta.key[..]], |row| row.get(0))
}

/// `PRAGMA data_version` of `conn`: it changes when another connection (of this process or
/// another) commits to the file.
pub(crate) fn data_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.prepare_cached("PRAGMA data_version")?
        .query_row([], |row| row.get(0))
}

/// The id of a function's row, if it has one.
pub(crate) fn find_function(conn: &Connection, key: &[u8; 32]) -> rusqlite::Result<Option<i64>> {
    conn.prepare_cached("SELECT id FROM functions WHERE key = ?1")?
        .query_row([&key[..]], |row| row.get(0))
        .optional()
}

/// Writes one chunk (inside a write transaction) and returns its id.
pub(crate) fn insert_chunk(
    tx: &Connection,
    function: i64,
    keys: &[[u8; 32]],
    data: &ChunkData,
    now: i64,
) -> rusqlite::Result<i64> {
    let ends = data.ends_bytes();
    let checksum = ChunkData::checksum(&ends, &data.records);
    // The keys as they lie in memory, back to back (collecting them byte by byte showed in
    // the writer's profile).
    let key_bytes: &[u8] = keys.as_flattened();
    let bytes = (key_bytes.len() + ends.len() + data.records.len()) as i64;
    tx.prepare_cached(
        "INSERT INTO chunks (function, count, keys, ends, records, bytes, checksum, created_ms, \
         last_used_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8)",
    )?
    .execute(params![
        function,
        keys.len() as i64,
        key_bytes,
        ends,
        &data.records,
        bytes,
        &checksum[..],
        now
    ])?;
    Ok(tx.last_insert_rowid())
}

/// How reading a chunk back went.
pub(crate) enum Fetched {
    /// Its records, checked against its checksum.
    Chunk(ChunkData),
    /// It is not there (evicted or cleared, maybe by another process).
    Gone,
    /// Its checksum does not match: it is treated as gone, and its results recomputed.
    Corrupt,
}

/// Reads a chunk's records.
pub(crate) fn fetch_chunk(conn: &Connection, id: i64) -> rusqlite::Result<Fetched> {
    let row = conn
        .prepare_cached("SELECT ends, records, checksum, keys FROM chunks WHERE id = ?1")?
        .query_row([id], |row| {
            Ok((
                row.get::<_, Vec<u8>>(0)?,
                row.get::<_, Vec<u8>>(1)?,
                row.get::<_, Vec<u8>>(2)?,
                row.get::<_, Vec<u8>>(3)?,
            ))
        })
        .optional()?;
    let Some((ends, records, checksum, key_bytes)) = row else {
        return Ok(Fetched::Gone);
    };
    if ends.len() % 4 != 0 || ChunkData::checksum(&ends, &records)[..] != checksum[..] {
        return Ok(Fetched::Corrupt);
    }
    let ends: Vec<u32> = ends
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let consistent = ends.windows(2).all(|w| w[0] <= w[1])
        && ends.last().is_none_or(|&e| e as usize <= records.len());
    if !consistent {
        return Ok(Fetched::Corrupt);
    }
    // The keys are not under the checksum (the index is loaded from them as they are): a
    // damaged key only makes its result unreachable, as it does in the index.
    let keys = if key_bytes.len() == ends.len() * 32 {
        key_bytes
            .chunks_exact(32)
            .map(|k| {
                let mut key = [0u8; 32];
                key.copy_from_slice(k);
                key
            })
            .collect()
    } else {
        Vec::new()
    };
    Ok(Fetched::Chunk(ChunkData {
        keys,
        ends,
        records,
    }))
}

/// Ids of a function's chunks above `after`, in order.
pub(crate) fn chunk_ids_after(
    conn: &Connection,
    function: i64,
    after: i64,
) -> rusqlite::Result<Vec<i64>> {
    let mut stmt =
        conn.prepare_cached("SELECT id FROM chunks WHERE function = ?1 AND id > ?2 ORDER BY id")?;
    let ids = stmt.query_map([function, after], |row| row.get(0))?;
    ids.collect()
}

/// Every chunk in the file, and the highest id a chunk was ever given (ids are never reused:
/// one at or below it that is not in the list was deleted), read from one snapshot.
pub(crate) fn chunk_ids(conn: &Connection) -> rusqlite::Result<(FastIdSet, i64)> {
    let tx = conn.unchecked_transaction()?;
    let ids = tx
        .prepare_cached("SELECT id FROM chunks")?
        .query_map([], |row| row.get(0))?
        .collect::<rusqlite::Result<FastIdSet>>()?;
    let highest: i64 = tx
        .prepare_cached("SELECT seq FROM sqlite_sequence WHERE name = 'chunks'")?
        .query_row([], |row| row.get(0))
        .optional()?
        .unwrap_or(0);
    tx.commit()?;
    Ok((ids, highest))
}

/// A set of chunk ids.
pub(crate) type FastIdSet = std::collections::HashSet<i64>;

/// A chunk's keys (32 bytes each, back to back), if it is still there.
pub(crate) fn chunk_keys(conn: &Connection, id: i64) -> rusqlite::Result<Option<Vec<u8>>> {
    conn.prepare_cached("SELECT keys FROM chunks WHERE id = ?1")?
        .query_row([id], |row| row.get(0))
        .optional()
}

/// Marks chunks as used now (inside a write transaction), for least-recently-used eviction.
pub(crate) fn touch(tx: &Connection, ids: &[i64], now: i64) -> rusqlite::Result<()> {
    let mut stmt = tx.prepare_cached("UPDATE chunks SET last_used_ms = ?1 WHERE id = ?2")?;
    for id in ids {
        stmt.execute([now, *id])?;
    }
    Ok(())
}

/// Deletes least recently used chunks until the stored bytes are at most `limit` (inside a
/// write transaction). Returns the ids of the chunks it deleted.
pub(crate) fn evict(tx: &Connection, limit: u64) -> rusqlite::Result<Vec<i64>> {
    let total: i64 = tx.query_row("SELECT COALESCE(SUM(bytes), 0) FROM chunks", [], |row| {
        row.get(0)
    })?;
    let mut excess = total.saturating_sub(i64::try_from(limit).unwrap_or(i64::MAX));
    if excess <= 0 {
        return Ok(Vec::new());
    }
    let mut victims = Vec::new();
    {
        let mut stmt =
            tx.prepare_cached("SELECT id, bytes FROM chunks ORDER BY last_used_ms, id")?;
        let mut rows = stmt.query([])?;
        while excess > 0 {
            let Some(row) = rows.next()? else { break };
            let (id, bytes): (i64, i64) = (row.get(0)?, row.get(1)?);
            victims.push(id);
            excess -= bytes;
        }
    }
    let mut delete = tx.prepare_cached("DELETE FROM chunks WHERE id = ?1")?;
    for id in &victims {
        delete.execute([*id])?;
    }
    Ok(victims)
}

/// Stored entries, bytes and chunks.
pub(crate) fn totals(conn: &Connection) -> rusqlite::Result<(u64, u64, u64)> {
    conn.query_row(
        "SELECT COALESCE(SUM(count), 0), COALESCE(SUM(bytes), 0), COUNT(*) FROM chunks",
        [],
        |row| {
            let get = |i| row.get::<_, i64>(i).map(|v| u64::try_from(v).unwrap_or(0));
            Ok((get(0)?, get(1)?, get(2)?))
        },
    )
}

/// Deletes every chunk and function.
pub(crate) fn clear_all(conn: &Connection) -> rusqlite::Result<()> {
    let tx = immediate(conn)?;
    tx.execute_batch("DELETE FROM chunks; DELETE FROM functions;")?;
    tx.commit()
}

/// Deletes the chunks of every version of the function named `name`.
pub(crate) fn clear_function(conn: &Connection, name: &str) -> rusqlite::Result<usize> {
    let tx = immediate(conn)?;
    let deleted = tx.execute(
        "DELETE FROM chunks WHERE function IN (SELECT id FROM functions WHERE name = ?1)",
        [name],
    )?;
    tx.execute("DELETE FROM functions WHERE name = ?1", [name])?;
    tx.commit()?;
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Barrier};

    use super::SCHEMA_VERSION;
    use crate::Error;

    /// A new file gets 64 KiB pages (a chunk's blob is a sixteenth as many pages to log,
    /// checksum and write) and still goes to WAL mode; an existing file keeps its pages.
    #[test]
    fn a_new_file_has_big_pages_and_an_old_one_keeps_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new.sqlite");
        let conn = super::open(&path).unwrap();
        let page: i64 = conn
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .unwrap();
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!((page, mode.as_str()), (65536, "wal"));
        let old = dir.path().join("old.sqlite");
        {
            // A cache made before pages were big: parjob's schema on 4 KiB pages.
            let conn = rusqlite::Connection::open(&old).unwrap();
            conn.execute_batch("PRAGMA page_size=4096; PRAGMA journal_mode=WAL;")
                .unwrap();
            conn.execute_batch(super::SCHEMA).unwrap();
            conn.execute_batch(&format!("PRAGMA user_version={SCHEMA_VERSION}"))
                .unwrap();
        }
        let conn = super::open(&old).unwrap();
        let page: i64 = conn
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .unwrap();
        assert_eq!(page, 4096, "an existing file keeps its page size");
    }

    /// Another program's SQLite database is refused and left as it was: before, it was
    /// switched to WAL mode and got parjob's tables.
    #[test]
    fn another_programs_database_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        // A table; the same at parjob's schema version; only a view; only an application id.
        let setups = [
            ("CREATE TABLE customers(name TEXT);", "customers"),
            (
                "CREATE TABLE customers(name TEXT); PRAGMA user_version=1;",
                "customers",
            ),
            ("CREATE VIEW answer AS SELECT 42;", "answer"),
            ("PRAGMA application_id=1234;", "1234"),
        ];
        for (n, (setup, named)) in setups.into_iter().enumerate() {
            let path = dir.path().join(format!("shop-{n}.sqlite"));
            let objects = |conn: &rusqlite::Connection| -> i64 {
                conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
                    .unwrap()
            };
            let before = {
                let conn = rusqlite::Connection::open(&path).unwrap();
                conn.execute_batch(setup).unwrap();
                objects(&conn)
            };
            let error = super::open(&path).expect_err("refused");
            let text = error.to_string();
            assert!(
                matches!(error, Error::Refused { .. }) && text.contains(named),
                "{setup}: {text}"
            );
            let conn = rusqlite::Connection::open(&path).unwrap();
            let mode: String = conn
                .query_row("PRAGMA journal_mode", [], |r| r.get(0))
                .unwrap();
            assert_eq!(
                (mode.as_str(), objects(&conn)),
                ("delete", before),
                "{setup}"
            );
        }
    }

    /// Connections that open one new file at the same moment all get it: the switch to WAL
    /// mode, which SQLite refuses at once while another connection holds the file, is asked
    /// again rather than failing the open with "database is locked".
    #[test]
    fn connections_opening_one_new_file_at_once_all_succeed() {
        let dir = tempfile::tempdir().unwrap();
        for round in 0..20 {
            let path = dir.path().join(format!("cache-{round}.sqlite"));
            let start = Arc::new(Barrier::new(6));
            let openers: Vec<_> = (0..6)
                .map(|_| {
                    let (path, start) = (path.clone(), Arc::clone(&start));
                    std::thread::spawn(move || {
                        start.wait();
                        super::open(&path).map(|_| ())
                    })
                })
                .collect();
            for opener in openers {
                opener.join().unwrap().unwrap();
            }
        }
    }
}
