//! Statements with their parameter types, prepared once per pooled connection where that is safe and sent unnamed
//! where it is not.
//!
//! On a pooled connection straight to PostgreSQL a statement is prepared as a named statement the first time that
//! connection runs it and kept in the connection's statement cache (deadpool-postgres's), so the server parses and
//! plans it once instead of at every execution (planning alone was more than half of the database time of a
//! command). Behind a transaction-pooling PgBouncer a named statement prepared on one server connection may not exist
//! on the one that runs the next transaction, so there every statement is sent as an unnamed Parse/Bind/Execute/Sync
//! with its parameter types (tokio-postgres's `query_typed*`): one round trip, nothing kept. Once a pool for
//! PgBouncer is built in a process ([`forbid_named_statements`]), every statement of that process is sent unnamed;
//! unpooled clients (migrations, tools) always send them unnamed, as do statements with a parameter whose type the
//! server infers (enum labels). When `database.pooler` is `none` but the connections turn out not to keep named
//! statements (a transaction pooler nobody declared: [`statement_not_kept`], or the probe at start,
//! `db::probe_statements_kept`), the process switches to unnamed statements with one warning
//! ([`named_statements_not_kept`]); a statement that failed outside a transaction is sent again unnamed at once, one
//! inside a transaction fails it with a transient error, and the transaction is retried.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};

use futures_util::TryStreamExt;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Error, GenericClient, Row, Statement};

use crate::domain;

/// Whether pooled connections may keep named prepared statements: until a pool for PgBouncer is built.
static NAMED_STATEMENTS: AtomicBool = AtomicBool::new(true);

/// Stops pooled connections from preparing named statements, for the rest of the process: called when a pool is built
/// for PgBouncer (`database.pooler = "pgbouncer"`). A process that also holds a direct pool (tests do) then sends its
/// statements unnamed too, which is slower and correct.
pub fn forbid_named_statements() {
    NAMED_STATEMENTS.store(false, Ordering::Relaxed);
}

/// Whether [`forbid_named_statements`] has not been called.
pub fn named_statements_allowed() -> bool {
    NAMED_STATEMENTS.load(Ordering::Relaxed)
}

/// Whether an error says a named prepared statement was not kept by the server session: SQLSTATE 26000
/// (`invalid_sql_statement_name`: `prepared statement "s10" does not exist`) or 42P05
/// (`duplicate_prepared_statement`: `… already exists`) — what PostgreSQL answers through a transaction pooler
/// (PgBouncer in transaction mode) that hands a client's transactions to different server connections, when
/// `database.pooler` was left at `none`.
pub fn statement_not_kept(e: &Error) -> bool {
    use tokio_postgres::error::SqlState;
    matches!(e.code(), Some(c) if *c == SqlState::INVALID_SQL_STATEMENT_NAME || *c == SqlState::DUPLICATE_PSTATEMENT)
}

/// Named statements are not kept by the connections `database.url` gives (`why`): every statement of this process is
/// sent unnamed from now on, and one warning (the first time only) names `database.pooler`.
pub fn named_statements_not_kept(why: &str) {
    if NAMED_STATEMENTS.swap(false, Ordering::Relaxed) {
        tracing::warn!(
            why,
            "database.pooler is `none` but the database connections do not keep named prepared statements (a \
             transaction pooler such as PgBouncer in transaction mode?): every statement is sent unnamed from now on; \
             set database.pooler = \"pgbouncer\" (and the session limits on the role) to say so"
        );
    }
}

/// What a kept statement's attempt came to: its result, or `None` when the statement was not kept and may be sent
/// again unnamed (outside a transaction; inside one the error stands, and the transaction is retried as a whole).
fn after_kept<T>(r: Result<T, Error>, in_transaction: bool) -> Option<Result<T, Error>> {
    match r {
        Err(e) if statement_not_kept(&e) => {
            let why =
                e.as_db_error().map_or_else(|| e.to_string(), |d| format!("{}: {}", d.code().code(), d.message()));
            named_statements_not_kept(&why);
            if in_transaction {
                Some(Err(e))
            } else {
                None
            }
        }
        r => Some(r),
    }
}

/// A Rust type with the PostgreSQL type its parameters are sent as.
pub trait PgType {
    /// The parameter type.
    const TYPE: Type;
}

macro_rules! pg_types {
    ($($t:ty => $pg:ident),* $(,)?) => { $(impl PgType for $t { const TYPE: Type = Type::$pg; })* };
}

pg_types! {
    bool => BOOL, i16 => INT2, i32 => INT4, i64 => INT8, f32 => FLOAT4, f64 => FLOAT8,
    str => TEXT, String => TEXT, [u8] => BYTEA, Vec<u8> => BYTEA, serde_json::Value => JSONB, uuid::Uuid => UUID,
    chrono::DateTime<chrono::Utc> => TIMESTAMPTZ,
    [String] => TEXT_ARRAY, Vec<String> => TEXT_ARRAY, Vec<&str> => TEXT_ARRAY, Vec<Option<String>> => TEXT_ARRAY,
    Vec<i16> => INT2_ARRAY, Vec<i32> => INT4_ARRAY, [i64] => INT8_ARRAY, Vec<i64> => INT8_ARRAY, Vec<serde_json::Value> => JSONB_ARRAY,
    Vec<Option<serde_json::Value>> => JSONB_ARRAY, Vec<uuid::Uuid> => UUID_ARRAY,
    Vec<chrono::DateTime<chrono::Utc>> => TIMESTAMPTZ_ARRAY,
}

impl<T: PgType> PgType for Option<T> {
    const TYPE: Type = T::TYPE;
}

impl<T: PgType + ?Sized> PgType for &T {
    const TYPE: Type = T::TYPE;
}

/// A statement parameter: a value and its PostgreSQL type.
pub trait Param: Sync {
    /// The value.
    fn value(&self) -> &(dyn ToSql + Sync);
    /// Its type.
    fn pg_type(&self) -> Type;
}

impl<T: PgType + ToSql + Sync> Param for T {
    fn value(&self) -> &(dyn ToSql + Sync) {
        self
    }

    fn pg_type(&self) -> Type {
        T::TYPE
    }
}

/// The PostgreSQL enums of [`crate::domain`] as parameters: each is sent as its label, with the type left for the
/// server to infer from the statement (an enum type's oid differs from database to database). A new enum of
/// `domain` gets its line here (the compiler asks for it the first time one is a parameter).
macro_rules! enum_params {
    ($($name:ident),+ $(,)?) => {
        $(impl Param for domain::$name {
            fn value(&self) -> &(dyn ToSql + Sync) {
                self.label()
            }

            fn pg_type(&self) -> Type {
                Type::UNKNOWN
            }
        })+
    };
}

enum_params!(SessionStatus, ConnectionStatus, CloseReason, InstructionStatus, Priority, AckStatus);

fn typed<'a>(params: &'a [&'a dyn Param]) -> Vec<(&'a (dyn ToSql + Sync), Type)> {
    params.iter().map(|p| (p.value(), p.pg_type())).collect()
}

fn values<'a>(params: &'a [&'a dyn Param]) -> Vec<&'a (dyn ToSql + Sync)> {
    params.iter().map(|p| p.value()).collect()
}

/// One-round-trip statements on a client, a transaction or a pooled connection.
pub trait Sql: Sync {
    /// The tokio-postgres client or transaction underneath.
    type Pg: GenericClient + Sync;

    /// It.
    fn pg(&self) -> &Self::Pg;

    /// Whether statements run inside a transaction (an error there aborts it, so a failed statement cannot simply
    /// be sent again).
    fn in_transaction(&self) -> bool {
        false
    }

    /// The statement prepared on this connection (once, then from its cache), or `None` when this client keeps no
    /// prepared statements.
    fn prepared(&self, sql: &str, types: Vec<Type>) -> impl Future<Output = Option<Result<Statement, Error>>> + Send {
        let _ = (sql, types);
        async { None }
    }

    /// The kept statement for `sql` when this client keeps them and the statement may be kept: named statements not
    /// forbidden, and no parameter type left for the server to infer (a statement prepared with an inferred enum type
    /// would refuse the label sent as text). `None`: send it unnamed.
    fn kept(&self, sql: &str, params: &[&dyn Param]) -> impl Future<Output = Option<Result<Statement, Error>>> + Send {
        async move {
            let types: Vec<Type> = params.iter().map(|p| p.pg_type()).collect();
            if !named_statements_allowed() || types.contains(&Type::UNKNOWN) {
                return None;
            }
            self.prepared(sql, types).await
        }
    }

    /// The rows of a statement.
    fn typed_query(&self, sql: &str, params: &[&dyn Param]) -> impl Future<Output = Result<Vec<Row>, Error>> + Send {
        async move {
            if let Some(st) = self.kept(sql, params).await {
                let r = match st {
                    Ok(st) => self.pg().query(&st, &values(params)).await,
                    Err(e) => Err(e),
                };
                if let Some(r) = after_kept(r, self.in_transaction()) {
                    return r;
                }
            }
            self.pg().query_typed(sql, &typed(params)).await
        }
    }

    /// The one row of a statement (an error when it returns none or more).
    fn typed_one(&self, sql: &str, params: &[&dyn Param]) -> impl Future<Output = Result<Row, Error>> + Send {
        async move {
            if let Some(st) = self.kept(sql, params).await {
                let r = match st {
                    Ok(st) => self.pg().query_one(&st, &values(params)).await,
                    Err(e) => Err(e),
                };
                if let Some(r) = after_kept(r, self.in_transaction()) {
                    return r;
                }
            }
            self.pg().query_typed_one(sql, &typed(params)).await
        }
    }

    /// The row of a statement, if any (an error when it returns more than one).
    fn typed_opt(&self, sql: &str, params: &[&dyn Param]) -> impl Future<Output = Result<Option<Row>, Error>> + Send {
        async move {
            if let Some(st) = self.kept(sql, params).await {
                let r = match st {
                    Ok(st) => self.pg().query_opt(&st, &values(params)).await,
                    Err(e) => Err(e),
                };
                if let Some(r) = after_kept(r, self.in_transaction()) {
                    return r;
                }
            }
            self.pg().query_typed_opt(sql, &typed(params)).await
        }
    }

    /// Runs a statement and returns the rows it affected.
    fn typed_execute(&self, sql: &str, params: &[&dyn Param]) -> impl Future<Output = Result<u64, Error>> + Send {
        async move {
            if let Some(st) = self.kept(sql, params).await {
                let r = match st {
                    Ok(st) => self.pg().execute(&st, &values(params)).await,
                    Err(e) => Err(e),
                };
                if let Some(r) = after_kept(r, self.in_transaction()) {
                    return r;
                }
            }
            let stream = self.pg().query_typed_raw(sql, typed(params)).await?;
            futures_util::pin_mut!(stream);
            while stream.try_next().await?.is_some() {}
            Ok(stream.rows_affected().unwrap_or(0))
        }
    }
}

/// A client or transaction whose statements are always sent unnamed, and so planned for their parameters and the
/// data at every execution: for statements whose best plan depends on them (the relay's claim, the sweeper's
/// batches and checks), where the generic plan PostgreSQL may settle on for a kept statement can read a whole table.
pub struct Unnamed<'a, T: Sql>(pub &'a T);

impl<T: Sql> Sql for Unnamed<'_, T> {
    type Pg = T::Pg;
    fn pg(&self) -> &T::Pg {
        self.0.pg()
    }
    fn in_transaction(&self) -> bool {
        self.0.in_transaction()
    }
}

impl Sql for tokio_postgres::Client {
    type Pg = Self;
    fn pg(&self) -> &Self {
        self
    }
}

impl Sql for tokio_postgres::Transaction<'_> {
    type Pg = Self;
    fn pg(&self) -> &Self {
        self
    }
    fn in_transaction(&self) -> bool {
        true
    }
}

impl Sql for deadpool_postgres::ClientWrapper {
    type Pg = tokio_postgres::Client;
    fn pg(&self) -> &tokio_postgres::Client {
        self
    }
    async fn prepared(&self, sql: &str, types: Vec<Type>) -> Option<Result<Statement, Error>> {
        Some(self.prepare_typed_cached(sql, &types).await)
    }
}

impl Sql for deadpool_postgres::Object {
    type Pg = tokio_postgres::Client;
    fn pg(&self) -> &tokio_postgres::Client {
        self
    }
    async fn prepared(&self, sql: &str, types: Vec<Type>) -> Option<Result<Statement, Error>> {
        Some(self.prepare_typed_cached(sql, &types).await)
    }
}

impl<'a> Sql for deadpool_postgres::Transaction<'a> {
    type Pg = tokio_postgres::Transaction<'a>;
    fn pg(&self) -> &tokio_postgres::Transaction<'a> {
        self
    }
    fn in_transaction(&self) -> bool {
        true
    }
    async fn prepared(&self, sql: &str, types: Vec<Type>) -> Option<Result<Statement, Error>> {
        Some(self.prepare_typed_cached(sql, &types).await)
    }
}
