//! Connecting to one of several database hosts (`postgres://u@h1:5432,h2:5433/db?target_session_attrs=read-write`):
//! the hosts are tried in turn, and each host's whole attempt — TCP connect, TLS, startup, authentication and, with
//! `target_session_attrs=read-write`, the check that the server accepts writes — is bounded on its own, as libpq's
//! `connect_timeout` is. tokio-postgres bounds only the TCP connect of each host, so a host that accepts the
//! connection and then never answers (a hung or half-failed server) would hold every later host back until the
//! caller's own deadline, and after a failover the new primary would never be reached.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use rand::seq::SliceRandom;
use tokio::task::JoinHandle;
use tokio_postgres::config::LoadBalanceHosts;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::{Client, Config, Connection, Socket};

/// One URL per host of a multi-host `database.url` (libpq's URL form, or its key=value form with `host=h1,h2`),
/// each with every other setting of the original; `None` when the URL names one host, or names its hosts in a way
/// this does not split (query parameters `host=`/`hostaddr=`, quoted values): then tokio-postgres tries the hosts
/// itself, bounded as a whole by the caller.
pub fn per_host_urls(url: &str) -> Option<Vec<String>> {
    if let Some((scheme, rest)) = url.split_once("://") {
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((u, h)) => (format!("{u}@"), h),
            None => (String::new(), authority),
        };
        let hosts: Vec<&str> = hosts.split(',').collect();
        if hosts.len() < 2 || hosts.iter().any(|h| h.is_empty()) || tail.contains("host=") {
            return None;
        }
        return Some(hosts.iter().map(|h| format!("{scheme}://{userinfo}{h}{tail}")).collect());
    }
    if url.contains(['\'', '"', '\\']) {
        return None;
    }
    let pairs: Vec<(&str, &str)> = url.split_whitespace().filter_map(|t| t.split_once('=')).collect();
    let list = |key: &str| pairs.iter().find(|(k, _)| *k == key).map(|(_, v)| v.split(',').collect::<Vec<_>>());
    let hosts = list("host").or_else(|| list("hostaddr"))?;
    let n = hosts.len();
    if n < 2 {
        return None;
    }
    let urls = (0..n)
        .map(|i| {
            url.split_whitespace()
                .map(|t| match t.split_once('=') {
                    Some((k @ ("host" | "hostaddr" | "port"), v)) => {
                        let values: Vec<&str> = v.split(',').collect();
                        // One port serves every host (libpq's rule); otherwise each host has its own.
                        let v = if values.len() == n { values[i] } else { v };
                        format!("{k}={v}")
                    }
                    _ => t.to_string(),
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    Some(urls)
}

/// Connects to the first host (of `hosts`, one configuration each, in order, or shuffled with
/// `load_balance_hosts=random`) that accepts, giving every host but the last at most `per_host`. The last host's
/// attempt is bounded by the caller (the pool's create timeout, or [`super::connect_with`]'s own deadline), so that
/// its real error, not a timeout, is what the caller sees when every host refuses.
pub async fn connect_first<T>(
    hosts: &[Config],
    tls: T,
    per_host: Duration,
) -> Result<(Client, Connection<Socket, T::Stream>), tokio_postgres::Error>
where
    T: MakeTlsConnect<Socket> + Clone,
{
    let mut order: Vec<&Config> = hosts.iter().collect();
    if order.first().is_some_and(|c| c.get_load_balance_hosts() == LoadBalanceHosts::Random) {
        order.shuffle(&mut rand::rng());
    }
    let Some((last, rest)) = order.split_last() else {
        return Config::new().connect(tls).await;
    };
    for config in rest {
        match tokio::time::timeout(per_host, config.connect(tls.clone())).await {
            Ok(Ok(connected)) => return Ok(connected),
            Ok(Err(e)) => tracing::debug!(host = ?config.get_hosts(), ports = ?config.get_ports(), error = %e,
                "database host refused; trying the next"),
            Err(_) => tracing::debug!(host = ?config.get_hosts(), ports = ?config.get_ports(),
                "database host did not answer in time; trying the next"),
        }
    }
    last.connect(tls).await
}

/// The pool's way of connecting: [`connect_first`] over the hosts of `database.url`.
pub struct HostsConnect<T> {
    pub hosts: Vec<Config>,
    pub tls: T,
    pub per_host: Duration,
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

impl<T> deadpool_postgres::Connect for HostsConnect<T>
where
    T: MakeTlsConnect<Socket> + Clone + Sync + Send + 'static,
    T::Stream: Sync + Send,
    T::TlsConnect: Sync + Send,
    <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
{
    fn connect(&self, _: &Config) -> BoxFuture<'_, Result<(Client, JoinHandle<()>), tokio_postgres::Error>> {
        Box::pin(async move {
            let (client, connection) = connect_first(&self.hosts, self.tls.clone(), self.per_host).await?;
            let task = tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::warn!(error = %e, "pooled database connection ended");
                }
            });
            Ok((client, task))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_multi_host_url_splits_into_one_url_per_host_keeping_everything_else() {
        let urls = per_host_urls("postgres://acm:pw@h1:5432,h2:5433/acm?target_session_attrs=read-write").unwrap();
        assert_eq!(
            urls,
            [
                "postgres://acm:pw@h1:5432/acm?target_session_attrs=read-write",
                "postgres://acm:pw@h2:5433/acm?target_session_attrs=read-write"
            ]
        );
        assert_eq!(
            per_host_urls("postgresql://[::1]:5432,h2").unwrap(),
            ["postgresql://[::1]:5432", "postgresql://h2"]
        );
        assert_eq!(per_host_urls("postgres://acm@h1:5432/acm"), None);
        assert_eq!(per_host_urls("postgres:///acm?host=h1,h2"), None);
        let kv = per_host_urls("host=h1,h2 port=5432,5433 user=acm target_session_attrs=read-write").unwrap();
        assert_eq!(
            kv,
            [
                "host=h1 port=5432 user=acm target_session_attrs=read-write",
                "host=h2 port=5433 user=acm target_session_attrs=read-write"
            ]
        );
        assert_eq!(per_host_urls("host=h1,h2 port=6432 dbname=acm").unwrap()[1], "host=h2 port=6432 dbname=acm");
        assert_eq!(per_host_urls("host=h1 dbname=acm"), None);
    }

    #[test]
    fn tokio_postgres_reads_the_hosts_ports_and_target_session_attrs_of_a_multi_host_url() {
        use tokio_postgres::config::{Host, TargetSessionAttrs};
        let c: Config = "postgres://acm@h1:5432,h2:5433/acm?target_session_attrs=read-write".parse().unwrap();
        assert_eq!(c.get_hosts(), [Host::Tcp("h1".into()), Host::Tcp("h2".into())]);
        assert_eq!(c.get_ports(), [5432, 5433]);
        assert_eq!(c.get_target_session_attrs(), TargetSessionAttrs::ReadWrite);
        for (i, url) in per_host_urls("postgres://acm@h1:5432,h2:5433/acm?target_session_attrs=read-write")
            .unwrap()
            .iter()
            .enumerate()
        {
            let c: Config = url.parse().unwrap();
            assert_eq!(c.get_hosts(), [Host::Tcp(format!("h{}", i + 1))]);
            assert_eq!(c.get_ports(), [5432 + i as u16]);
            assert_eq!(c.get_target_session_attrs(), TargetSessionAttrs::ReadWrite);
            assert_eq!(c.get_dbname(), Some("acm"));
        }
    }
}
