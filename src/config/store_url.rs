//! The fleet store's address as written in `fleet.url`: a Redis URL (`redis://`,
//! `rediss://`, parsed by the `redis` crate) or a Redis Sentinel one, parsed here:
//! `redis+sentinel://[user[:password]@]host:port[,host:port...]/master[/db]`
//! (`rediss+sentinel://` with TLS to the sentinels and the master). Parsing only: no
//! sockets, no name resolution.

/// A `redis+sentinel://` URL, taken apart (its `Debug` leaves the password out).
#[derive(Clone, PartialEq, Eq)]
pub struct SentinelUrl {
    /// The sentinels, in the order written: (host, port). A missing port is 26379.
    pub sentinels: Vec<(String, u16)>,
    /// The name Sentinel monitors the primary under (`sentinel monitor <name> ...`).
    pub master: String,
    /// The database on the primary (0 when not written).
    pub db: i64,
    /// `rediss+sentinel://`: TLS to the sentinels and to the primary.
    pub tls: bool,
    /// Credentials for the primary (the sentinels are asked without).
    pub username: Option<String>,
    pub password: Option<String>,
}

impl std::fmt::Debug for SentinelUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentinelUrl")
            .field("sentinels", &self.sentinels)
            .field("master", &self.master)
            .field("db", &self.db)
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// The port sentinels listen on unless told otherwise.
pub const SENTINEL_PORT: u16 = 26379;

/// `Ok(None)` for a URL that is not a Sentinel one; `Err` says what is wrong with one that is.
pub fn parse_sentinel_url(url: &str) -> Result<Option<SentinelUrl>, String> {
    let (tls, rest) = if let Some(rest) = url.strip_prefix("redis+sentinel://") {
        (false, rest)
    } else if let Some(rest) = url.strip_prefix("rediss+sentinel://") {
        (true, rest)
    } else {
        return Ok(None);
    };
    let (auth, rest) = match rest.rsplit_once('@') {
        Some((auth, rest)) => (Some(auth), rest),
        None => (None, rest),
    };
    let (username, password) = match auth {
        None => (None, None),
        Some(a) => {
            let (u, p) = match a.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (a, None),
            };
            let u = percent_decode(u)?;
            let p = p.map(percent_decode).transpose()?;
            ((!u.is_empty()).then_some(u), p.filter(|p| !p.is_empty()))
        }
    };
    let (hosts, path) = rest.split_once('/').ok_or_else(|| {
        "names no master: write redis+sentinel://host:26379[,host:26379]/<master>[/<db>]"
            .to_string()
    })?;
    let mut sentinels = Vec::new();
    for host in hosts.split(',') {
        sentinels.push(host_port(host)?);
    }
    let mut parts = path.trim_end_matches('/').split('/');
    let master = parts.next().unwrap_or_default();
    if master.is_empty() {
        return Err(
            "names no master: write redis+sentinel://host:26379[,host:26379]/<master>[/<db>]"
                .into(),
        );
    }
    let db = match parts.next() {
        None => 0,
        Some(d) => d
            .parse::<i64>()
            .ok()
            .filter(|d| *d >= 0)
            .ok_or_else(|| format!("{d:?} is not a database number"))?,
    };
    if let Some(extra) = parts.next() {
        return Err(format!(
            "{extra:?} after the database: write redis+sentinel://host:26379/<master>/<db>"
        ));
    }
    Ok(Some(SentinelUrl {
        sentinels,
        master: master.to_string(),
        db,
        tls,
        username,
        password,
    }))
}

fn host_port(s: &str) -> Result<(String, u16), String> {
    if s.is_empty() {
        return Err("an empty sentinel address (two commas, or none before the /)".into());
    }
    // [v6]:port, [v6], host:port, host
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("{s:?}: an IPv6 address needs its closing ]"))?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| format!("{s:?}: expected :port after ]"))?,
            ),
        };
        (h, port)
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    if host.is_empty() {
        return Err(format!("{s:?} has no host"));
    }
    let port = match port {
        None => SENTINEL_PORT,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{s:?}: {p:?} is not a port"))?,
    };
    Ok((host.to_string(), port))
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| {
                    "a % in the credentials is not followed by two hex digits".to_string()
                })?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "the credentials are not UTF-8 once decoded".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentinel_urls_are_taken_apart() {
        let u = parse_sentinel_url("redis+sentinel://a:26379,[::1]:26380,b/mymaster/2")
            .unwrap()
            .unwrap();
        assert_eq!(
            u.sentinels,
            vec![
                ("a".to_string(), 26379),
                ("::1".to_string(), 26380),
                ("b".to_string(), SENTINEL_PORT)
            ]
        );
        assert_eq!((u.master.as_str(), u.db, u.tls), ("mymaster", 2, false));
        let u = parse_sentinel_url("rediss+sentinel://:s%40cret@h:1/m")
            .unwrap()
            .unwrap();
        assert_eq!((u.tls, u.db), (true, 0));
        assert_eq!(u.password.as_deref(), Some("s@cret"));
        assert_eq!(u.username, None);
        assert_eq!(parse_sentinel_url("redis://h:6379/0"), Ok(None));
    }

    #[test]
    fn a_bad_sentinel_url_says_what_is_wrong() {
        for (url, says) in [
            ("redis+sentinel://h:26379", "names no master"),
            ("redis+sentinel://h:26379/", "names no master"),
            ("redis+sentinel://h:x/m", "is not a port"),
            ("redis+sentinel://h,,i/m", "empty sentinel address"),
            ("redis+sentinel://h/m/x", "not a database number"),
            ("redis+sentinel://h/m/0/z", "after the database"),
            ("redis+sentinel://[::1/m", "closing ]"),
        ] {
            let e = parse_sentinel_url(url).unwrap_err();
            assert!(e.contains(says), "{url}: {e}");
        }
    }
}
