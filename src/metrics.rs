//! Prometheus metrics (DESIGN section 10): the figures of [`crate::status`]
//! in the Prometheus text exposition format, served over HTTP on an optional
//! `--metrics-bind HOST:PORT` by `tiny_http` on a thread of its own.
//!
//! The scheduler exposes the whole job (every node's latest report); a
//! server exposes its own report. Both use the same metric names, so a
//! dashboard can scrape either. The endpoint serves figures only, never
//! accepts input, and is not authenticated: bind it to an address that only
//! your monitoring can reach.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::error::{Error, Result};
use crate::status::{CLOCK_LEFT, JobStatus, Rates, ServerReport};

/// Metric families being assembled: samples grouped per name, as the
/// format requires.
#[derive(Default)]
struct Families {
    by_name: BTreeMap<&'static str, (&'static str, &'static str, Vec<String>)>,
}

impl Families {
    fn add(&mut self, name: &'static str, kind: &'static str, help: &'static str, labels: &[(&str, &str)], v: f64) {
        let mut line = String::from(name);
        if !labels.is_empty() {
            line.push('{');
            for (i, (k, val)) in labels.iter().enumerate() {
                if i > 0 {
                    line.push(',');
                }
                let escaped = val.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
                let _ = write!(line, "{k}=\"{escaped}\"");
            }
            line.push('}');
        }
        let _ = write!(line, " {}", if v.is_finite() { format!("{v}") } else { "NaN".into() });
        self.by_name.entry(name).or_insert_with(|| (kind, help, Vec::new())).2.push(line);
    }

    fn render(self) -> String {
        let mut o = String::new();
        for (name, (kind, help, lines)) in self.by_name {
            let _ = writeln!(o, "# HELP {name} {help}");
            let _ = writeln!(o, "# TYPE {name} {kind}");
            for l in lines {
                o.push_str(&l);
                o.push('\n');
            }
        }
        o
    }
}

fn server_families(f: &mut Families, r: &ServerReport, rates: Option<&Rates>) {
    let rank = r.rank.map_or_else(|| "unranked".to_string(), |x| x.to_string());
    let s: &str = &rank;
    let c = "counter";
    let g = "gauge";
    for (kind, n) in [("push", r.pushes), ("pull", r.pulls), ("push_pull", r.push_pulls)] {
        f.add(
            "pserver_server_requests_total",
            c,
            "Data requests served, by kind.",
            &[("server", s), ("kind", kind)],
            n as f64,
        );
    }
    f.add(
        "pserver_server_keys_total",
        c,
        "Keys in data requests.",
        &[("server", s), ("op", "push")],
        r.keys_pushed as f64,
    );
    f.add(
        "pserver_server_keys_total",
        c,
        "Keys in data requests.",
        &[("server", s), ("op", "pull")],
        r.keys_pulled as f64,
    );
    let help = "Payload bytes (keys and values) of data requests and replies.";
    f.add(
        "pserver_server_payload_bytes_total",
        c,
        help,
        &[("server", s), ("direction", "received")],
        r.bytes_received as f64,
    );
    f.add("pserver_server_payload_bytes_total", c, help, &[("server", s), ("direction", "sent")], r.bytes_sent as f64);
    let help = "Requests refused as a whole (malformed, over a limit).";
    f.add("pserver_server_refused_requests_total", c, help, &[("server", s)], r.refused as f64);
    f.add("pserver_server_memory_bytes", g, "Shard memory in use.", &[("server", s)], r.memory_used as f64);
    if let Some(m) = r.memory_limit {
        f.add(
            "pserver_server_memory_limit_bytes",
            g,
            "Shard memory budget (--max-memory).",
            &[("server", s)],
            m as f64,
        );
    }
    f.add("pserver_server_epoch", g, "Range-map epoch the server serves.", &[("server", s)], f64::from(r.epoch));
    let t = &r.transport;
    f.add("pserver_transport_connections", g, "Open connections.", &[("server", s)], t.connections as f64);
    let help = "Whole frames moved, headers included.";
    f.add("pserver_transport_bytes_total", c, help, &[("server", s), ("direction", "received")], t.bytes_in as f64);
    f.add("pserver_transport_bytes_total", c, help, &[("server", s), ("direction", "sent")], t.bytes_out as f64);
    let help = "Connections closed for failing authentication.";
    f.add("pserver_transport_auth_failures_total", c, help, &[("server", s)], t.auth_failures as f64);
    let help = "Authenticated connections refused over the connection limit.";
    f.add("pserver_transport_refused_connections_total", c, help, &[("server", s)], t.refused as f64);
    for tb in &r.tables {
        let id = tb.id.to_string();
        let l = [("server", s), ("table", id.as_str())];
        f.add("pserver_table_ranges", g, "Key ranges of the table on the server.", &l, tb.ranges.len() as f64);
        let keys: u64 = tb.ranges.iter().map(|(a, b)| b - a).sum();
        f.add("pserver_table_keys", g, "Keys of the table the server owns.", &l, keys as f64);
        if let Some((lo, hi)) = tb.clock_span() {
            f.add("pserver_table_clock_min", g, "Slowest live worker's applied clock.", &l, lo as f64);
            f.add("pserver_table_clock_max", g, "Fastest live worker's applied clock.", &l, hi as f64);
        }
        let help = "Clocks between the fastest and slowest live worker.";
        f.add("pserver_table_staleness", g, help, &l, tb.staleness() as f64);
        for (w, &clock) in tb.clocks.iter().enumerate() {
            if clock != CLOCK_LEFT {
                let w = w.to_string();
                let l = [("server", s), ("table", id.as_str()), ("worker", w.as_str())];
                f.add("pserver_table_worker_clock", g, "A worker's applied clock on the table.", &l, clock as f64);
            }
        }
    }
    if let Some(rt) = rates {
        let help = "Per second, over the last two reports.";
        f.add("pserver_server_push_rate", g, help, &[("server", s)], rt.pushes);
        f.add("pserver_server_pull_rate", g, help, &[("server", s)], rt.pulls);
        f.add("pserver_server_received_bytes_rate", g, help, &[("server", s)], rt.bytes_received);
        f.add("pserver_server_sent_bytes_rate", g, help, &[("server", s)], rt.bytes_sent);
    }
}

/// A server's own figures.
pub fn render_server(r: &ServerReport) -> String {
    let mut f = Families::default();
    f.add("pserver_up", "gauge", "1 while the node serves.", &[("role", "server")], 1.0);
    server_families(&mut f, r, None);
    f.render()
}

/// The whole job, as the scheduler knows it.
pub fn render_job(s: &JobStatus) -> String {
    let mut f = Families::default();
    let g = "gauge";
    f.add("pserver_up", g, "1 while the node serves.", &[("role", "scheduler")], 1.0);
    f.add("pserver_job_epoch", g, "Range-map epoch.", &[], f64::from(s.epoch));
    f.add("pserver_job_uptime_seconds", g, "Seconds since the scheduler started.", &[], s.uptime_s);
    f.add("pserver_job_failed", g, "1 once the job failed.", &[], if s.failure.is_some() { 1.0 } else { 0.0 });
    f.add("pserver_job_expected_nodes", g, "Nodes the job is made of.", &[("role", "server")], f64::from(s.servers));
    f.add("pserver_job_expected_nodes", g, "Nodes the job is made of.", &[("role", "worker")], f64::from(s.workers));
    let mut states: BTreeMap<(String, String), u64> = BTreeMap::new();
    for n in &s.nodes {
        *states.entry((n.role.to_string(), n.state.clone())).or_default() += 1;
        let rank = n.rank.map_or_else(|| "unranked".to_string(), |r| r.to_string());
        let role = n.role.to_string();
        if let Some(age) = n.last_heartbeat_s {
            let l = [("role", role.as_str()), ("rank", rank.as_str())];
            f.add("pserver_node_heartbeat_age_seconds", g, "Seconds since the node was last heard from.", &l, age);
        }
        if let Some(r) = &n.server {
            server_families(&mut f, r, Some(&n.rates));
        }
        if let Some(w) = &n.worker {
            let l = [("worker", rank.as_str())];
            f.add("pserver_worker_clock", g, "The worker's clock.", &l, f64::from(w.clock));
            let t = &w.traffic;
            f.add("pserver_worker_requests_total", "counter", "Requests the worker sent.", &l, t.requests as f64);
            let help = "Payload bytes the worker moved.";
            let sent = [("worker", rank.as_str()), ("direction", "sent")];
            f.add("pserver_worker_payload_bytes_total", "counter", help, &sent, t.bytes_sent as f64);
            let received = [("worker", rank.as_str()), ("direction", "received")];
            f.add("pserver_worker_payload_bytes_total", "counter", help, &received, t.bytes_received as f64);
            let help = "Pulls the worker served from shared memory.";
            f.add("pserver_worker_shm_pulls_total", "counter", help, &l, t.shm_pulls as f64);
        }
    }
    for ((role, state), n) in states {
        let l = [("role", role.as_str()), ("state", state.as_str())];
        f.add("pserver_job_nodes", g, "Nodes by role and state.", &l, n as f64);
    }
    f.render()
}

/// An HTTP endpoint serving `GET /metrics`; stops when dropped.
pub struct MetricsServer {
    server: Arc<tiny_http::Server>,
    addr: std::net::SocketAddr,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Listens at `bind` (port 0 picks one) and answers every scrape with
    /// what `render` returns at that moment.
    pub fn start(bind: &str, render: impl Fn() -> String + Send + 'static) -> Result<MetricsServer> {
        let server =
            tiny_http::Server::http(bind).map_err(|e| Error::Config(format!("cannot serve metrics on {bind}: {e}")))?;
        let addr = server
            .server_addr()
            .to_ip()
            .ok_or_else(|| Error::Config(format!("metrics address {bind} is not an IP address")))?;
        let server = Arc::new(server);
        let s2 = server.clone();
        let thread = std::thread::Builder::new()
            .name("pserver-metrics".into())
            .spawn(move || {
                for req in s2.incoming_requests() {
                    let path = req.url().split('?').next().unwrap_or("").to_string();
                    let response = match (req.method(), path.as_str()) {
                        (tiny_http::Method::Get, "/metrics") => {
                            let header = tiny_http::Header::from_bytes(
                                &b"Content-Type"[..],
                                &b"text/plain; version=0.0.4; charset=utf-8"[..],
                            )
                            .expect("a valid header");
                            tiny_http::Response::from_string(render()).with_header(header)
                        }
                        (tiny_http::Method::Get, "/") => {
                            tiny_http::Response::from_string("pserver: metrics at /metrics\n")
                        }
                        _ => tiny_http::Response::from_string("not found; metrics are at /metrics\n")
                            .with_status_code(404),
                    };
                    if let Err(e) = req.respond(response) {
                        tracing::debug!(error = %e, "a metrics scrape was cut short");
                    }
                }
            })
            .map_err(|e| Error::io("spawning the metrics thread", e))?;
        tracing::info!(%addr, "serving metrics at /metrics");
        Ok(MetricsServer { server, addr, thread: Some(thread) })
    }

    /// Where it listens.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::TableReport;

    #[test]
    fn families_are_grouped_and_labels_escaped() {
        let r = |rank| ServerReport {
            rank: Some(rank),
            pushes: 3,
            tables: vec![TableReport {
                id: 1,
                ranges: vec![(0, 10)],
                clocks: vec![2, CLOCK_LEFT, 4],
                ..Default::default()
            }],
            ..Default::default()
        };
        let mut f = Families::default();
        server_families(&mut f, &r(0), None);
        server_families(&mut f, &r(1), None);
        f.add("pserver_x", "gauge", "x", &[("a", "q\"\\\n")], 1.0);
        let text = f.render();
        // Every family's samples follow its TYPE line, with no other family between.
        let mut current = "";
        let mut seen = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                current = rest.split(' ').next().unwrap();
                assert!(seen.insert(current.to_string()), "{current} declared twice");
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                assert_eq!(name, current, "{line}");
            }
        }
        assert!(text.contains("pserver_server_requests_total{server=\"1\",kind=\"push\"} 3"), "{text}");
        assert!(text.contains("pserver_table_staleness{server=\"0\",table=\"1\"} 2"), "{text}");
        assert!(!text.contains("worker=\"1\""), "a worker that left has no clock: {text}");
        assert!(text.contains(r#"pserver_x{a="q\"\\\n"} 1"#), "{text}");
    }
}
