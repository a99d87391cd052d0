//! The addresses the gateway listens on, settled before Pingora binds them: a port given
//! as 0 is chosen here, and every port is reserved — held by a socket that is bound but
//! never listens, with `SO_REUSEPORT`, so Pingora's workers can bind the same port beside
//! it while no other program can take it. (A socket that does not listen is never handed
//! a connection.) A port another program already listens on is an error.
//!
//! Once both listeners answer, the addresses can be written to a file (`--addr-file`), so
//! whoever started the gateway on port 0 learns where it is.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

/// Why an address could not be had.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}")]
pub struct ListenError {
    /// The address.
    pub addr: SocketAddr,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

/// The traffic and admin addresses, with their ports reserved for the process's life.
#[derive(Debug)]
pub struct Listeners {
    /// The traffic listener's address (the port chosen, if 0 was asked for).
    pub traffic: SocketAddr,
    /// The admin listener's address.
    pub admin: SocketAddr,
    _reserved: Vec<Socket>,
}

impl Listeners {
    /// Settles and reserves both addresses. `taking_over`: the ports belong to the gateway
    /// being upgraded, whose sockets this process receives; nothing is bound or checked.
    pub fn reserve(
        traffic: SocketAddr,
        admin: SocketAddr,
        taking_over: bool,
    ) -> Result<Self, ListenError> {
        if taking_over {
            return Ok(Self {
                traffic,
                admin,
                _reserved: Vec::new(),
            });
        }
        let (traffic, t) = reserve(traffic)?;
        let (admin, a) = reserve(admin)?;
        Ok(Self {
            traffic,
            admin,
            _reserved: vec![t, a],
        })
    }
}

fn reserve(addr: SocketAddr) -> Result<(SocketAddr, Socket), ListenError> {
    let err = |source| ListenError { addr, source };
    // `SO_REUSEPORT` would let this process share a port that another one listens on with
    // the same option; a plain bind first makes a taken port an error, as for any server.
    if addr.port() != 0 {
        drop(TcpListener::bind(addr).map_err(err)?);
    }
    let socket =
        Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(err)?;
    socket.set_reuse_port(true).map_err(err)?;
    socket.bind(&addr.into()).map_err(err)?;
    let bound = socket
        .local_addr()
        .map_err(err)?
        .as_socket()
        .ok_or_else(|| err(std::io::Error::other("not an IP address")))?;
    Ok((bound, socket))
}

/// Writes `{"listen": ..., "admin_listen": ...}` to `path` (atomically: written aside,
/// then renamed) once both addresses accept connections, from a thread of its own; gives
/// up after a minute.
pub fn write_when_listening(path: PathBuf, traffic: SocketAddr, admin: SocketAddr) {
    let spawned = std::thread::Builder::new()
        .name("addr-file".into())
        .spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            let accepts = |a: SocketAddr| TcpStream::connect_timeout(&a, Duration::from_millis(200)).is_ok();
            while !(accepts(traffic) && accepts(admin)) {
                if Instant::now() > deadline {
                    tracing::warn!(path = %path.display(), "the listeners never answered; no address file");
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if let Err(e) = write_atomically(&path, traffic, admin) {
                tracing::warn!(path = %path.display(), error = %e, "cannot write the address file");
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the address-file thread");
    }
}

fn write_atomically(path: &Path, traffic: SocketAddr, admin: SocketAddr) -> std::io::Result<()> {
    let body = serde_json::json!({"listen": traffic, "admin_listen": admin}).to_string();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, body)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_zero_is_chosen_and_held_and_a_taken_port_is_refused() {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let l = Listeners::reserve(any, any, false).unwrap();
        assert_ne!(l.traffic.port(), 0);
        assert_ne!(l.traffic.port(), l.admin.port());
        // Held: a plain bind (another program) cannot take it...
        assert!(TcpListener::bind(l.traffic).is_err());
        // ...and it takes no connections itself, as it never listens.
        assert!(TcpStream::connect(l.traffic).is_err());
        // A port someone listens on is refused.
        let taken = TcpListener::bind(any).unwrap();
        let err = Listeners::reserve(taken.local_addr().unwrap(), any, false).unwrap_err();
        assert_eq!(err.addr, taken.local_addr().unwrap());
    }
}
