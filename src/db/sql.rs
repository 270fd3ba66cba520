//! Statements in one round trip, with no named prepared statement: every statement is sent as an unnamed
//! Parse/Bind/Execute/Sync with its parameter types (tokio-postgres's `query_typed*`), so it works the same on a
//! direct connection and behind a transaction-pooling PgBouncer, where a named statement prepared in one round trip
//! may not exist on the server connection that runs the next.

use std::future::Future;

use futures_util::TryStreamExt;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Error, GenericClient, Row};

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
    Vec<i32> => INT4_ARRAY, Vec<i64> => INT8_ARRAY, Vec<serde_json::Value> => JSONB_ARRAY,
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

/// A parameter of a PostgreSQL enum type: its label, sent with the type left for the server to infer from the
/// statement (an enum type's oid differs from database to database).
pub fn enum_label(label: &'static &'static str) -> &'static (dyn ToSql + Sync) {
    label
}

fn typed<'a>(params: &'a [&'a dyn Param]) -> Vec<(&'a (dyn ToSql + Sync), Type)> {
    params.iter().map(|p| (p.value(), p.pg_type())).collect()
}

/// One-round-trip statements on a client, a transaction or a pooled connection.
pub trait Sql: Sync {
    /// The tokio-postgres client or transaction underneath.
    type Pg: GenericClient + Sync;

    /// It.
    fn pg(&self) -> &Self::Pg;

    /// The rows of a statement.
    fn typed_query(&self, sql: &str, params: &[&dyn Param]) -> impl Future<Output = Result<Vec<Row>, Error>> + Send {
        async move { self.pg().query_typed(sql, &typed(params)).await }
    }

    /// The one row of a statement (an error when it returns none or more).
    fn typed_one(&self, sql: &str, params: &[&dyn Param]) -> impl Future<Output = Result<Row, Error>> + Send {
        async move { self.pg().query_typed_one(sql, &typed(params)).await }
    }

    /// The row of a statement, if any (an error when it returns more than one).
    fn typed_opt(&self, sql: &str, params: &[&dyn Param]) -> impl Future<Output = Result<Option<Row>, Error>> + Send {
        async move { self.pg().query_typed_opt(sql, &typed(params)).await }
    }

    /// Runs a statement and returns the rows it affected.
    fn typed_execute(&self, sql: &str, params: &[&dyn Param]) -> impl Future<Output = Result<u64, Error>> + Send {
        async move {
            let stream = self.pg().query_typed_raw(sql, typed(params)).await?;
            futures_util::pin_mut!(stream);
            while stream.try_next().await?.is_some() {}
            Ok(stream.rows_affected().unwrap_or(0))
        }
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
}

impl Sql for deadpool_postgres::ClientWrapper {
    type Pg = tokio_postgres::Client;
    fn pg(&self) -> &tokio_postgres::Client {
        self
    }
}

impl Sql for deadpool_postgres::Object {
    type Pg = tokio_postgres::Client;
    fn pg(&self) -> &tokio_postgres::Client {
        self
    }
}

impl<'a> Sql for deadpool_postgres::Transaction<'a> {
    type Pg = tokio_postgres::Transaction<'a>;
    fn pg(&self) -> &tokio_postgres::Transaction<'a> {
        self
    }
}
