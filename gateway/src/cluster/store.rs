//! The store the replicas share (Redis 7 or Valkey): one connection, reconnected by the
//! client library, every command bounded by `[cluster] timeout_ms`, and the two scripts the
//! cluster runs — settling leases ([`SETTLE`]) and the heartbeat ([`HEARTBEAT`]). Both read
//! the store's clock, so the replicas' clocks never need to agree.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, IntoConnectionInfo, Script};

use super::ClusterError;
use crate::policy::{ClusterSettings, SecretSource};

/// The lease settling script (see the file for its arguments).
const SETTLE: &str = include_str!("settle.lua");
/// The heartbeat script.
const HEARTBEAT: &str = include_str!("heartbeat.lua");

/// One bucket to settle: its key and what the replica holds and wants.
#[derive(Debug, Clone, PartialEq)]
pub struct Settle {
    /// The bucket's key in the store.
    pub key: String,
    /// A minute's allowance.
    pub per_minute: u64,
    /// Units wanted after settling.
    pub want: f64,
    /// Units held now (negative: debt).
    pub held: f64,
    /// The level to create the bucket at if the store has none.
    pub init: f64,
}

/// The store's answer for one bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settled {
    /// Units added to the lease (negative: returned).
    pub granted: f64,
    /// The store's level after.
    pub level: f64,
}

/// One replica as the heartbeat saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Beat {
    /// Its id.
    pub replica: String,
    /// Since its last heartbeat.
    pub ago: Duration,
    /// What it reported with that heartbeat.
    pub report: Report,
}

/// What a replica reports with each heartbeat: what it asks of each pool, and what it has
/// in flight on each shard, so the others divide the slots by the first and never fill
/// what the second still holds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// Requests in flight and queued, by pool id.
    pub demand: Vec<(String, f64)>,
    /// Requests in flight, by shard id (shards with none are left out).
    pub in_flight: Vec<(String, f64)>,
}

/// Marks a shard's entry in a written [`Report`] (ids never contain it).
const SHARD_MARK: char = '@';

impl Report {
    /// `POOL=REQUESTS,...,@SHARD=REQUESTS,...`, for [`Report::parse`].
    pub fn format(&self) -> String {
        let pools = self.demand.iter().map(|(k, v)| format!("{k}={v:.1}"));
        let shards = self
            .in_flight
            .iter()
            .map(|(k, v)| format!("{SHARD_MARK}{k}={v:.0}"));
        pools.chain(shards).collect::<Vec<_>>().join(",")
    }

    /// A report as a replica wrote it (what does not parse is left out).
    pub fn parse(s: &str) -> Report {
        let mut report = Report::default();
        for kv in s.split(',') {
            let Some((k, v)) = kv.split_once('=') else {
                continue;
            };
            let Some(v) = v.parse().ok().filter(|v: &f64| v.is_finite() && *v >= 0.0) else {
                continue;
            };
            match k.strip_prefix(SHARD_MARK) {
                Some(shard) if !shard.is_empty() => report.in_flight.push((shard.into(), v)),
                Some(_) => {}
                None if !k.is_empty() => report.demand.push((k.into(), v)),
                None => {}
            }
        }
        report
    }
}

/// A connection to the store.
pub struct Store {
    connection: ConnectionManager,
    timeout: Duration,
    settle: Script,
    heartbeat: Script,
}

impl Store {
    /// A store client for `settings`; connects on first use (a store that is down at start
    /// is not an error: the replica runs on local limits until it answers).
    pub fn open(settings: &ClusterSettings) -> Result<Self, ClusterError> {
        let mut info = settings
            .store
            .as_str()
            .into_connection_info()
            .map_err(|e| ClusterError::Store(e.to_string()))?;
        let mut redis = info.redis_settings().clone();
        if let Some(user) = &settings.username {
            redis = redis.set_username(user);
        }
        if let Some(source) = &settings.password {
            redis = redis.set_password(read_secret(source)?);
        }
        info = info.set_redis_settings(redis);
        let client = if settings.store.scheme() == "rediss" {
            let read = |p: &std::path::Path| {
                std::fs::read(p).map_err(|e| ClusterError::Tls(format!("{}: {e}", p.display())))
            };
            let root_cert = settings.tls.ca_file.as_deref().map(read).transpose()?;
            let client_tls = match &settings.tls.client_cert {
                Some(files) => Some(redis::ClientTlsConfig {
                    client_cert: read(&files.cert_file)?,
                    client_key: read(&files.key_file)?,
                }),
                None => None,
            };
            Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls,
                    root_cert,
                },
            )
        } else {
            Client::open(info)
        }
        .map_err(|e| ClusterError::Store(e.to_string()))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.timeout))
            .set_response_timeout(Some(settings.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let connection = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| ClusterError::Store(e.to_string()))?;
        Ok(Self {
            connection,
            timeout: settings.timeout,
            settle: Script::new(SETTLE),
            heartbeat: Script::new(HEARTBEAT),
        })
    }

    /// Settles every bucket in `batch` in one call; the answers in the same order.
    pub async fn settle(&self, batch: &[Settle]) -> Result<Vec<Settled>, ClusterError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let mut call = self.settle.prepare_invoke();
        for s in batch {
            call.key(&s.key);
        }
        for s in batch {
            call.arg(s.per_minute)
                .arg(format!("{:.6}", s.want))
                .arg(format!("{:.6}", s.held))
                .arg(format!("{:.6}", s.init));
        }
        let mut connection = self.connection.clone();
        let answers: Vec<(String, String)> =
            self.bounded(call.invoke_async(&mut connection)).await?;
        if answers.len() != batch.len() {
            return Err(ClusterError::Store(format!(
                "settle answered {} buckets for {}",
                answers.len(),
                batch.len()
            )));
        }
        answers
            .into_iter()
            .map(|(g, l)| {
                Ok(Settled {
                    granted: number(&g)?,
                    level: number(&l)?,
                })
            })
            .collect()
    }

    /// Says `replica` is alive, with its `report` ([`Report::format`], kept under
    /// `demand_prefix` + its id for the TTL), and returns the replicas heard from within
    /// `ttl` (this one included): how long ago each last beat, and its report.
    pub async fn heartbeat(
        &self,
        set: &str,
        replica: &str,
        ttl: Duration,
        report: &str,
        demand_prefix: &str,
    ) -> Result<Vec<Beat>, ClusterError> {
        let mut call = self.heartbeat.prepare_invoke();
        call.key(set)
            .arg(replica)
            .arg(ttl.as_millis() as u64)
            .arg(report)
            .arg(demand_prefix);
        let mut connection = self.connection.clone();
        let answer: Vec<String> = self.bounded(call.invoke_async(&mut connection)).await?;
        let Some((now, rest)) = answer.split_first() else {
            return Err(ClusterError::Store("empty heartbeat answer".into()));
        };
        let now = number(now)?;
        rest.chunks_exact(3)
            .map(|r| {
                let beat = number(&r[1])?;
                Ok(Beat {
                    replica: r[0].clone(),
                    ago: Duration::from_millis((now - beat).max(0.0) as u64),
                    report: Report::parse(&r[2]),
                })
            })
            .collect()
    }

    /// Takes `replica` out of the replica set and its demand out of the store, so the
    /// others divide without it at their next heartbeat.
    pub async fn leave(
        &self,
        set: &str,
        replica: &str,
        demand_prefix: &str,
    ) -> Result<(), ClusterError> {
        let mut pipe = redis::pipe();
        pipe.atomic()
            .zrem(set, replica)
            .ignore()
            .del(format!("{demand_prefix}{replica}"))
            .ignore();
        let mut connection = self.connection.clone();
        self.bounded(pipe.query_async::<()>(&mut connection)).await
    }

    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, ClusterError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(ClusterError::Store(e.to_string())),
            Err(_) => Err(ClusterError::Timeout(self.timeout)),
        }
    }
}

fn number(s: &str) -> Result<f64, ClusterError> {
    s.parse::<f64>()
        .ok()
        .filter(|v| v.is_finite())
        .ok_or_else(|| ClusterError::Store(format!("not a number from the store: {s:?}")))
}

/// The store's password from where the policy says it is (first line, trimmed).
fn read_secret(source: &SecretSource) -> Result<String, ClusterError> {
    let raw = match source {
        SecretSource::File(path) => std::fs::read_to_string(path)
            .map_err(|e| ClusterError::Secret(format!("{}: {e}", path.display())))?,
        SecretSource::Env(var) => std::env::var(var)
            .map_err(|_| ClusterError::Secret(format!("environment variable {var} is not set")))?,
    };
    let line = raw.lines().next().unwrap_or("").trim().to_string();
    if line.is_empty() {
        return Err(ClusterError::Secret("the store's password is empty".into()));
    }
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_round_trip_and_garbage_is_left_out() {
        let r = Report {
            demand: vec![("pool-a".into(), 3.0), ("pool.b".into(), 0.5)],
            in_flight: vec![("s1".into(), 2.0), ("s-2".into(), 14.0)],
        };
        assert_eq!(r.format(), "pool-a=3.0,pool.b=0.5,@s1=2,@s-2=14");
        assert_eq!(Report::parse(&r.format()), r);
        assert_eq!(Report::parse(""), Report::default());
        let r = Report::parse("a=1,b=x,=,c=-2,d=inf,@=3,@s=1,e=2");
        assert_eq!(r.demand, vec![("a".into(), 1.0), ("e".into(), 2.0)]);
        assert_eq!(r.in_flight, vec![("s".into(), 1.0)]);
    }
}
