//! The access log: one line per request, written off the request path.
//!
//! Pingora's `logging` hook formats the line (JSON by default, or the combined format of
//! nginx and Apache) and hands it to a bounded queue with `try_send`: a request never
//! waits for the disk. A writer thread wakes every 100 ms, drains the queue into a
//! buffered file (or stdout) and flushes once. It never waits *on* the queue: a waiting
//! receiver would make every request's send a futex wake-up, and a flush per line a write
//! system call (measured: +3.2 system calls and +12% instructions per request; with the
//! timed drain both are gone). When the queue is full the line is dropped
//! and counted in `kanaria_access_log_dropped_total`. SIGUSR1 asks the writer to reopen
//! the file by its path, for logrotate's rename-then-signal (the handler only sets a flag:
//! async-signal-safe). The settings are read at start; changing `[log]` needs a restart.

use std::fmt::Write as _;
use std::io::Write;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use pingora::proxy::Session;
use prometheus::IntCounter;

use super::Ctx;
use crate::proxy::headers::push_ip;

pub use crate::config::{LogFormat as Format, LogSettings, LogTarget as Target};

/// Set by SIGUSR1; the writer reopens the file when it sees it.
static REOPEN: AtomicBool = AtomicBool::new(false);

/// The request side of the access log: cheap to call from the `logging` hook.
pub struct AccessLog {
    tx: SyncSender<String>,
    format: Format,
    dropped: IntCounter,
}

impl AccessLog {
    /// Opens the target and starts the writer thread. `None` when the log is off.
    pub fn start(
        settings: &LogSettings,
        registry: &prometheus::Registry,
    ) -> anyhow::Result<Option<Arc<AccessLog>>> {
        // Always handled, so a logrotate `kill -USR1` never terminates Kanaria (SIGUSR1's
        // default action), whatever `[log]` says.
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            signal_hook_registry::register(libc::SIGUSR1, || REOPEN.store(true, Ordering::Relaxed))
        }
        .map_err(|e| anyhow::anyhow!("cannot handle SIGUSR1 for the access log: {e}"))?;
        if settings.access == Target::Off {
            return Ok(None);
        }
        let dropped = IntCounter::new(
            "kanaria_access_log_dropped_total",
            "Access log lines dropped because the writer fell behind (queue full).",
        )?;
        registry.register(Box::new(dropped.clone()))?;
        let out = open(&settings.access)?;
        let (tx, rx) = std::sync::mpsc::sync_channel(settings.queue.max(1));
        let target = settings.access.clone();
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || writer(rx, target, out))?;
        Ok(Some(Arc::new(AccessLog {
            tx,
            format: settings.format,
            dropped,
        })))
    }

    /// Formats the line of a finished request and queues it; drops it when the queue is full.
    pub fn log(&self, session: &Session, ctx: &Ctx) {
        let line = match self.format {
            Format::Json => json_line(session, ctx),
            Format::Combined => combined_line(session, ctx),
        };
        match self.tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.dropped.inc(),
            // The writer is gone (it logged why); nothing to do per request.
            Err(TrySendError::Disconnected(_)) => self.dropped.inc(),
        }
    }
}

fn open(target: &Target) -> std::io::Result<Box<dyn Write + Send>> {
    Ok(match target {
        Target::Off | Target::Stdout => Box::new(std::io::stdout()),
        Target::File(path) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| {
                    std::io::Error::new(
                        e.kind(),
                        format!("log.access: cannot open {}: {e}", path.display()),
                    )
                })?,
        ),
    })
}

/// How often the writer drains the queue: lines reach the file within this.
const DRAIN_EVERY: Duration = Duration::from_millis(100);

/// The writer thread: every [`DRAIN_EVERY`] drains the queue and flushes once; reopens on
/// SIGUSR1; flushes and ends when the proxy is gone.
fn writer(rx: Receiver<String>, target: Target, out: Box<dyn Write + Send>) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    loop {
        if REOPEN.swap(false, Ordering::Relaxed) {
            let _ = out.flush();
            match open(&target) {
                Ok(f) => {
                    out = std::io::BufWriter::with_capacity(64 * 1024, f);
                    log::info!("access log reopened (SIGUSR1)");
                }
                Err(e) => log::warn!("cannot reopen the access log, keeping the old file: {e}"),
            }
        }
        let mut res = Ok(());
        let mut wrote = false;
        let gone = loop {
            match rx.try_recv() {
                Ok(line) => {
                    if res.is_ok() {
                        res = out.write_all(line.as_bytes());
                    }
                    wrote = true;
                }
                Err(TryRecvError::Empty) => break false,
                Err(TryRecvError::Disconnected) => break true,
            }
        };
        if wrote {
            if let Err(e) = res.and_then(|()| out.flush()) {
                log::warn!("access log write failed: {e}");
            }
        }
        if gone {
            break;
        }
        std::thread::sleep(DRAIN_EVERY);
    }
    let _ = out.flush();
}

/// The facts of one request, shared by both formats.
struct Facts<'a> {
    client: Option<IpAddr>,
    method: &'a str,
    host: &'a str,
    path: &'a str,
    version: &'static str,
    status: u16,
    bytes: usize,
}

fn facts<'a>(session: &'a Session, ctx: &Ctx) -> Facts<'a> {
    let req = session.req_header();
    let trusted = ctx
        .live
        .as_ref()
        .map_or(&[][..], |l| &l.snapshot.config.edge.trusted_proxies[..]);
    Facts {
        // As the split saw it; computed here only for requests refused before that.
        client: ctx
            .edge
            .client
            .or_else(|| crate::proxy::headers::client_ip(session, trusted)),
        method: req.method.as_str(),
        host: req
            .headers
            .get(http::header::HOST)
            .and_then(|v| v.to_str().ok())
            .or_else(|| req.uri.host())
            .unwrap_or(""),
        path: req.uri.path_and_query().map_or("/", |p| p.as_str()),
        version: match req.version {
            http::Version::HTTP_2 => "HTTP/2.0",
            http::Version::HTTP_10 => "HTTP/1.0",
            _ => "HTTP/1.1",
        },
        status: session
            .as_downstream()
            .response_written()
            .map_or(0, |r| r.status.as_u16()),
        bytes: session.as_downstream().body_bytes_sent(),
    }
}

/// Appends `s` as a JSON string.
fn json_str(out: &mut String, s: &str) {
    out.push('"');
    // Copies runs that need no escape whole: nearly every value is one such run.
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let escaped = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b if b < 0x20 => "",
            _ => continue,
        };
        out.push_str(&s[start..i]);
        if escaped.is_empty() {
            let _ = write!(out, "\\u{:04x}", b);
        } else {
            out.push_str(escaped);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// Appends a number in decimal without the formatting machinery.
fn push_uint(out: &mut String, n: u64) {
    out.push_str(itoa::Buffer::new().format(n));
}

/// Appends a value that needs no JSON escaping, quoted: route names and release labels
/// (the config allows only `A-Z a-z 0-9 - _ .` in them), methods and track names.
fn json_plain(out: &mut String, s: &str) {
    debug_assert!(!s.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20));
    out.push('"');
    out.push_str(s);
    out.push('"');
}

/// Writes `d` in milliseconds with three decimals (microseconds), by integer arithmetic:
/// float formatting was a large part of a line's cost.
fn write_ms(out: &mut String, d: Duration) {
    let us = d.as_micros() as u64;
    push_uint(out, us / 1000);
    let frac = us % 1000;
    out.push('.');
    out.push(char::from(b'0' + (frac / 100) as u8));
    out.push(char::from(b'0' + (frac / 10 % 10) as u8));
    out.push(char::from(b'0' + (frac % 10) as u8));
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for now. The date and time to the second are formatted once
/// per second per thread and reused: requests in the same second only add the millis.
fn write_time(out: &mut String, now: SystemTime) {
    use std::cell::RefCell;
    thread_local! {
        static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let since = now
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    SECOND.with(|cell| {
        let mut cached = cell.borrow_mut();
        if cached.0 != since.as_secs() {
            let whole = std::time::UNIX_EPOCH + Duration::from_secs(since.as_secs());
            // "2000-10-10T13:55:36Z" without the Z.
            let mut t = humantime::format_rfc3339_seconds(whole).to_string();
            t.pop();
            *cached = (since.as_secs(), t);
        }
        out.push_str(&cached.1);
    });
    let _ = write!(out, ".{:03}Z", since.subsec_millis());
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn request_id<'a>(session: &'a Session, ctx: &'a Ctx) -> Option<&'a str> {
    if let Some(id) = &ctx.generated_request_id {
        return id.to_str().ok();
    }
    let live = ctx.live.as_ref()?;
    session
        .req_header()
        .headers
        .get(&live.snapshot.headers.request_id.name)?
        .to_str()
        .ok()
}

fn json_line(session: &Session, ctx: &Ctx) -> String {
    let f = facts(session, ctx);
    let route = ctx.route();
    let mut s = String::with_capacity(512);
    s.push_str("{\"time\":\"");
    write_time(&mut s, SystemTime::now());
    s.push_str("\",\"client\":");
    match f.client {
        Some(ip) => {
            s.push('"');
            push_ip(&mut s, ip);
            s.push('"');
        }
        None => s.push_str("null"),
    }
    s.push_str(",\"method\":");
    json_plain(&mut s, f.method);
    s.push_str(",\"host\":");
    json_str(&mut s, f.host);
    s.push_str(",\"path\":");
    json_str(&mut s, f.path);
    s.push_str(",\"protocol\":\"");
    s.push_str(f.version);
    s.push_str(if ctx.edge.tls {
        "\",\"tls\":true,\"status\":"
    } else {
        "\",\"tls\":false,\"status\":"
    });
    push_uint(&mut s, u64::from(f.status));
    s.push_str(",\"bytes\":");
    push_uint(&mut s, f.bytes as u64);
    s.push_str(",\"route\":");
    match route {
        Some(r) => json_plain(&mut s, &r.name),
        None => s.push_str("null"),
    }
    s.push_str(",\"track\":");
    match ctx.version {
        Some(v) => json_plain(&mut s, v.as_str()),
        None => s.push_str("null"),
    }
    s.push_str(",\"release\":");
    match (route, ctx.version) {
        (Some(r), Some(v)) => json_plain(&mut s, &r.pool(v).version),
        _ => s.push_str("null"),
    }
    s.push_str(",\"bucket\":");
    let bucket = route.and_then(|r| {
        r.split.bucket_of(
            &session.req_header().headers,
            f.client,
            ctx.edge.issued_key(),
        )
    });
    match bucket {
        Some(b) => push_uint(&mut s, u64::from(b)),
        None => s.push_str("null"),
    }
    s.push_str(",\"upstream\":");
    match ctx.edge.upstream_addr {
        Some(a) => {
            s.push('"');
            if a.is_ipv6() {
                s.push('[');
                push_ip(&mut s, a.ip());
                s.push(']');
            } else {
                push_ip(&mut s, a.ip());
            }
            s.push(':');
            push_uint(&mut s, u64::from(a.port()));
            s.push('"');
        }
        None => s.push_str("null"),
    }
    s.push_str(",\"upstream_ms\":");
    match ctx.attempt_latency {
        Some(secs) => write_ms(&mut s, Duration::from_secs_f64(secs)),
        None => s.push_str("null"),
    }
    s.push_str(",\"total_ms\":");
    write_ms(&mut s, ctx.start.elapsed());
    s.push_str(if ctx.retried {
        ",\"retried\":true"
    } else {
        ",\"retried\":false"
    });
    s.push_str(",\"request_id\":");
    match request_id(session, ctx) {
        Some(id) => json_str(&mut s, id),
        None => s.push_str("null"),
    }
    s.push_str("}\n");
    s
}

/// `10/Oct/2000:13:55:36 +0000` from an RFC 3339 UTC time.
fn clf_time(now: SystemTime) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    // "2000-10-10T13:55:36Z"
    let t = humantime::format_rfc3339_seconds(now).to_string();
    let month = t
        .get(5..7)
        .and_then(|m| m.parse::<usize>().ok())
        .and_then(|m| MONTHS.get(m.wrapping_sub(1)))
        .unwrap_or(&"Jan");
    format!(
        "{}/{month}/{}:{} +0000",
        t.get(8..10).unwrap_or("01"),
        t.get(0..4).unwrap_or("1970"),
        t.get(11..19).unwrap_or("00:00:00"),
    )
}

/// nginx's `combined`, plus the route, track, upstream time and request id at the end.
fn combined_line(session: &Session, ctx: &Ctx) -> String {
    let f = facts(session, ctx);
    let h = &session.req_header().headers;
    let header = |name: http::header::HeaderName| {
        h.get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .replace('"', "\\\"")
    };
    let client = f.client.map_or("-".to_string(), |ip| ip.to_string());
    format!(
        "{client} - - [{}] \"{} {} {}\" {} {} \"{}\" \"{}\" route={} track={} upstream_ms={} request_id={}\n",
        clf_time(SystemTime::now()),
        f.method,
        f.path.replace('"', "%22"),
        f.version,
        f.status,
        f.bytes,
        header(http::header::REFERER),
        header(http::header::USER_AGENT),
        ctx.route().map_or("-", |r| r.name.as_str()),
        ctx.version.map_or("-", |v| v.as_str()),
        ctx.attempt_latency
            .map_or("-".to_string(), |secs| ms(Duration::from_secs_f64(secs)).to_string()),
        request_id(session, ctx).unwrap_or("-"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_are_escaped_and_times_formatted() {
        let mut s = String::new();
        json_str(&mut s, "a\"b\\c\n");
        assert_eq!(s, "\"a\\\"b\\\\c\\u000a\"");
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(971_186_136);
        assert_eq!(clf_time(t), "10/Oct/2000:13:55:36 +0000");
        // The cached second, then the millis; a new second is formatted anew.
        let mut s = String::new();
        write_time(&mut s, t + Duration::from_millis(7));
        s.push(' ');
        write_time(&mut s, t + Duration::from_millis(999));
        s.push(' ');
        write_time(&mut s, t + Duration::from_millis(1_042));
        assert_eq!(
            s,
            "2000-10-10T13:55:36.007Z 2000-10-10T13:55:36.999Z 2000-10-10T13:55:37.042Z"
        );
        let mut s = String::new();
        write_ms(&mut s, Duration::from_micros(1_234_567));
        s.push(' ');
        write_ms(&mut s, Duration::from_micros(42));
        s.push(' ');
        push_ip(&mut s, "192.168.10.1".parse().unwrap());
        s.push(' ');
        push_ip(&mut s, "::1".parse().unwrap());
        s.push(' ');
        push_uint(&mut s, 0);
        s.push(' ');
        push_uint(&mut s, 18_446_744_073_709_551_615);
        assert_eq!(s, "1234.567 0.042 192.168.10.1 ::1 0 18446744073709551615");
    }
}
