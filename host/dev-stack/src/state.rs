//! The emulator's durable state (builds, templates, sandboxes) in SQLite, so
//! registered templates survive a restart of the stack.

use std::path::Path;
use std::sync::Mutex;

use anyhow::{Context, Result};
use rusqlite::{Connection, params};
use serde::Serialize;

/// A prepared build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Build {
    /// `build-…`
    pub id: String,
    /// Namespace of the token that prepared it.
    pub namespace: String,
    /// Template name to register.
    pub name: String,
    /// `snap-…`
    pub snapshot_id: String,
    /// Where the snapshot must land (what the signer composes from the rel path).
    pub snapshot_uri: String,
    /// `base` or `diff`.
    pub node_kind: String,
    /// Parent manifest URI for diff builds.
    pub parent_manifest_uri: Option<String>,
    /// Register as public.
    pub public: bool,
    /// `prepared`, `completed`, or `failed` (see `failure`).
    pub state: String,
    /// Why the build failed, when the platform knows (e.g. the stack died while it was prepared).
    pub failure: Option<String>,
}

/// A multipart upload the signer created for a build (seen by the proxy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadRecord {
    /// S3's UploadId.
    pub upload_id: String,
    /// The build it belongs to.
    pub build_id: String,
    /// The object it writes.
    pub uri: String,
}

/// A registered template (what `complete` answers and lookups return).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Template {
    /// `tpl-…`
    pub id: String,
    /// Namespace that owns it.
    pub namespace: String,
    /// Lookup name.
    pub name: String,
    /// Snapshot id.
    pub snapshot_id: String,
    /// Snapshot object URI.
    pub snapshot_uri: String,
    /// Snapshot format.
    pub snapshot_format_version: String,
    /// Archive size.
    pub snapshot_size_bytes: u64,
    /// Rootfs disk size.
    pub rootfs_disk_bytes: u64,
    /// `base` or `diff`.
    pub rootfs_node_kind: String,
    /// Parent manifest for diff templates.
    pub parent_manifest_uri: Option<String>,
    /// sha256 of the archive, computed by the emulator at completion.
    pub snapshot_sha256: String,
    /// Public template.
    pub public: bool,
    /// Build that produced it.
    pub build_id: String,
}

/// The database.
pub struct State {
    db: Mutex<Connection>,
}

impl State {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let db = Connection::open(path).with_context(|| format!("open state database {}", path.display()))?;
        db.execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE IF NOT EXISTS builds (
               id TEXT PRIMARY KEY, namespace TEXT NOT NULL, name TEXT NOT NULL, snapshot_id TEXT NOT NULL,
               snapshot_uri TEXT NOT NULL, node_kind TEXT NOT NULL, parent_manifest_uri TEXT,
               public INTEGER NOT NULL, state TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS templates (
               id TEXT PRIMARY KEY, namespace TEXT NOT NULL, name TEXT NOT NULL, snapshot_id TEXT NOT NULL,
               snapshot_uri TEXT NOT NULL, snapshot_format_version TEXT NOT NULL, snapshot_size_bytes INTEGER NOT NULL,
               rootfs_disk_bytes INTEGER NOT NULL, rootfs_node_kind TEXT NOT NULL, parent_manifest_uri TEXT,
               snapshot_sha256 TEXT NOT NULL, public INTEGER NOT NULL, build_id TEXT NOT NULL,
               UNIQUE (namespace, name));
             CREATE TABLE IF NOT EXISTS sandboxes (
               id TEXT PRIMARY KEY, namespace TEXT NOT NULL, image TEXT, state TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS uploads (
               upload_id TEXT PRIMARY KEY, build_id TEXT NOT NULL, uri TEXT NOT NULL, state TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS images (
               namespace TEXT NOT NULL, digest TEXT NOT NULL, snapshot_uri TEXT NOT NULL,
               snapshot_sha256 TEXT NOT NULL, snapshot_size_bytes INTEGER NOT NULL,
               PRIMARY KEY (namespace, digest));",
        )
        .context("create the state schema")?;
        // Databases from before builds could fail gain the column.
        let has_failure: bool = db
            .prepare("SELECT 1 FROM pragma_table_info('builds') WHERE name = 'failure'")?
            .exists([])
            .context("read the builds schema")?;
        if !has_failure {
            db.execute_batch("ALTER TABLE builds ADD COLUMN failure TEXT").context("add builds.failure")?;
        }
        Ok(State { db: Mutex::new(db) })
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Next value of a named counter (ids stay unique across restarts).
    pub fn next_id(&self, name: &str) -> Result<u64> {
        let db = self.db();
        db.execute(
            "INSERT INTO counters (name, value) VALUES (?1, 1)
             ON CONFLICT(name) DO UPDATE SET value = value + 1",
            params![name],
        )
        .context("bump an id counter")?;
        let value: i64 = db.query_row("SELECT value FROM counters WHERE name = ?1", params![name], |r| r.get(0))?;
        Ok(value as u64)
    }

    /// Records a prepared build.
    pub fn insert_build(&self, build: &Build) -> Result<()> {
        self.db()
            .execute(
                "INSERT INTO builds (id, namespace, name, snapshot_id, snapshot_uri, node_kind, parent_manifest_uri, public, state)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    build.id,
                    build.namespace,
                    build.name,
                    build.snapshot_id,
                    build.snapshot_uri,
                    build.node_kind,
                    build.parent_manifest_uri,
                    build.public,
                    build.state
                ],
            )
            .with_context(|| format!("record build {}", build.id))?;
        Ok(())
    }

    fn builds_where(&self, condition: &str, args: impl rusqlite::Params) -> Result<Vec<Build>> {
        let db = self.db();
        let mut statement = db.prepare(&format!(
            "SELECT id, namespace, name, snapshot_id, snapshot_uri, node_kind, parent_manifest_uri, public, state, failure
             FROM builds WHERE {condition} ORDER BY id"
        ))?;
        let rows = statement.query_map(args, |r| {
            Ok(Build {
                id: r.get(0)?,
                namespace: r.get(1)?,
                name: r.get(2)?,
                snapshot_id: r.get(3)?,
                snapshot_uri: r.get(4)?,
                node_kind: r.get(5)?,
                parent_manifest_uri: r.get(6)?,
                public: r.get(7)?,
                state: r.get(8)?,
                failure: r.get(9)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<Build>>>()?)
    }

    /// A build by id.
    pub fn build(&self, id: &str) -> Result<Option<Build>> {
        Ok(self.builds_where("id = ?1", params![id]).with_context(|| format!("read build {id}"))?.pop())
    }

    /// The build whose snapshot goes to `uri`.
    pub fn build_by_snapshot_uri(&self, uri: &str) -> Result<Option<Build>> {
        Ok(self
            .builds_where("snapshot_uri = ?1", params![uri])
            .with_context(|| format!("find the build of {uri}"))?
            .pop())
    }

    /// Builds prepared and neither completed nor failed.
    pub fn prepared_builds(&self) -> Result<Vec<Build>> {
        self.builds_where("state = 'prepared'", []).context("list prepared builds")
    }

    /// Marks a prepared build failed, saying why.
    pub fn fail_build(&self, id: &str, failure: &str) -> Result<()> {
        self.db()
            .execute(
                "UPDATE builds SET state = 'failed', failure = ?2 WHERE id = ?1 AND state = 'prepared'",
                params![id, failure],
            )
            .with_context(|| format!("mark build {id} failed"))?;
        Ok(())
    }

    /// Records a multipart upload created for a build.
    pub fn record_upload(&self, upload: &UploadRecord) -> Result<()> {
        self.db()
            .execute(
                "INSERT INTO uploads (upload_id, build_id, uri, state) VALUES (?1, ?2, ?3, 'open')
                 ON CONFLICT(upload_id) DO NOTHING",
                params![upload.upload_id, upload.build_id, upload.uri],
            )
            .with_context(|| format!("record upload {} of build {}", upload.upload_id, upload.build_id))?;
        Ok(())
    }

    /// The uploads of a build not yet closed (completed or aborted).
    pub fn open_uploads(&self, build_id: &str) -> Result<Vec<UploadRecord>> {
        let db = self.db();
        let mut statement =
            db.prepare("SELECT upload_id, build_id, uri FROM uploads WHERE build_id = ?1 AND state = 'open'")?;
        let rows = statement.query_map(params![build_id], |r| {
            Ok(UploadRecord { upload_id: r.get(0)?, build_id: r.get(1)?, uri: r.get(2)? })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<UploadRecord>>>()?)
    }

    /// Closes an upload (`completed` or `aborted`).
    pub fn close_upload(&self, upload_id: &str, state: &str) -> Result<()> {
        self.db()
            .execute("UPDATE uploads SET state = ?2 WHERE upload_id = ?1", params![upload_id, state])
            .with_context(|| format!("close upload {upload_id}"))?;
        Ok(())
    }

    /// Marks the build completed and registers its template, atomically;
    /// false when the build was already completed.
    pub fn complete(&self, build_id: &str, template: &Template) -> Result<bool> {
        let mut db = self.db();
        let tx = db.transaction().context("begin completion")?;
        let changed = tx
            .execute("UPDATE builds SET state = 'completed' WHERE id = ?1 AND state = 'prepared'", params![build_id])?;
        if changed == 0 {
            return Ok(false);
        }
        tx.execute("UPDATE uploads SET state = 'completed' WHERE build_id = ?1 AND state = 'open'", params![build_id])?;
        tx.execute(
            "INSERT INTO templates (id, namespace, name, snapshot_id, snapshot_uri, snapshot_format_version,
               snapshot_size_bytes, rootfs_disk_bytes, rootfs_node_kind, parent_manifest_uri, snapshot_sha256, public, build_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
             ON CONFLICT(namespace, name) DO UPDATE SET id = excluded.id, snapshot_id = excluded.snapshot_id,
               snapshot_uri = excluded.snapshot_uri, snapshot_format_version = excluded.snapshot_format_version,
               snapshot_size_bytes = excluded.snapshot_size_bytes, rootfs_disk_bytes = excluded.rootfs_disk_bytes,
               rootfs_node_kind = excluded.rootfs_node_kind, parent_manifest_uri = excluded.parent_manifest_uri,
               snapshot_sha256 = excluded.snapshot_sha256, public = excluded.public, build_id = excluded.build_id",
            params![
                template.id,
                template.namespace,
                template.name,
                template.snapshot_id,
                template.snapshot_uri,
                template.snapshot_format_version,
                template.snapshot_size_bytes as i64,
                template.rootfs_disk_bytes as i64,
                template.rootfs_node_kind,
                template.parent_manifest_uri,
                template.snapshot_sha256,
                template.public,
                template.build_id
            ],
        )?;
        tx.commit().context("commit completion")?;
        Ok(true)
    }

    /// The first template matching `condition`; `what` names it in errors.
    fn template_where(&self, condition: &str, args: impl rusqlite::Params, what: &str) -> Result<Option<Template>> {
        Ok(self.templates_where(&format!("{condition} LIMIT 1"), args, what)?.pop())
    }

    /// The templates matching `condition` (which may order and limit them).
    fn templates_where(&self, condition: &str, args: impl rusqlite::Params, what: &str) -> Result<Vec<Template>> {
        let sql = format!(
            "SELECT id, namespace, name, snapshot_id, snapshot_uri, snapshot_format_version, snapshot_size_bytes,
               rootfs_disk_bytes, rootfs_node_kind, parent_manifest_uri, snapshot_sha256, public, build_id
             FROM templates WHERE {condition}"
        );
        let db = self.db();
        let mut statement = db.prepare(&sql).with_context(|| format!("look up templates {what}"))?;
        let rows = statement
            .query_map(args, |r| {
                Ok(Template {
                    id: r.get(0)?,
                    namespace: r.get(1)?,
                    name: r.get(2)?,
                    snapshot_id: r.get(3)?,
                    snapshot_uri: r.get(4)?,
                    snapshot_format_version: r.get(5)?,
                    snapshot_size_bytes: r.get::<_, i64>(6)? as u64,
                    rootfs_disk_bytes: r.get::<_, i64>(7)? as u64,
                    rootfs_node_kind: r.get(8)?,
                    parent_manifest_uri: r.get(9)?,
                    snapshot_sha256: r.get(10)?,
                    public: r.get(11)?,
                    build_id: r.get(12)?,
                })
            })
            .with_context(|| format!("look up templates {what}"))?;
        rows.collect::<rusqlite::Result<Vec<_>>>().with_context(|| format!("read templates {what}"))
    }

    /// Up to `limit` templates of `namespace` by name, after `after` (a page).
    pub fn templates_of(&self, namespace: &str, after: &str, limit: usize) -> Result<Vec<Template>> {
        self.templates_where(
            "namespace = ?1 AND name > ?2 ORDER BY name LIMIT ?3",
            params![namespace, after, limit as i64],
            &format!("of namespace {namespace}"),
        )
    }

    /// Removes the template `id` unless a diff template names its snapshot as
    /// parent (checked in the same transaction); the dependents when it does not remove it.
    pub fn remove_template(&self, id: &str) -> Result<std::result::Result<(), Vec<(String, String)>>> {
        let mut db = self.db();
        let tx = db.transaction().context("begin template removal")?;
        let dependents: Vec<(String, String)> = tx
            .prepare(
                "SELECT c.namespace, c.name FROM templates c JOIN templates t ON c.parent_manifest_uri = t.snapshot_uri
                 WHERE t.id = ?1 ORDER BY c.namespace, c.name",
            )?
            .query_map(params![id], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()
            .with_context(|| format!("find the templates built on {id}"))?;
        if !dependents.is_empty() {
            return Ok(Err(dependents));
        }
        tx.execute("DELETE FROM templates WHERE id = ?1", params![id])
            .with_context(|| format!("remove template {id}"))?;
        tx.commit().context("commit template removal")?;
        Ok(Ok(()))
    }

    /// Public templates called `name` in namespaces other than `namespace`, at most 5 (for a hint).
    pub fn public_templates_named(&self, name: &str, namespace: &str) -> Result<Vec<Template>> {
        self.templates_where(
            "name = ?1 AND namespace != ?2 AND public ORDER BY namespace LIMIT 5",
            params![name, namespace],
            &format!("named {name} elsewhere"),
        )
    }

    /// The template `name` of namespace `namespace` (whoever asks: visibility is the caller's check).
    pub fn template_by_name(&self, namespace: &str, name: &str) -> Result<Option<Template>> {
        self.template_where("namespace = ?1 AND name = ?2", params![namespace, name], &format!("{namespace}/{name}"))
    }

    /// A template by its id (`tpl-…`).
    pub fn template_by_id(&self, id: &str) -> Result<Option<Template>> {
        self.template_where("id = ?1", params![id], id)
    }

    /// The template whose snapshot is the object `uri`.
    pub fn template_by_snapshot_uri(&self, uri: &str) -> Result<Option<Template>> {
        self.template_where("snapshot_uri = ?1", params![uri], uri)
    }

    /// A registry image this namespace imported: (snapshot uri, sha256, size) by manifest digest.
    pub fn image(&self, namespace: &str, digest: &str) -> Result<Option<(String, String, u64)>> {
        let db = self.db();
        let mut statement = db.prepare(
            "SELECT snapshot_uri, snapshot_sha256, snapshot_size_bytes FROM images WHERE namespace = ?1 AND digest = ?2",
        )?;
        let mut rows = statement.query(params![namespace, digest])?;
        Ok(match rows.next()? {
            Some(row) => Some((row.get(0)?, row.get(1)?, row.get::<_, i64>(2)? as u64)),
            None => None,
        })
    }

    /// Records an imported image's snapshot.
    pub fn put_image(&self, namespace: &str, digest: &str, uri: &str, sha256: &str, size: u64) -> Result<()> {
        self.db()
            .execute(
                "INSERT INTO images (namespace, digest, snapshot_uri, snapshot_sha256, snapshot_size_bytes)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(namespace, digest) DO UPDATE SET snapshot_uri = excluded.snapshot_uri,
                   snapshot_sha256 = excluded.snapshot_sha256, snapshot_size_bytes = excluded.snapshot_size_bytes",
                params![namespace, digest, uri, sha256, size as i64],
            )
            .with_context(|| format!("record the imported image {digest}"))?;
        Ok(())
    }

    /// Records a sandbox's lifecycle state.
    pub fn put_sandbox(&self, id: &str, namespace: &str, image: &str, state: &str) -> Result<()> {
        self.db()
            .execute(
                "INSERT INTO sandboxes (id, namespace, image, state) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(id) DO UPDATE SET state = excluded.state",
                params![id, namespace, image, state],
            )
            .with_context(|| format!("record sandbox {id}"))?;
        Ok(())
    }

    /// Sandboxes not yet deleted (left from a previous run, for clean-up).
    pub fn live_sandboxes(&self) -> Result<Vec<String>> {
        let db = self.db();
        let mut stmt = db.prepare("SELECT id FROM sandboxes WHERE state != 'deleted'")?;
        let ids = stmt.query_map([], |r| r.get(0))?.collect::<rusqlite::Result<Vec<String>>>()?;
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(id: &str, build: &str) -> Template {
        Template {
            id: id.into(),
            namespace: "ns".into(),
            name: "base".into(),
            snapshot_id: "snap-1".into(),
            snapshot_uri: "s3://b/k".into(),
            snapshot_format_version: "v1".into(),
            snapshot_size_bytes: 10,
            rootfs_disk_bytes: 20,
            rootfs_node_kind: "base".into(),
            parent_manifest_uri: None,
            snapshot_sha256: "ab".into(),
            public: false,
            build_id: build.into(),
        }
    }

    #[test]
    fn a_build_completes_once_and_its_template_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        {
            let state = State::open(&path).unwrap();
            assert_eq!(state.next_id("build").unwrap(), 1);
            state
                .insert_build(&Build {
                    id: "build-1".into(),
                    namespace: "ns".into(),
                    name: "base".into(),
                    snapshot_id: "snap-1".into(),
                    snapshot_uri: "s3://b/k".into(),
                    node_kind: "base".into(),
                    parent_manifest_uri: None,
                    public: false,
                    state: "prepared".into(),
                    failure: None,
                })
                .unwrap();
            assert!(state.complete("build-1", &template("tpl-1", "build-1")).unwrap());
            assert!(!state.complete("build-1", &template("tpl-2", "build-1")).unwrap());
        }
        let state = State::open(&path).unwrap();
        assert_eq!(state.next_id("build").unwrap(), 2, "counters survive");
        assert_eq!(state.template_by_name("ns", "base").unwrap().unwrap().id, "tpl-1");
        assert_eq!(state.template_by_name("other", "base").unwrap(), None, "names are per namespace");
        assert_eq!(state.template_by_id("tpl-1").unwrap().unwrap().name, "base");
        assert_eq!(state.template_by_snapshot_uri("s3://b/k").unwrap().unwrap().id, "tpl-1");
        assert_eq!(state.template_by_snapshot_uri("s3://b/k2").unwrap(), None);
        assert_eq!(state.build("build-1").unwrap().unwrap().state, "completed");
    }

    #[test]
    fn uploads_and_failures_are_recorded_and_an_older_database_gains_the_failure_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        {
            let db = Connection::open(&path).unwrap();
            db.execute_batch(
                "CREATE TABLE builds (id TEXT PRIMARY KEY, namespace TEXT NOT NULL, name TEXT NOT NULL,
                   snapshot_id TEXT NOT NULL, snapshot_uri TEXT NOT NULL, node_kind TEXT NOT NULL,
                   parent_manifest_uri TEXT, public INTEGER NOT NULL, state TEXT NOT NULL);
                 INSERT INTO builds VALUES ('build-7', 'ns', 'n', 'snap-7', 's3://b/k7', 'base', NULL, 0, 'prepared');",
            )
            .unwrap();
        }
        let state = State::open(&path).unwrap();
        let build = state.build("build-7").unwrap().unwrap();
        assert_eq!((build.state.as_str(), build.failure), ("prepared", None));
        assert_eq!(state.build_by_snapshot_uri("s3://b/k7").unwrap().unwrap().id, "build-7");
        let upload = UploadRecord { upload_id: "up-1".into(), build_id: "build-7".into(), uri: "s3://b/k7".into() };
        state.record_upload(&upload).unwrap();
        state.record_upload(&upload).unwrap();
        assert_eq!(state.open_uploads("build-7").unwrap(), vec![upload]);
        assert_eq!(state.prepared_builds().unwrap().len(), 1);
        state.fail_build("build-7", "the stack died").unwrap();
        state.close_upload("up-1", "aborted").unwrap();
        assert!(state.prepared_builds().unwrap().is_empty() && state.open_uploads("build-7").unwrap().is_empty());
        let failed = state.build("build-7").unwrap().unwrap();
        assert_eq!((failed.state.as_str(), failed.failure.as_deref()), ("failed", Some("the stack died")));
    }
}
