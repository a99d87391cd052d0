//! The agent: a thread that reads the source every interval and classifies, and the HTTP
//! listener that serves the latest report (`/v1/gpus`, `/metrics`, `/healthz`, and in
//! simulation `POST /v1/simulate`).

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::classify::{classify, Thresholds};
use crate::source::simulated::{SimulatedChange, SimulatedNode};
use crate::source::GpuSource;
use crate::{metrics, NodeReport};

/// The latest classified reading and when it was taken.
struct Latest {
    report: NodeReport,
    taken: Instant,
}

/// Shared agent state: the source, thresholds and the latest report.
pub struct Agent {
    source: Mutex<Box<dyn GpuSource>>,
    thresholds: Thresholds,
    interval: Duration,
    latest: Mutex<Option<Latest>>,
    last_error: Mutex<Option<String>>,
    simulated: Option<SimulatedNode>,
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Agent {
    /// An agent over `source`; `simulated` is the handle `POST /v1/simulate` changes.
    pub fn new(
        source: Box<dyn GpuSource>,
        thresholds: Thresholds,
        interval: Duration,
        simulated: Option<SimulatedNode>,
    ) -> Arc<Self> {
        Arc::new(Self {
            source: Mutex::new(source),
            thresholds,
            interval,
            latest: Mutex::new(None),
            last_error: Mutex::new(None),
            simulated,
        })
    }

    /// Reads and classifies now; keeps the result as the latest report.
    pub fn refresh(&self) -> Result<NodeReport, String> {
        let started = Instant::now();
        let (name, reading) = {
            let mut source = self
                .source
                .lock()
                .map_err(|_| "source lock poisoned".to_string())?;
            (source.name(), source.read().map_err(|e| e.to_string()))
        };
        let reading = match reading {
            Ok(r) => r,
            Err(e) => {
                if let Ok(mut last) = self.last_error.lock() {
                    *last = Some(e.clone());
                }
                return Err(e);
            }
        };
        let now = now_unix_ms();
        let mut devices = reading.devices;
        for d in &mut devices {
            classify(d, &self.thresholds, now);
        }
        let report = NodeReport {
            source: name.to_string(),
            driver_version: reading.driver_version,
            verdict: NodeReport::verdict_of(&devices),
            devices,
            age_ms: 0,
            read_ms: started.elapsed().as_secs_f64() * 1e3,
        };
        if let Ok(mut latest) = self.latest.lock() {
            *latest = Some(Latest {
                report: report.clone(),
                taken: Instant::now(),
            });
        }
        Ok(report)
    }

    /// The latest report with its age, if any reading has succeeded.
    pub fn latest(&self) -> Option<NodeReport> {
        let latest = self.latest.lock().ok()?;
        latest.as_ref().map(|l| NodeReport {
            age_ms: l.taken.elapsed().as_millis() as u64,
            ..l.report.clone()
        })
    }

    /// Reads every interval on a dedicated thread (driver calls block), forever.
    pub fn spawn_poller(self: &Arc<Self>) {
        let agent = Arc::clone(self);
        let _ = std::thread::Builder::new()
            .name("gpu-poller".into())
            .spawn(move || loop {
                let started = Instant::now();
                match agent.refresh() {
                    Ok(r) if r.verdict != crate::Verdict::Healthy => {
                        tracing::debug!(verdict = r.verdict.as_str(), "reading")
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "reading failed"),
                }
                std::thread::sleep(agent.interval.saturating_sub(started.elapsed()));
            });
    }

    fn stale_after(&self) -> Duration {
        self.interval * 3 + Duration::from_secs(5)
    }
}

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    json(
        status,
        serde_json::json!({"error": {"message": message}}).to_string(),
    )
}

async fn handle(agent: Arc<Agent>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/v1/gpus") => match agent.latest() {
            Some(r) => json(
                StatusCode::OK,
                serde_json::to_string(&r).unwrap_or_default(),
            ),
            None => error(StatusCode::SERVICE_UNAVAILABLE, "no reading yet"),
        },
        (&Method::GET, "/metrics") => match agent.latest() {
            Some(r) => {
                let mut resp = Response::new(Full::new(Bytes::from(metrics::render(&r))));
                resp.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                resp
            }
            None => error(StatusCode::SERVICE_UNAVAILABLE, "no reading yet"),
        },
        (&Method::GET, "/healthz") => {
            let age = agent.latest().map(|r| Duration::from_millis(r.age_ms));
            let last_error = agent.last_error.lock().ok().and_then(|e| e.clone());
            match age {
                Some(a) if a <= agent.stale_after() => json(
                    StatusCode::OK,
                    serde_json::json!({"status": "ok", "age_ms": a.as_millis() as u64}).to_string(),
                ),
                _ => json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    serde_json::json!({"status": "stale", "age_ms": age.map(|a| a.as_millis() as u64), "last_error": last_error}).to_string(),
                ),
            }
        }
        (&Method::POST, "/v1/simulate") => {
            let Some(sim) = agent.simulated.clone() else {
                return error(
                    StatusCode::NOT_FOUND,
                    "simulation is off (start with --simulate)",
                );
            };
            let body = match Limited::new(req.into_body(), 64 << 10).collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => return error(StatusCode::PAYLOAD_TOO_LARGE, "body too large"),
            };
            let change: SimulatedChange = match serde_json::from_slice(&body) {
                Ok(c) => c,
                Err(e) => return error(StatusCode::BAD_REQUEST, &format!("invalid change: {e}")),
            };
            if let Err(e) = sim.apply(change) {
                return error(StatusCode::BAD_REQUEST, &e);
            }
            match agent.refresh() {
                Ok(r) => json(
                    StatusCode::OK,
                    serde_json::to_string(&r).unwrap_or_default(),
                ),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e),
            }
        }
        _ => error(StatusCode::NOT_FOUND, "no such route"),
    }
}

/// Serves the agent's HTTP API on `listener` until the task is dropped.
pub async fn serve(agent: Arc<Agent>, listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let agent = Arc::clone(&agent);
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let agent = Arc::clone(&agent);
                async move { Ok::<_, Infallible>(handle(agent, req).await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
