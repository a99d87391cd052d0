//! Idle keep-alive connections to shards, one pool per worker thread. The gateway runs one
//! single-threaded runtime per worker, so a connection is only ever used on the thread (and
//! the reactor) that opened it, and taking or returning one needs no lock.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::conn::Conn;

struct Idle {
    stream: Conn,
    since: Instant,
}

thread_local! {
    static IDLE: RefCell<HashMap<String, VecDeque<Idle>>> = RefCell::new(HashMap::new());
}

/// The most recently used idle connection filed under `key` (a shard's
/// [`crate::routing::ShardEntry::conn_key`]) that is still open, if any. Connections idle
/// for `max_idle_time` or longer are closed instead.
pub fn take(key: &str, max_idle_time: Duration) -> Option<Conn> {
    IDLE.with(|pool| {
        let mut pool = pool.borrow_mut();
        let queue = pool.get_mut(key)?;
        let now = Instant::now();
        while let Some(mut idle) = queue.pop_back() {
            if now.duration_since(idle.since) >= max_idle_time {
                queue.clear(); // the rest have been idle longer still
                return None;
            }
            if idle.stream.still_open() {
                return Some(idle.stream);
            }
        }
        None
    })
}

/// Keeps `stream` under `key` for the next request, closing the oldest idle connection
/// when `max_idle` are already kept.
pub fn put(key: &str, stream: Conn, max_idle: usize) {
    IDLE.with(|pool| {
        let mut pool = pool.borrow_mut();
        let queue = match pool.get_mut(key) {
            Some(q) => q,
            None => pool.entry(key.to_owned()).or_default(),
        };
        if queue.len() >= max_idle {
            queue.pop_front();
        }
        queue.push_back(Idle {
            stream,
            since: Instant::now(),
        });
    });
}

/// Closes this thread's connections idle for `max_idle_time` or longer, so connections to
/// a shard that stopped getting traffic do not stay open (half-closed by the engine) until
/// its next request.
pub fn close_expired(max_idle_time: Duration) {
    IDLE.with(|pool| {
        let now = Instant::now();
        pool.borrow_mut().retain(|_, queue| {
            while queue
                .front()
                .is_some_and(|idle| now.duration_since(idle.since) >= max_idle_time)
            {
                queue.pop_front();
            }
            !queue.is_empty()
        });
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    async fn pair(listener: &TcpListener) -> (Conn, TcpStream) {
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        (Conn::Plain(client.unwrap()), accepted.unwrap().0)
    }

    fn port(c: &Conn) -> u16 {
        match c {
            Conn::Plain(s) => s.local_addr().unwrap().port(),
            Conn::Tls(s) => s.get_ref().0.local_addr().unwrap().port(),
        }
    }

    #[tokio::test]
    async fn the_newest_open_connection_is_reused_and_closed_ones_are_dropped() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let key = format!("test-{}", listener.local_addr().unwrap());
        let (old, _old_server) = pair(&listener).await;
        let (closed, closed_server) = pair(&listener).await;
        let old_port = port(&old);
        put(&key, old, 8);
        put(&key, closed, 8);
        drop(closed_server); // the shard closes this one while it is idle
        tokio::time::sleep(Duration::from_millis(50)).await;
        let got = take(&key, Duration::from_secs(60)).expect("the open one");
        assert_eq!(port(&got), old_port);
        assert!(take(&key, Duration::from_secs(60)).is_none());
    }

    #[tokio::test]
    async fn the_sweep_closes_only_expired_connections() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let key = format!("test-{}", listener.local_addr().unwrap());
        let (c, _s) = pair(&listener).await;
        put(&key, c, 8);
        close_expired(Duration::from_secs(60));
        assert!(
            take(&key, Duration::from_secs(60)).is_some(),
            "not expired yet"
        );
        let (c, _s) = pair(&listener).await;
        put(&key, c, 8);
        close_expired(Duration::ZERO);
        assert!(take(&key, Duration::from_secs(60)).is_none());
        assert!(
            IDLE.with(|p| !p.borrow().contains_key(&key)),
            "empty queues are dropped"
        );
    }

    #[tokio::test]
    async fn connections_idle_too_long_or_beyond_the_cap_are_closed() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let key = format!("test-{}", listener.local_addr().unwrap());
        let mut servers = Vec::new();
        for _ in 0..3 {
            let (c, s) = pair(&listener).await;
            servers.push(s);
            put(&key, c, 2);
        }
        assert!(take(&key, Duration::from_secs(60)).is_some());
        assert!(take(&key, Duration::from_secs(60)).is_some());
        assert!(
            take(&key, Duration::from_secs(60)).is_none(),
            "the cap of 2 dropped one"
        );

        let (c, _s) = pair(&listener).await;
        put(&key, c, 2);
        assert!(
            take(&key, Duration::ZERO).is_none(),
            "idle longer than allowed"
        );
        // A shard that sends bytes on an idle connection makes it unusable too.
        let (c, mut s) = pair(&listener).await;
        put(&key, c, 2);
        s.write_all(b"x").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(take(&key, Duration::from_secs(60)).is_none());
    }
}
