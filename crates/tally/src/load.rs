//! `tally load`: an open-loop HTTP load generator. Request `i` is due at
//! `start + i / rate`, whatever happened to the requests before it, and its latency
//! counts from that due time: a server that stalls is charged for every request that
//! would have queued behind the stall (no coordinated omission, as closed-loop tools
//! like wrk have). Requests go out over a fixed number of keep-alive connections; a
//! request due while every connection is busy waits for one, and that wait counts.

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct LoadArgs {
    /// The URL to POST to.
    #[arg(long)]
    url: String,
    /// Requests per second offered.
    #[arg(long)]
    rate: u64,
    /// How long to offer them, in seconds.
    #[arg(long, default_value_t = 20)]
    duration_s: u64,
    /// Keep-alive connections (each carries one request at a time).
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// A header, `Name: value`; repeatable.
    #[arg(long = "header")]
    headers: Vec<String>,
    /// The JSON body; each `{rand:A:B}` becomes a random integer in A..=B.
    #[arg(long)]
    body: String,
    /// Count an answer as an error unless its body contains this.
    #[arg(long)]
    expect: Option<String>,
    /// Seconds of load before measuring (connections warm up, caches fill).
    #[arg(long, default_value_t = 2)]
    warmup_s: u64,
}

/// Most requests waiting for a free connection; beyond it the server is hopelessly
/// behind and the run stops rather than pile up memory.
const BACKLOG_MAX: usize = 1_000_000;
const CONNECTIONS_MAX: usize = 4_096;

/// A body with its random parts.
struct Template {
    parts: Vec<Part>,
}

enum Part {
    Text(String),
    Random(u64, u64),
}

impl Template {
    fn parse(text: &str) -> anyhow::Result<Template> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find("{rand:") {
            parts.push(Part::Text(rest[..start].to_string()));
            let end = rest[start..].find('}').context("an unclosed {rand:A:B}")? + start;
            let (low, high) = rest[start + 6..end].split_once(':').context("{rand:A:B} needs two bounds")?;
            let (low, high): (u64, u64) = (low.parse()?, high.parse()?);
            if low > high {
                bail!("{{rand:{low}:{high}}}: the lower bound is above the upper");
            }
            parts.push(Part::Random(low, high));
            rest = &rest[end + 1..];
        }
        parts.push(Part::Text(rest.to_string()));
        Ok(Template { parts })
    }

    fn render(&self, rng: &mut SmallRng) -> String {
        let mut out = String::with_capacity(128);
        for part in &self.parts {
            match part {
                Part::Text(text) => out.push_str(text),
                Part::Random(low, high) => out.push_str(&rng.gen_range(*low..=*high).to_string()),
            }
        }
        out
    }
}

/// Where requests go: the address, and the request head every request shares.
#[derive(Clone)]
struct Target {
    address: String,
    head: String,
}

impl Target {
    fn parse(url: &str, headers: &[String]) -> anyhow::Result<Target> {
        let rest = url.strip_prefix("http://").context("only http:// URLs (a server on this machine)")?;
        let (address, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let path = if path.is_empty() { "/" } else { path };
        let mut head = format!("POST {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n");
        for header in headers {
            let (name, value) = header.split_once(':').context("a header is `Name: value`")?;
            if name.contains(['\r', '\n']) || value.contains(['\r', '\n']) {
                bail!("a header cannot hold line breaks");
            }
            head.push_str(&format!("{}: {}\r\n", name.trim(), value.trim()));
        }
        Ok(Target { address: address.to_string(), head })
    }
}

/// Most bytes of a response head or body this tool reads.
const RESPONSE_BYTES_MAX: usize = 1 << 20;

/// One keep-alive HTTP/1.1 connection, written and read by hand: a general client
/// (reqwest) cost more CPU per request than the server's own work, on the same two cores.
struct Connection {
    stream: tokio::io::BufReader<tokio::net::TcpStream>,
    line: String,
}

async fn open_and_post(
    slot: &mut Option<Connection>,
    open: Connection,
    target: &Target,
    body: &str,
) -> anyhow::Result<(u16, String)> {
    slot.insert(open).post(target, body).await
}

impl Connection {
    async fn open(target: &Target) -> anyhow::Result<Connection> {
        let stream = tokio::net::TcpStream::connect(&target.address).await?;
        stream.set_nodelay(true)?;
        Ok(Connection { stream: tokio::io::BufReader::new(stream), line: String::new() })
    }

    /// Sends one request and reads its answer: the status and the body.
    async fn post(&mut self, target: &Target, body: &str) -> anyhow::Result<(u16, String)> {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
        let request = format!("{}Content-Length: {}\r\n\r\n{body}", target.head, body.len());
        self.stream.get_mut().write_all(request.as_bytes()).await?;
        let mut status = None;
        let mut length = 0usize;
        let mut read = 0;
        loop {
            self.line.clear();
            let n = self.stream.read_line(&mut self.line).await?;
            read += n;
            if n == 0 || read > RESPONSE_BYTES_MAX {
                bail!("the server closed the connection or sent an endless head");
            }
            let line = self.line.trim_end();
            if line.is_empty() {
                break;
            }
            if status.is_none() {
                status = line.split(' ').nth(1).and_then(|code| code.parse::<u16>().ok());
                continue;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse()?;
                }
            }
        }
        if length > RESPONSE_BYTES_MAX {
            bail!("a response body of {length} bytes");
        }
        let mut answer = vec![0; length];
        self.stream.read_exact(&mut answer).await?;
        Ok((status.context("no status line")?, String::from_utf8_lossy(&answer).into_owned()))
    }
}

/// The load generator's shortest sleep: it hands out at most this much of the
/// schedule per wake-up (3 requests at 30,000/s).
const GENERATOR_TICK: Duration = Duration::from_micros(100);

struct Due {
    at: Instant,
    body: String,
    measured: bool,
}

#[derive(Default)]
struct Outcome {
    latencies: Option<Histogram<u64>>,
    errors: u64,
    first_error: Option<String>,
}

pub fn run(args: LoadArgs) -> anyhow::Result<()> {
    if args.rate == 0 || args.connections == 0 || args.connections > CONNECTIONS_MAX {
        bail!("--rate must be positive and --connections in 1..={CONNECTIONS_MAX}");
    }
    let template = Template::parse(&args.body)?;
    let target = Target::parse(&args.url, &args.headers)?;
    // One thread drives every connection: no hand-offs between threads per request.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    // Each connection gets every n-th request (a fixed share of the rate, as wrk2 does);
    // one it cannot send yet waits in its queue, and the wait counts.
    let (senders, receivers): (Vec<_>, Vec<_>) =
        (0..args.connections).map(|_| tokio::sync::mpsc::channel::<Due>(BACKLOG_MAX / args.connections)).unzip();
    let total = args.rate * (args.warmup_s + args.duration_s);
    let interval_ns = 1_000_000_000 / args.rate;
    let warmup = args.rate * args.warmup_s;
    // The schedule runs on a thread of its own (the async timer's 1 ms granularity would
    // make requests late by up to a millisecond). It wakes at most every
    // `GENERATOR_TICK` and hands out every request due by then: a wake-up per request
    // (30,000/s) cost the load tool more CPU than the server's HTTP handling, on the
    // same two cores. A request handed out late still counts from its due time.
    let generator = std::thread::Builder::new().name("load-generator".into()).spawn(move || {
        // SAFETY: PR_SET_TIMERSLACK only changes this thread's timer slack.
        unsafe {
            libc::prctl(libc::PR_SET_TIMERSLACK, 10_000u64);
        }
        let mut rng = SmallRng::seed_from_u64(7);
        let mut lateness = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
        let begin = Instant::now() + Duration::from_millis(50);
        let due_at = |index: u64| begin + Duration::from_nanos(index * interval_ns);
        let mut index = 0;
        while index < total {
            let now = Instant::now();
            while index < total && due_at(index) <= now {
                let at = due_at(index);
                lateness.saturating_record(at.elapsed().as_micros() as u64);
                let due = Due { at, body: template.render(&mut rng), measured: index >= warmup };
                if senders[index as usize % senders.len()].try_send(due).is_err() {
                    return Err(lateness);
                }
                index += 1;
            }
            if index < total {
                std::thread::sleep(due_at(index).saturating_duration_since(Instant::now()).max(GENERATOR_TICK));
            }
        }
        Ok(lateness)
    })?;
    let outcomes: Vec<Outcome> = runtime.block_on(async {
        let mut tasks = Vec::new();
        for mut receiver in receivers {
            let (target, expect) = (target.clone(), args.expect.clone());
            tasks.push(tokio::spawn(async move {
                let mut outcome = Outcome {
                    latencies: Some(Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")),
                    ..Outcome::default()
                };
                let mut connection: Option<Connection> = None;
                while let Some(due) = receiver.recv().await {
                    let answer = match connection.as_mut() {
                        Some(open) => open.post(&target, &due.body).await,
                        None => match Connection::open(&target).await {
                            Ok(open) => open_and_post(&mut connection, open, &target, &due.body).await,
                            Err(error) => Err(error),
                        },
                    };
                    let error = match answer {
                        Ok((status, body)) => {
                            let unexpected = expect.as_ref().is_some_and(|e| !body.contains(e.as_str()));
                            (!(200..300).contains(&status) || unexpected).then(|| format!("{status}: {body}"))
                        }
                        Err(error) => {
                            // The next request opens a new connection.
                            connection = None;
                            Some(error.to_string())
                        }
                    };
                    if !due.measured {
                        continue;
                    }
                    if let Some(error) = error {
                        outcome.errors += 1;
                        outcome.first_error.get_or_insert(error);
                    }
                    let micros = due.at.elapsed().as_micros() as u64;
                    outcome.latencies.as_mut().expect("histogram").saturating_record(micros.max(1));
                }
                outcome
            }));
        }
        let mut outcomes = Vec::new();
        for task in tasks {
            outcomes.push(task.await.expect("connection task"));
        }
        outcomes
    });
    let lateness = match generator.join().expect("generator thread") {
        Ok(lateness) => lateness,
        Err(_) => bail!("more than {BACKLOG_MAX} requests waited for a connection: the server is far behind"),
    };
    let mut latencies = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (mut errors, mut first_error) = (0, None);
    for outcome in outcomes {
        latencies.add(outcome.latencies.expect("histogram"))?;
        errors += outcome.errors;
        first_error = first_error.or(outcome.first_error);
    }
    let ms = |q: f64| latencies.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "offered {}/s for {} s over {} connections: {} measured, {} errors; latency from due time p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms; generator p99 {:.3} ms late",
        args.rate,
        args.duration_s,
        args.connections,
        latencies.len(),
        errors,
        ms(0.5),
        ms(0.9),
        ms(0.99),
        ms(0.999),
        latencies.max() as f64 / 1000.0,
        lateness.value_at_quantile(0.99) as f64 / 1000.0
    );
    if let Some(error) = first_error {
        println!("first error: {error}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_template_fills_random_numbers_within_their_bounds() {
        let template = Template::parse(r#"{"consumer":"org_{rand:2:4}","quantity":"{rand:7:7}"}"#).unwrap();
        let mut rng = SmallRng::seed_from_u64(1);
        for _ in 0..100 {
            let body: serde_json::Value = serde_json::from_str(&template.render(&mut rng)).unwrap();
            let consumer = body["consumer"].as_str().unwrap();
            assert!(["org_2", "org_3", "org_4"].contains(&consumer), "{consumer}");
            assert_eq!(body["quantity"], "7");
        }
        assert!(Template::parse("{rand:5:1}").is_err());
        assert!(Template::parse("{rand:1}").is_err());
        assert!(Template::parse("{rand:1:2").is_err());
    }

    #[test]
    fn the_request_head_carries_the_path_host_and_headers_and_refuses_line_breaks() {
        let target =
            Target::parse("http://127.0.0.1:8080/v1/access-checks", &["Authorization: Bearer k".to_string()]).unwrap();
        assert_eq!(target.address, "127.0.0.1:8080");
        assert!(target.head.starts_with("POST /v1/access-checks HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"));
        assert!(target.head.ends_with("Authorization: Bearer k\r\n"));
        assert!(Target::parse("https://example.com/", &[]).is_err());
        assert!(Target::parse("http://h/", &["X: a\r\nY: b".to_string()]).is_err());
    }
}
