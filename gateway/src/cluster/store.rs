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
    /// What it asks of each pool: requests in flight and queued, by pool id.
    pub demand: Vec<(String, f64)>,
}

/// `POOL=REQUESTS,...` as a replica wrote it (what does not parse is left out).
pub fn parse_demand(s: &str) -> Vec<(String, f64)> {
    s.split(',')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            let v: f64 = v
                .parse()
                .ok()
                .filter(|v: &f64| v.is_finite() && *v >= 0.0)?;
            Some((k.to_string(), v))
        })
        .collect()
}

/// A replica's demand, written for [`parse_demand`].
pub fn format_demand(demand: &[(String, f64)]) -> String {
    demand
        .iter()
        .map(|(k, v)| format!("{k}={v:.1}"))
        .collect::<Vec<_>>()
        .join(",")
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

    /// Says `replica` is alive, with its `demand` (`POOL=REQUESTS,...`, kept under
    /// `demand_prefix` + its id for the TTL), and returns the replicas heard from within
    /// `ttl` (this one included): how long ago each last beat, and its demand.
    pub async fn heartbeat(
        &self,
        set: &str,
        replica: &str,
        ttl: Duration,
        demand: &str,
        demand_prefix: &str,
    ) -> Result<Vec<Beat>, ClusterError> {
        let mut call = self.heartbeat.prepare_invoke();
        call.key(set)
            .arg(replica)
            .arg(ttl.as_millis() as u64)
            .arg(demand)
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
                    demand: parse_demand(&r[2]),
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
    fn demand_round_trips_and_garbage_is_left_out() {
        let d = vec![("pool-a".to_string(), 3.0), ("pool.b".to_string(), 0.5)];
        assert_eq!(parse_demand(&format_demand(&d)), d);
        assert_eq!(parse_demand(""), vec![]);
        assert_eq!(
            parse_demand("a=1,b=x,=,c=-2,d=inf,e=2"),
            vec![("a".to_string(), 1.0), ("e".to_string(), 2.0)]
        );
    }
}
