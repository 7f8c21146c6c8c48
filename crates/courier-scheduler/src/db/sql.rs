//! One way to run a statement on either store: SQLite (one file, the
//! default) or PostgreSQL (shared by several schedulers).
//!
//! Statements are written once, in the SQL both accept, with `?N`
//! parameters (rewritten to `$N` for PostgreSQL when first prepared).
//! Values cross as [`Value`]s and come back through [`Col`], so no driver
//! type appears outside this module.

use std::cell::RefCell;
use std::collections::HashMap;
use std::error::Error as StdError;

use postgres::types::{FromSql, IsNull, ToSql, Type, to_sql_checked};

use super::{RunStatus, StepStatus};

/// A store failed: the driver's error, a value of the wrong type, or no row
/// where one was required.
#[derive(Debug, thiserror::Error)]
#[error("{store}: {source}")]
pub struct DbError {
    store: &'static str,
    #[source]
    source: Box<dyn StdError + Send + Sync>,
}

impl DbError {
    pub(crate) fn new(store: &'static str, source: impl Into<Box<dyn StdError + Send + Sync>>) -> Self {
        Self {
            store,
            source: source.into(),
        }
    }

    /// A statement that had to return a row returned none.
    pub fn no_row() -> Self {
        Self::new("store", "no row where one was expected")
    }
}

impl From<rusqlite::Error> for DbError {
    fn from(e: rusqlite::Error) -> Self {
        Self::new("SQLite", e)
    }
}

impl From<postgres::Error> for DbError {
    fn from(e: postgres::Error) -> Self {
        Self::new("PostgreSQL", e)
    }
}

/// A parameter's value.
#[derive(Debug, Clone, Copy)]
pub enum Value<'a> {
    Null,
    Int(i64),
    Real(f64),
    Text(&'a str),
}

/// What can be bound as a parameter.
pub trait Param {
    fn value(&self) -> Value<'_>;
}

macro_rules! int_param {
    ($($t:ty),*) => {$(
        impl Param for $t {
            fn value(&self) -> Value<'_> {
                Value::Int(i64::try_from(*self).unwrap_or(i64::MAX))
            }
        }
    )*};
}
int_param!(i64, i32, u32, u8, usize, u64);

impl Param for bool {
    fn value(&self) -> Value<'_> {
        Value::Int(i64::from(*self))
    }
}

impl Param for f64 {
    fn value(&self) -> Value<'_> {
        Value::Real(*self)
    }
}

impl Param for str {
    fn value(&self) -> Value<'_> {
        Value::Text(self)
    }
}

impl Param for String {
    fn value(&self) -> Value<'_> {
        Value::Text(self)
    }
}

impl<T: Param + ?Sized> Param for &T {
    fn value(&self) -> Value<'_> {
        (**self).value()
    }
}

impl<T: Param> Param for Option<T> {
    fn value(&self) -> Value<'_> {
        self.as_ref().map_or(Value::Null, Param::value)
    }
}

impl Param for StepStatus {
    fn value(&self) -> Value<'_> {
        Value::Text(self.as_str())
    }
}

impl Param for RunStatus {
    fn value(&self) -> Value<'_> {
        Value::Text(self.as_str())
    }
}

impl Param for courier_wire::TaskStatus {
    fn value(&self) -> Value<'_> {
        Value::Text(self.as_str())
    }
}

/// Parameters of a statement: `p![a, b]`.
macro_rules! p {
    ($($v:expr),* $(,)?) => { &[$(&$v as &dyn $crate::db::sql::Param),*] };
}
pub(crate) use p;

impl rusqlite::ToSql for Value<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(ToSqlOutput::Borrowed(match *self {
            Value::Null => ValueRef::Null,
            Value::Int(v) => ValueRef::Integer(v),
            Value::Real(v) => ValueRef::Real(v),
            Value::Text(s) => ValueRef::Text(s.as_bytes()),
        }))
    }
}

/// PostgreSQL infers each parameter's type from the statement; a value is
/// written as that type when it fits. PostgreSQL's text cannot hold the NUL
/// character (SQLite's can): it is written as U+FFFD, so a step's output or
/// a result's field that carries one is stored, not refused by the server
/// (which would fail, and so redeliver, its whole batch of results forever).
impl ToSql for Value<'_> {
    fn to_sql(&self, ty: &Type, out: &mut bytes::BytesMut) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        match (*self, ty) {
            (Value::Null, _) => Ok(IsNull::Yes),
            (Value::Int(v), &Type::INT8) => v.to_sql(ty, out),
            (Value::Int(v), &Type::INT4) => i32::try_from(v)?.to_sql(ty, out),
            (Value::Int(v), &Type::INT2) => i16::try_from(v)?.to_sql(ty, out),
            (Value::Int(v), &Type::BOOL) => (v != 0).to_sql(ty, out),
            (Value::Int(v), &Type::FLOAT8) => (v as f64).to_sql(ty, out),
            (Value::Real(v), &Type::FLOAT8) => v.to_sql(ty, out),
            (Value::Real(v), &Type::FLOAT4) => (v as f32).to_sql(ty, out),
            (Value::Text(s), _) if <&str as ToSql>::accepts(ty) && s.contains('\0') => {
                s.replace('\0', "\u{FFFD}").as_str().to_sql(ty, out)
            }
            (Value::Text(s), _) if <&str as ToSql>::accepts(ty) => s.to_sql(ty, out),
            (Value::Int(v), _) if <&str as ToSql>::accepts(ty) => v.to_string().as_str().to_sql(ty, out),
            (value, ty) => Err(format!("cannot write {value:?} as PostgreSQL type {ty}").into()),
        }
    }

    fn accepts(ty: &Type) -> bool {
        matches!(
            *ty,
            Type::BOOL | Type::INT2 | Type::INT4 | Type::INT8 | Type::FLOAT4 | Type::FLOAT8
        ) || <&str as ToSql>::accepts(ty)
    }

    to_sql_checked!();
}

/// A column's value as read.
#[derive(Debug, Clone, Copy)]
pub enum Cell<'a> {
    Null,
    Int(i64),
    Real(f64),
    Bool(bool),
    Text(&'a str),
}

/// What a column can be read as.
pub trait Col: Sized {
    fn from_cell(cell: Cell<'_>) -> Result<Self, String>;
}

impl Col for i64 {
    fn from_cell(cell: Cell<'_>) -> Result<Self, String> {
        match cell {
            Cell::Int(v) => Ok(v),
            Cell::Bool(b) => Ok(i64::from(b)),
            other => Err(format!("expected an integer, found {other:?}")),
        }
    }
}

macro_rules! int_col {
    ($($t:ty),*) => {$(
        impl Col for $t {
            fn from_cell(cell: Cell<'_>) -> Result<Self, String> {
                let v = i64::from_cell(cell)?;
                <$t>::try_from(v).map_err(|_| format!("{v} is out of range for {}", stringify!($t)))
            }
        }
    )*};
}
int_col!(u32, u8, usize);

impl Col for bool {
    fn from_cell(cell: Cell<'_>) -> Result<Self, String> {
        match cell {
            Cell::Bool(b) => Ok(b),
            Cell::Int(v) => Ok(v != 0),
            other => Err(format!("expected a boolean, found {other:?}")),
        }
    }
}

impl Col for f64 {
    fn from_cell(cell: Cell<'_>) -> Result<Self, String> {
        match cell {
            Cell::Real(v) => Ok(v),
            Cell::Int(v) => Ok(v as f64),
            other => Err(format!("expected a number, found {other:?}")),
        }
    }
}

impl Col for String {
    fn from_cell(cell: Cell<'_>) -> Result<Self, String> {
        match cell {
            Cell::Text(s) => Ok(s.to_owned()),
            other => Err(format!("expected text, found {other:?}")),
        }
    }
}

impl<T: Col> Col for Option<T> {
    fn from_cell(cell: Cell<'_>) -> Result<Self, String> {
        match cell {
            Cell::Null => Ok(None),
            cell => T::from_cell(cell).map(Some),
        }
    }
}

impl Col for StepStatus {
    fn from_cell(cell: Cell<'_>) -> Result<Self, String> {
        let text = String::from_cell(cell)?;
        StepStatus::parse(&text).ok_or_else(|| format!("unknown step status \"{text}\""))
    }
}

impl Col for RunStatus {
    fn from_cell(cell: Cell<'_>) -> Result<Self, String> {
        let text = String::from_cell(cell)?;
        RunStatus::parse(&text).ok_or_else(|| format!("unknown run status \"{text}\""))
    }
}

/// A PostgreSQL column read as a [`Cell`].
struct PgCell<'a>(Cell<'a>);

impl<'a> FromSql<'a> for PgCell<'a> {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn StdError + Sync + Send>> {
        Ok(PgCell(match *ty {
            Type::INT8 => Cell::Int(i64::from_sql(ty, raw)?),
            Type::INT4 => Cell::Int(i32::from_sql(ty, raw)?.into()),
            Type::INT2 => Cell::Int(i16::from_sql(ty, raw)?.into()),
            Type::FLOAT8 => Cell::Real(f64::from_sql(ty, raw)?),
            Type::FLOAT4 => Cell::Real(f32::from_sql(ty, raw)?.into()),
            Type::BOOL => Cell::Bool(bool::from_sql(ty, raw)?),
            _ => Cell::Text(<&str>::from_sql(ty, raw)?),
        }))
    }

    fn from_sql_null(_: &Type) -> Result<Self, Box<dyn StdError + Sync + Send>> {
        Ok(PgCell(Cell::Null))
    }

    fn accepts(ty: &Type) -> bool {
        matches!(
            *ty,
            Type::BOOL | Type::INT2 | Type::INT4 | Type::INT8 | Type::FLOAT4 | Type::FLOAT8
        ) || <&str as FromSql>::accepts(ty)
    }
}

/// A row of a result.
#[allow(missing_debug_implementations)]
pub enum Row<'a> {
    Sqlite(&'a rusqlite::Row<'a>),
    Postgres(&'a postgres::Row),
}

impl Row<'_> {
    /// Column `i` as a `T`.
    ///
    /// # Errors
    /// The column is missing or holds another type.
    pub fn get<T: Col>(&self, i: usize) -> Result<T, DbError> {
        let decoded = match self {
            Row::Sqlite(r) => {
                use rusqlite::types::ValueRef;
                let cell = match r.get_ref(i)? {
                    ValueRef::Null => Cell::Null,
                    ValueRef::Integer(v) => Cell::Int(v),
                    ValueRef::Real(v) => Cell::Real(v),
                    ValueRef::Text(t) => Cell::Text(std::str::from_utf8(t).map_err(|e| DbError::new("SQLite", e))?),
                    ValueRef::Blob(_) => return Err(DbError::new("SQLite", format!("column {i} is a blob"))),
                };
                T::from_cell(cell)
            }
            Row::Postgres(r) => T::from_cell(r.try_get::<_, PgCell<'_>>(i)?.0),
        };
        decoded.map_err(|e| DbError::new("store", format!("column {i}: {e}")))
    }
}

/// Prepared PostgreSQL statements, by their text as written (`?N`).
pub(crate) type PgStatements = HashMap<String, postgres::Statement>;

/// `?N` parameters as PostgreSQL's `$N` (statements hold no `?` otherwise).
fn pg_text(sql: &str) -> String {
    sql.replace('?', "$")
}

/// The most items (rows to insert, ids to match) one statement of a
/// [`Batched`] takes.
pub const AT_ONCE: usize = 64;

/// A statement over many items at once (rows in `INSERT … VALUES`, ids in
/// `IN (…)`), in texts for 1, 2, 4, … [`AT_ONCE`] items: seven statements to
/// keep prepared, their texts built once. On PostgreSQL each statement is a
/// round trip; on SQLite each costs an execution.
#[derive(Debug)]
pub struct Batched {
    build: fn(usize) -> String,
    texts: std::sync::OnceLock<Vec<String>>,
}

impl Batched {
    /// `build(n)`: the statement's text for `n` items.
    pub const fn new(build: fn(usize) -> String) -> Self {
        Self {
            build,
            texts: std::sync::OnceLock::new(),
        }
    }

    /// The text for `items` items, a power of two up to [`AT_ONCE`].
    fn text(&self, items: usize) -> &str {
        debug_assert!(items.is_power_of_two() && items <= AT_ONCE, "{items} items");
        let texts = self
            .texts
            .get_or_init(|| (0..=AT_ONCE.ilog2()).map(|i| (self.build)(1 << i)).collect());
        &texts[items.ilog2() as usize]
    }
}

/// `?first, …` for `n` parameters from `first`.
pub fn placeholders(first: usize, n: usize) -> String {
    let list: Vec<String> = (first..first + n).map(|i| format!("?{i}")).collect();
    list.join(", ")
}

/// The `VALUES` of `rows` rows of `width` parameters each.
pub fn values(width: usize, rows: usize) -> String {
    let rows: Vec<String> = (0..rows)
        .map(|row| format!("({})", placeholders(row * width + 1, width)))
        .collect();
    format!("VALUES {}", rows.join(", "))
}

/// A transaction on the store: every statement of the engine runs in one,
/// committed when the closure given to `Db::transaction` returns `Ok`.
pub struct Tx<'a> {
    pub(crate) inner: TxInner<'a>,
    /// Tasks or cancellations were written: on PostgreSQL, the commit
    /// notifies [`OUTBOX_CHANNEL`], waking the leading scheduler's publisher.
    wrote_outbox: std::cell::Cell<bool>,
}

/// The PostgreSQL channel a commit that wrote to the outbox notifies.
pub const OUTBOX_CHANNEL: &str = "courier_outbox";

impl std::fmt::Debug for Tx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_postgres() {
            "Tx(PostgreSQL)"
        } else {
            "Tx(SQLite)"
        })
    }
}

pub(crate) enum TxInner<'a> {
    Sqlite(SqliteTx<'a>),
    Postgres {
        tx: RefCell<postgres::Transaction<'a>>,
        stmts: RefCell<&'a mut PgStatements>,
    },
}

/// A SQLite transaction begun, committed and rolled back with cached
/// statements: `rusqlite::Transaction` prepares `BEGIN` and `COMMIT` anew
/// each time (about 5,000 instructions each, 3% of a one-step run). Rolled
/// back on drop unless committed.
pub(crate) struct SqliteTx<'a> {
    conn: &'a rusqlite::Connection,
    open: bool,
}

impl<'a> SqliteTx<'a> {
    /// `BEGIN IMMEDIATE` (takes the write lock now) or `BEGIN DEFERRED`.
    pub(crate) fn begin(conn: &'a rusqlite::Connection, write: bool) -> rusqlite::Result<Self> {
        if !conn.is_autocommit() {
            // An earlier transaction whose rollback failed is still open:
            // ended now, or every later BEGIN would fail.
            tracing::warn!("a SQLite transaction was left open; rolling it back");
            conn.prepare_cached("ROLLBACK")?.execute([])?;
        }
        let sql = if write { "BEGIN IMMEDIATE" } else { "BEGIN DEFERRED" };
        conn.prepare_cached(sql)?.execute([])?;
        Ok(Self { conn, open: true })
    }

    fn commit(mut self) -> rusqlite::Result<()> {
        self.conn.prepare_cached("COMMIT")?.execute([])?;
        self.open = false;
        Ok(())
    }
}

impl std::ops::Deref for SqliteTx<'_> {
    type Target = rusqlite::Connection;

    fn deref(&self) -> &rusqlite::Connection {
        self.conn
    }
}

impl Drop for SqliteTx<'_> {
    fn drop(&mut self) {
        // Also after a failed COMMIT (SQLITE_BUSY leaves the transaction open).
        if self.open && !self.conn.is_autocommit() {
            let rolled_back = self.conn.prepare_cached("ROLLBACK").and_then(|mut s| s.execute([]));
            if let Err(e) = rolled_back {
                tracing::error!(error = %e, "cannot roll back a SQLite transaction");
            }
        }
    }
}

/// Binds `params` for PostgreSQL and runs `$body` with the statement and them.
macro_rules! with_pg {
    ($tx:expr, $stmts:expr, $sql:expr, $params:expr, |$t:ident, $stmt:ident, $refs:ident| $body:expr) => {{
        let mut $t = $tx.borrow_mut();
        let $stmt = pg_statement(&mut $t, &mut $stmts.borrow_mut(), $sql)?;
        let values: Vec<Value<'_>> = $params.iter().map(|p| p.value()).collect();
        let $refs: Vec<&(dyn ToSql + Sync)> = values.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
        $body
    }};
}

fn pg_statement(
    tx: &mut postgres::Transaction<'_>,
    stmts: &mut PgStatements,
    sql: &str,
) -> Result<postgres::Statement, DbError> {
    if let Some(stmt) = stmts.get(sql) {
        return Ok(stmt.clone());
    }
    let stmt = tx.prepare(&pg_text(sql))?;
    stmts.insert(sql.to_owned(), stmt.clone());
    Ok(stmt)
}

impl<'a> Tx<'a> {
    pub(crate) fn sqlite(tx: SqliteTx<'a>) -> Self {
        Self {
            inner: TxInner::Sqlite(tx),
            wrote_outbox: std::cell::Cell::new(false),
        }
    }

    pub(crate) fn postgres(tx: postgres::Transaction<'a>, stmts: &'a mut PgStatements) -> Self {
        Self {
            inner: TxInner::Postgres {
                tx: RefCell::new(tx),
                stmts: RefCell::new(stmts),
            },
            wrote_outbox: std::cell::Cell::new(false),
        }
    }

    pub(crate) fn commit(self) -> Result<(), DbError> {
        match self.inner {
            TxInner::Sqlite(tx) => tx.commit()?,
            TxInner::Postgres { tx, .. } => {
                let mut tx = tx.into_inner();
                if self.wrote_outbox.get() {
                    tx.batch_execute(&format!("NOTIFY {OUTBOX_CHANNEL}"))?;
                }
                tx.commit()?;
            }
        }
        Ok(())
    }

    /// Note that this transaction wrote tasks or cancellations to publish.
    pub fn wrote_outbox(&self) {
        self.wrote_outbox.set(true);
    }

    /// Run a statement; how many rows it changed.
    ///
    /// # Errors
    /// The store's.
    pub fn exec(&self, sql: &str, params: &[&dyn Param]) -> Result<usize, DbError> {
        match &self.inner {
            TxInner::Sqlite(c) => Ok(c
                .prepare_cached(sql)?
                .execute(rusqlite::params_from_iter(params.iter().map(|p| p.value())))?),
            TxInner::Postgres { tx, stmts } => with_pg!(tx, stmts, sql, params, |t, stmt, refs| Ok(usize::try_from(
                t.execute(&stmt, &refs)?
            )
            .unwrap_or(usize::MAX))),
        }
    }

    /// Run `batched` over `params` (`width` per item, item after item), by
    /// chunks of [`AT_ONCE`], 32, … 1 items; how many rows it changed.
    ///
    /// # Errors
    /// The store's.
    pub fn exec_batched(&self, batched: &Batched, width: usize, params: &[&dyn Param]) -> Result<usize, DbError> {
        if width == 0 || !params.len().is_multiple_of(width) {
            return Err(DbError::new(
                "store",
                format!("{} parameters are not items of {width}", params.len()),
            ));
        }
        let mut changed = 0;
        let mut rest = params;
        while !rest.is_empty() {
            let items = AT_ONCE.min(1 << (rest.len() / width).ilog2());
            let (chunk, more) = rest.split_at(items * width);
            changed += self.exec(batched.text(items), chunk)?;
            rest = more;
        }
        Ok(changed)
    }

    /// Every row `batched` returns over `items` (one parameter each, after
    /// the `fixed` ones), by chunks of [`AT_ONCE`], 32, … 1 items, each row
    /// through `f`.
    ///
    /// # Errors
    /// The store's, or `f`'s.
    pub fn all_batched<T>(
        &self,
        batched: &Batched,
        fixed: &[&dyn Param],
        items: &[&dyn Param],
        mut f: impl FnMut(&Row<'_>) -> Result<T, DbError>,
    ) -> Result<Vec<T>, DbError> {
        let mut out = Vec::new();
        let mut rest = items;
        while !rest.is_empty() {
            let n = AT_ONCE.min(1 << rest.len().ilog2());
            let (chunk, more) = rest.split_at(n);
            let params: Vec<&dyn Param> = fixed.iter().chain(chunk).copied().collect();
            out.extend(self.all(batched.text(n), &params, &mut f)?);
            rest = more;
        }
        Ok(out)
    }

    /// Every row a query returns, each through `f`.
    ///
    /// # Errors
    /// The store's, or `f`'s.
    pub fn all<T>(
        &self,
        sql: &str,
        params: &[&dyn Param],
        mut f: impl FnMut(&Row<'_>) -> Result<T, DbError>,
    ) -> Result<Vec<T>, DbError> {
        let mut out = Vec::new();
        match &self.inner {
            TxInner::Sqlite(c) => {
                let mut stmt = c.prepare_cached(sql)?;
                let mut rows = stmt.query(rusqlite::params_from_iter(params.iter().map(|p| p.value())))?;
                while let Some(r) = rows.next()? {
                    out.push(f(&Row::Sqlite(r))?);
                }
            }
            TxInner::Postgres { tx, stmts } => with_pg!(tx, stmts, sql, params, |t, stmt, refs| {
                for r in t.query(&stmt, &refs)? {
                    out.push(f(&Row::Postgres(&r))?);
                }
            }),
        }
        Ok(out)
    }

    /// The first row a query returns, if any.
    ///
    /// # Errors
    /// The store's, or `f`'s.
    pub fn opt<T>(
        &self,
        sql: &str,
        params: &[&dyn Param],
        f: impl FnOnce(&Row<'_>) -> Result<T, DbError>,
    ) -> Result<Option<T>, DbError> {
        match &self.inner {
            TxInner::Sqlite(c) => {
                let mut stmt = c.prepare_cached(sql)?;
                let mut rows = stmt.query(rusqlite::params_from_iter(params.iter().map(|p| p.value())))?;
                rows.next()?.map(|r| f(&Row::Sqlite(r))).transpose()
            }
            TxInner::Postgres { tx, stmts } => with_pg!(tx, stmts, sql, params, |t, stmt, refs| t
                .query_opt(&stmt, &refs)?
                .map(|r| f(&Row::Postgres(&r)))
                .transpose()),
        }
    }

    /// The row a query must return.
    ///
    /// # Errors
    /// The store's, `f`'s, or no row.
    pub fn one<T>(
        &self,
        sql: &str,
        params: &[&dyn Param],
        f: impl FnOnce(&Row<'_>) -> Result<T, DbError>,
    ) -> Result<T, DbError> {
        self.opt(sql, params, f)?.ok_or_else(DbError::no_row)
    }

    /// Whether this transaction is on PostgreSQL.
    pub fn is_postgres(&self) -> bool {
        matches!(self.inner, TxInner::Postgres { .. })
    }

    /// Run several statements with no parameters (migrations).
    ///
    /// # Errors
    /// The store's.
    pub(crate) fn batch(&self, sql: &str) -> Result<(), DbError> {
        match &self.inner {
            TxInner::Sqlite(c) => c.execute_batch(sql)?,
            TxInner::Postgres { tx, .. } => tx.borrow_mut().batch_execute(sql)?,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_numbered_for_postgres() {
        assert_eq!(
            pg_text("SELECT a FROM t WHERE b = ?1 AND c = ?12"),
            "SELECT a FROM t WHERE b = $1 AND c = $12"
        );
    }

    /// Items go by chunks of 64, 32, … 1, each with its own numbering; a
    /// parameter count that is not whole items is refused, not run.
    #[test]
    fn batched_statements_number_each_chunk_and_take_whole_items() {
        assert_eq!(values(2, 2), "VALUES (?1, ?2), (?3, ?4)");
        assert_eq!(placeholders(1, 3), "?1, ?2, ?3");
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        conn.execute("CREATE TABLE t (a INTEGER, b TEXT)", []).unwrap();
        let insert = Batched::new(|n| format!("INSERT INTO t (a, b) {}", values(2, n)));
        let items: Vec<(i64, String)> = (0..99).map(|i| (i, format!("b{i}"))).collect();
        let params: Vec<&dyn Param> = items
            .iter()
            .flat_map(|(a, b)| [a as &dyn Param, b as &dyn Param])
            .collect();
        let tx = Tx::sqlite(SqliteTx::begin(&conn, true).unwrap());
        assert_eq!(tx.exec_batched(&insert, 2, &params).unwrap(), 99);
        let error = tx.exec_batched(&insert, 2, &params[..3]).unwrap_err();
        assert_eq!(error.to_string(), "store: 3 parameters are not items of 2");
        let rows: Vec<(i64, String)> = tx
            .all("SELECT a, b FROM t ORDER BY rowid", &[], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap();
        assert_eq!(rows, items);
    }
}
