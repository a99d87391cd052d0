//! Pingora's stock proxy path with nothing added: every request to one upstream. The
//! benchmark runs it beside the gateway to show what Pingora itself costs per request.
//!
//! Usage: `cargo run --release --example stock_proxy -- LISTEN_ADDR UPSTREAM_ADDR`

#![allow(clippy::print_stdout)]

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;

struct OneUpstream(String);

#[async_trait]
impl ProxyHttp for OneUpstream {
    type CTX = ();
    fn new_ctx(&self) {}
    async fn upstream_peer(&self, _s: &mut Session, _c: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(
            self.0.as_str(),
            false,
            String::new(),
        )))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(listen), Some(upstream)) = (args.get(1), args.get(2)) else {
        println!("usage: stock_proxy LISTEN_ADDR UPSTREAM_ADDR [THREADS]");
        std::process::exit(2);
    };
    let threads = args.get(3).and_then(|t| t.parse().ok()).unwrap_or(2);
    // The same runtime settings as `breakwater serve --threads N`.
    let conf = ServerConf {
        threads,
        work_stealing: false,
        ..ServerConf::default()
    };
    let mut server = pingora::server::Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut svc =
        pingora::proxy::http_proxy_service(&server.configuration, OneUpstream(upstream.clone()));
    svc.add_tcp(listen);
    server.add_service(svc);
    server.run_forever();
}
