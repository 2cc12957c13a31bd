//! Strict HTTP/1 message checks at the edge: request framing, header limits, upstream
//! response framing and hop-by-hop header stripping.
//!
//! Pingora is lenient where an edge proxy must not be: it accepts a request with both
//! `Content-Length` and `Transfer-Encoding` (it drops the length and reads chunked, pingora#945),
//! collapses identical duplicate lengths, and its parser (httparse) takes bare LF line ends.
//! Two front ends that disagree on where a request ends are how requests are smuggled, so
//! Kanaria re-checks the raw header bytes Pingora read ([`check_request_head`]) before
//! anything is routed, and refuses (400, connection closed) every message whose end is not
//! beyond doubt. These functions are pure (bytes in, verdict out) so the fuzz targets and
//! unit tests drive exactly what the proxy runs.
//!
//! All of this is HTTP/1-specific. An HTTP/2 request has no raw header bytes and no
//! length ambiguity (frames carry their lengths, `h2` rejects malformed ones), so the
//! request checks and `edge.max_header_bytes`/`max_headers` are skipped for it; the HTTP/2
//! limits `edge.h2_max_concurrent_streams` and `h2_max_header_list_size` apply instead.

use http::header::{HeaderName, CONNECTION, CONTENT_LENGTH, TE, TRANSFER_ENCODING, UPGRADE};
use http::HeaderMap;

pub use crate::config::HeaderLimits;
use crate::metrics::RejectReason;

/// Why a request was refused before routing. Each maps to a status and a metric reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// Ambiguous or malformed framing: 400, connection closed.
    Framing(&'static str),
    /// Header section above `max_bytes`: 431.
    HeaderTooLarge,
    /// More header fields than `max_count`: 431.
    TooManyHeaders,
}

impl Reject {
    pub fn status(self) -> u16 {
        match self {
            Reject::Framing(_) => 400,
            Reject::HeaderTooLarge | Reject::TooManyHeaders => 431,
        }
    }

    /// The `reason` label of `kanaria_rejected_requests_total`.
    pub fn reason(self) -> RejectReason {
        match self {
            Reject::Framing(_) => RejectReason::Framing,
            Reject::HeaderTooLarge => RejectReason::HeaderTooLarge,
            Reject::TooManyHeaders => RejectReason::TooManyHeaders,
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Reject::Framing(m) => m,
            Reject::HeaderTooLarge => "request header too large",
            Reject::TooManyHeaders => "too many request header fields",
        }
    }
}

/// `1*DIGIT` that fits a u64: no sign, no spaces, no list, no hex.
fn valid_length(v: &[u8]) -> bool {
    !v.is_empty()
        && v.len() <= 19
        && v.iter().all(u8::is_ascii_digit)
        && std::str::from_utf8(v).is_ok_and(|s| s.parse::<u64>().is_ok())
}

/// RFC 9110 token characters (header field names), one table lookup per byte.
const TCHAR: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'!' | b'#'
                    | b'$'
                    | b'%'
                    | b'&'
                    | b'\''
                    | b'*'
                    | b'+'
                    | b'-'
                    | b'.'
                    | b'^'
                    | b'_'
                    | b'`'
                    | b'|'
                    | b'~'
            );
        b += 1;
    }
    t
};

fn is_tchar(b: u8) -> bool {
    TCHAR[usize::from(b)]
}

/// The lines of `raw` split at LF (as `split(|b| *b == b'\n')`), found with `memchr`.
struct Lines<'a>(Option<&'a [u8]>);

impl<'a> Iterator for Lines<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let rest = self.0?;
        match memchr::memchr(b'\n', rest) {
            Some(i) => {
                self.0 = Some(&rest[i + 1..]);
                Some(&rest[..i])
            }
            None => {
                self.0 = None;
                Some(rest)
            }
        }
    }
}

/// Checks the raw request header section (request line to the blank line, as read from the
/// wire). Refuses: a header above the limits; any LF not preceded by CR or CR not followed
/// by LF; obsolete line folding; a malformed field name; more than one `Content-Length` or
/// one that is not plain digits; `Transfer-Encoding` other than one `chunked`; both of
/// them; `Transfer-Encoding` on HTTP/1.0.
///
/// A head that passes is recognised in one pass ([`plain_head`]); anything else goes
/// through the check in full, which gives the verdict and its reason.
pub fn check_request_head(raw: &[u8], limits: &HeaderLimits) -> Result<(), Reject> {
    if plain_head(raw, limits) {
        return Ok(());
    }
    check_request_head_in_full(raw, limits)
}

/// True only for a head [`check_request_head_in_full`] passes (the fuzz target checks
/// this), found in one pass: each line runs to its first CR or LF, which must be CRLF; a
/// field line is a token name up to the colon, then its value; the blank line ends `raw`.
/// `false` says nothing: the full check decides.
pub fn plain_head(raw: &[u8], limits: &HeaderLimits) -> bool {
    if raw.len() > limits.max_bytes {
        return false;
    }
    // The CR ending the line that starts at `at` (the line's first CR or LF, followed by LF).
    let line_end = |at: usize| -> Option<usize> {
        let i = at + memchr::memchr2(b'\r', b'\n', raw.get(at..)?)?;
        (raw[i] == b'\r' && raw.get(i + 1) == Some(&b'\n')).then_some(i)
    };
    let Some(end) = line_end(0) else {
        return false;
    };
    let http10 = raw[..end].ends_with(b"HTTP/1.0");
    let (mut at, mut count, mut lengths, mut encodings) = (end + 2, 0usize, 0usize, 0usize);
    loop {
        if raw.get(at) == Some(&b'\r') {
            // The blank line, and nothing after it.
            return raw.get(at + 1) == Some(&b'\n')
                && at + 2 == raw.len()
                && !(lengths > 0 && encodings > 0)
                && !(http10 && encodings > 0);
        }
        count += 1;
        if count > limits.max_count {
            return false;
        }
        let name_len = raw[at..].iter().take_while(|b| is_tchar(**b)).count();
        let colon = at + name_len;
        if name_len == 0 || raw.get(colon) != Some(&b':') {
            return false;
        }
        let Some(end) = line_end(colon + 1) else {
            return false;
        };
        let (name, value) = (&raw[at..colon], raw[colon + 1..end].trim_ascii());
        if name.eq_ignore_ascii_case(b"content-length") {
            lengths += 1;
            if lengths > 1 || !valid_length(value) {
                return false;
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            encodings += 1;
            if encodings > 1 || !value.eq_ignore_ascii_case(b"chunked") {
                return false;
            }
        }
        at = end + 2;
    }
}

/// [`check_request_head`] line by line, every rule with its own reason.
pub fn check_request_head_in_full(raw: &[u8], limits: &HeaderLimits) -> Result<(), Reject> {
    if raw.len() > limits.max_bytes {
        return Err(Reject::HeaderTooLarge);
    }
    // Line ends: CRLF only. httparse accepts bare LF, which another hop may read differently.
    // Every CR and LF in order (memchr: this runs on every request): a CR must be followed
    // by an LF, which is then skipped; an LF met on its own had no CR before it.
    let mut ends = memchr::memchr2_iter(b'\r', b'\n', raw);
    while let Some(i) = ends.next() {
        if raw[i] == b'\n' {
            return Err(Reject::Framing("bare LF where CRLF is required"));
        }
        if raw.get(i + 1) != Some(&b'\n') {
            return Err(Reject::Framing("CR not followed by LF"));
        }
        ends.next();
    }
    let mut lines = Lines(Some(raw)).map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let request_line = lines.next().unwrap_or_default();
    let http10 = request_line.ends_with(b"HTTP/1.0");
    let (mut count, mut lengths, mut encodings) = (0usize, 0usize, 0usize);
    for line in lines {
        if line.is_empty() {
            // The blank line ends the section; Pingora hands over exactly the header.
            break;
        }
        if matches!(line[0], b' ' | b'\t') {
            return Err(Reject::Framing("obsolete line folding"));
        }
        count += 1;
        if count > limits.max_count {
            return Err(Reject::TooManyHeaders);
        }
        let Some(colon) = memchr::memchr(b':', line) else {
            return Err(Reject::Framing("header line without a colon"));
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if name.is_empty() || !name.iter().all(|b| is_tchar(*b)) {
            return Err(Reject::Framing("malformed header field name"));
        }
        if name.eq_ignore_ascii_case(b"content-length") {
            lengths += 1;
            if lengths > 1 {
                return Err(Reject::Framing("duplicate Content-Length"));
            }
            if !valid_length(value) {
                return Err(Reject::Framing("invalid Content-Length"));
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            encodings += 1;
            if encodings > 1 {
                return Err(Reject::Framing("more than one Transfer-Encoding"));
            }
            if !value.eq_ignore_ascii_case(b"chunked") {
                return Err(Reject::Framing(
                    "Transfer-Encoding other than a single chunked",
                ));
            }
        }
    }
    if lengths > 0 && encodings > 0 {
        return Err(Reject::Framing("both Content-Length and Transfer-Encoding"));
    }
    if http10 && encodings > 0 {
        return Err(Reject::Framing("Transfer-Encoding on HTTP/1.0"));
    }
    Ok(())
}

/// Checks the framing of an upstream response as Pingora parsed it: one plain-digits
/// `Content-Length` at most, and `Transfer-Encoding` only as a single `chunked`. (Pingora
/// already fails responses with conflicting lengths; when both headers come it drops the
/// length before any hook runs, so that case cannot be seen here. Kanaria re-frames every
/// response it sends, so the client is not desynchronised by it.) The proxy runs it as part
/// of [`scan`]; on its own for the tests.
#[cfg(test)]
pub fn check_response_framing(headers: &HeaderMap) -> Result<(), &'static str> {
    scan::<true, 0>(headers, false, true, []).framing
}

/// The hop-by-hop header names present in a message: `Connection` and every header it
/// names, `Keep-Alive`, `TE`, `Upgrade` (kept when `upgrading`, with `Connection: upgrade`),
/// and every `Proxy-*` header. These describe one connection and must not be forwarded.
///
/// Only names the message carries are returned, each once, so a message with none costs one
/// pass over its names and no allocation (this runs on every request and response).
/// `keep_connection` leaves `Connection` itself out (its tokens still count): for a response,
/// where Pingora writes its own. The proxy runs it as part of [`scan`]; on its own for the
/// tests.
#[cfg(test)]
pub fn hop_by_hop_names(
    headers: &HeaderMap,
    upgrading: bool,
    keep_connection: bool,
) -> Vec<HeaderName> {
    scan::<false, 0>(headers, upgrading, keep_connection, []).hop_by_hop
}

/// [`check_response_framing`] and [`hop_by_hop_names`] of one message.
pub struct Scan {
    pub framing: Result<(), &'static str>,
    pub hop_by_hop: Vec<HeaderName>,
    /// Bit `i` set: the message carries `watch[i]` (see [`scan`]).
    pub present: u32,
}

/// Both checks in one pass over the headers (an upstream response needs both, on every
/// request): the framing headers are looked at as they come instead of looked up. Without
/// `FRAMING` (a request, whose framing [`check_request_head`] checked) `framing` is `Ok`.
///
/// The same pass says which of the `watch` names (at most 32) the message carries
/// ([`Scan::present`]): the headers Kanaria adds, so that it replaces one the message has
/// and appends one it has not, without a lookup of its own for each. An array, so the
/// comparisons are unrolled: a loop over a slice cost more per header than the lookups
/// it saves.
pub fn scan<const FRAMING: bool, const W: usize>(
    headers: &HeaderMap,
    upgrading: bool,
    keep_connection: bool,
    watch: [&HeaderName; W],
) -> Scan {
    let mut present = 0u32;
    let mut watched = |name: &HeaderName| {
        for (i, w) in watch.iter().enumerate() {
            if *w == name && i < 32 {
                present |= 1 << i;
            }
        }
    };
    let mut names: Vec<HeaderName> = Vec::new();
    // Content-Length: how many, and whether the first is valid; Transfer-Encoding: how
    // many, and whether the first is `chunked`. Judged after the pass, in the order the
    // checks were always made (the same verdict, the same message).
    let (mut lengths, mut length_ok) = (0usize, false);
    let (mut encodings, mut encoding_ok) = (0usize, false);
    // The `Connection` value, when there is exactly one (the usual case); more than one
    // are read again below.
    let (mut connections, mut connection) = (0usize, None);
    if !FRAMING {
        // A request: its names once each, `Connection`'s values looked up if present.
        for name in headers.keys() {
            watched(name);
            let hop = if name == CONNECTION {
                connections += 1;
                !keep_connection
            } else {
                is_hop_by_hop(name, upgrading)
            };
            if hop {
                names.push(name.clone());
            }
        }
    }
    // `iter` yields a name once per value, its values one after another.
    let mut last: Option<&HeaderName> = None;
    for (name, value) in headers.iter().filter(|_| FRAMING) {
        let repeat = last == Some(name);
        last = Some(name);
        if !repeat {
            watched(name);
        }
        let hop = if FRAMING && name == CONTENT_LENGTH {
            lengths += 1;
            if lengths == 1 {
                length_ok = valid_length(value.as_bytes().trim_ascii());
            }
            false
        } else if FRAMING && name == TRANSFER_ENCODING {
            encodings += 1;
            if encodings == 1 {
                encoding_ok = value
                    .as_bytes()
                    .trim_ascii()
                    .eq_ignore_ascii_case(b"chunked");
            }
            false
        } else if name == CONNECTION {
            connections += 1;
            connection = Some(value);
            !keep_connection
        } else {
            is_hop_by_hop(name, upgrading)
        };
        if hop && !repeat {
            names.push(name.clone());
        }
    }
    let framing = if lengths > 1 {
        Err("upstream sent more than one Content-Length")
    } else if lengths == 1 && !length_ok {
        Err("upstream sent an invalid Content-Length")
    } else if encodings > 1 || (encodings == 1 && !encoding_ok) {
        Err("upstream sent a Transfer-Encoding other than a single chunked")
    } else {
        Ok(())
    };
    match (connections, connection) {
        (0, _) => {}
        (1, Some(v)) => connection_tokens(headers, v, upgrading, &mut names),
        _ => {
            for v in headers.get_all(CONNECTION) {
                connection_tokens(headers, v, upgrading, &mut names);
            }
        }
    }
    Scan {
        framing,
        hop_by_hop: names,
        present,
    }
}

/// A name that is hop-by-hop by itself (`Connection` and the names it lists aside).
fn is_hop_by_hop(name: &HeaderName, upgrading: bool) -> bool {
    // Every header of every message comes through here: the first letter settles most
    // names (names are lower case) with one comparison.
    let text = name.as_str();
    match text.as_bytes().first() {
        Some(b't') => name == TE,
        Some(b'u') => name == UPGRADE && !upgrading,
        Some(b'k') => text == "keep-alive",
        Some(b'p') => text.starts_with("proxy-"),
        _ => false,
    }
}

/// Adds the headers named by one `Connection` value to `names`.
fn connection_tokens(
    headers: &HeaderMap,
    value: &http::HeaderValue,
    upgrading: bool,
    names: &mut Vec<HeaderName>,
) {
    // The values nearly every message carries name no header: nothing to split or look up.
    let whole = value.as_bytes().trim_ascii();
    if whole.eq_ignore_ascii_case(b"keep-alive") || whole.eq_ignore_ascii_case(b"close") {
        return;
    }
    for token in value.as_bytes().split(|b| *b == b',') {
        let token = token.trim_ascii();
        if upgrading && token.eq_ignore_ascii_case(b"upgrade") {
            continue;
        }
        // `Keep-Alive` is hop-by-hop anyway: already in `names` when present. (The usual
        // token; skipping it saves the lookup below.)
        if token.eq_ignore_ascii_case(b"keep-alive") {
            continue;
        }
        // Looked up first (no allocation): the usual tokens (`close`) name no header the
        // message carries.
        let present = std::str::from_utf8(token).is_ok_and(|t| headers.contains_key(t));
        if !present {
            continue;
        }
        let Ok(h) = HeaderName::from_bytes(token) else {
            continue;
        };
        // Never let `Connection` remove what frames the message or routes it.
        if h == TRANSFER_ENCODING || h == CONTENT_LENGTH || h == http::header::HOST {
            continue;
        }
        if !names.contains(&h) {
            names.push(h);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(raw: &str) -> Result<(), Reject> {
        check_request_head(raw.as_bytes(), &HeaderLimits::default())
    }

    #[test]
    fn the_one_pass_check_agrees_with_the_full_one() {
        let limits = HeaderLimits {
            max_bytes: 200,
            max_count: 3,
        };
        let heads = [
            "GET / HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\ncontent-length:  7 \r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "GET / HTTP/1.1\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\n\n",
            "GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n",
            "GET /\r HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
            "GET / HTTP/1.1\r\nHost a\r\n\r\n",
            "GET / HTTP/1.1\r\nHo st: a\r\n\r\n",
            "GET / HTTP/1.1\r\n: a\r\n\r\n",
            "GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n",
            "GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\n\r\nGET",
            "GET / HTTP/1.1\r\nHost: a\r\n",
            "GET / HTTP/1.1\r\nHost: a\r",
            "GET / HTTP/1.1",
            "",
            "\r\n",
        ];
        let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(200));
        for head in heads.iter().copied().chain([long.as_str()]) {
            let raw = head.as_bytes();
            let full = check_request_head_in_full(raw, &limits);
            if plain_head(raw, &limits) {
                assert_eq!(full, Ok(()), "{head:?}");
            }
            assert_eq!(check_request_head(raw, &limits), full, "{head:?}");
        }
        // The common heads take the one pass.
        assert!(plain_head(heads[0].as_bytes(), &limits));
        assert!(plain_head(heads[2].as_bytes(), &limits));
        assert!(plain_head(heads[3].as_bytes(), &limits));
    }

    #[test]
    fn plain_requests_pass() {
        assert_eq!(check("GET / HTTP/1.1\r\nHost: a\r\n\r\n"), Ok(()));
        assert_eq!(
            check("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\n"),
            Ok(())
        );
        assert_eq!(
            check("POST / HTTP/1.1\r\nHost: a\r\ntransfer-encoding: Chunked\r\n\r\n"),
            Ok(())
        );
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        for raw in [
            "POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 3, 4\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: \r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\nHost: a\n\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n",
            "GET / HTTP/1.1\r\nContent-Length : 3\r\n\r\n",
        ] {
            assert!(
                matches!(check(raw), Err(Reject::Framing(_))),
                "{raw:?} passed"
            );
        }
    }

    #[test]
    fn tchar_table_and_lines_match_the_plain_definitions() {
        for b in 0..=255u8 {
            let plain = b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
            assert_eq!(is_tchar(b), plain, "{b}");
        }
        for raw in ["", "\n", "a", "a\nb", "a\n\nb\n", "\r\n\r\n"] {
            let split: Vec<&[u8]> = raw.as_bytes().split(|b| *b == b'\n').collect();
            let lines: Vec<&[u8]> = Lines(Some(raw.as_bytes())).collect();
            assert_eq!(lines, split, "{raw:?}");
        }
        // Which defect is reported when there are several: the first CR/LF fault wins.
        assert_eq!(
            check("GET / HTTP/1.1\r\nBad Name: 1\r\nX: 1\n\r\n"),
            Err(Reject::Framing("bare LF where CRLF is required"))
        );
        assert_eq!(
            check("GET / HTTP/1.1\r\nX: 1\r\r\n\r\n"),
            Err(Reject::Framing("CR not followed by LF"))
        );
        assert_eq!(
            check("GET / HTTP/1.1\r\nX: 1\r"),
            Err(Reject::Framing("CR not followed by LF"))
        );
    }

    #[test]
    fn limits_answer_431() {
        let limits = HeaderLimits {
            max_bytes: 64,
            max_count: 2,
        };
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(100));
        assert_eq!(
            check_request_head(big.as_bytes(), &limits),
            Err(Reject::HeaderTooLarge)
        );
        let many = "GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n";
        assert_eq!(
            check_request_head(many.as_bytes(), &limits),
            Err(Reject::TooManyHeaders)
        );
        assert_eq!(Reject::TooManyHeaders.status(), 431);
    }

    #[test]
    fn hop_by_hop_names_cover_connection_tokens() {
        let mut h = HeaderMap::new();
        h.insert(
            CONNECTION,
            "keep-alive, X-Secret, content-length, absent"
                .parse()
                .unwrap(),
        );
        for n in ["x-secret", "keep-alive", "te", "upgrade", "content-length"] {
            h.insert(HeaderName::from_static(n), "1".parse().unwrap());
        }
        h.insert("proxy-authorization", "basic x".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        let names = hop_by_hop_names(&h, false, false);
        for n in [
            "connection",
            "te",
            "keep-alive",
            "upgrade",
            "x-secret",
            "proxy-authorization",
        ] {
            assert!(names.iter().any(|h| h == n), "{n} missing from {names:?}");
        }
        assert_eq!(names.len(), 6, "{names:?}");
        assert!(!hop_by_hop_names(&h, true, false)
            .iter()
            .any(|h| h == "upgrade"));
        let kept = hop_by_hop_names(&h, false, true);
        assert!(!kept.iter().any(|h| h == "connection"), "{kept:?}");
        assert!(kept.iter().any(|h| h == "x-secret"), "{kept:?}");
        // A message without any: nothing.
        let mut plain = HeaderMap::new();
        plain.insert("x-kept", "1".parse().unwrap());
        plain.insert(http::header::HOST, "a".parse().unwrap());
        assert!(hop_by_hop_names(&plain, false, false).is_empty());
        // A response's `Connection: keep-alive`: nothing to remove, nothing allocated.
        plain.insert(CONNECTION, "keep-alive".parse().unwrap());
        let names = hop_by_hop_names(&plain, false, true);
        assert!(names.is_empty() && names.capacity() == 0, "{names:?}");
    }

    #[test]
    fn scan_finds_the_watched_names() {
        let (a, b) = (
            HeaderName::from_static("x-kanaria-version"),
            HeaderName::from_static("x-request-id"),
        );
        let mut h = HeaderMap::new();
        h.append(CONTENT_LENGTH, "1".parse().unwrap());
        h.append("x-request-id", "1".parse().unwrap());
        h.append("x-request-id", "2".parse().unwrap());
        for framing in [true, false] {
            let present = if framing {
                scan::<true, 2>(&h, false, true, [&a, &b]).present
            } else {
                scan::<false, 2>(&h, false, true, [&a, &b]).present
            };
            assert_eq!(present, 0b10);
        }
        h.append("X-Kanaria-Version", "v1".parse().unwrap());
        assert_eq!(scan::<true, 2>(&h, false, true, [&a, &b]).present, 0b11);
        assert_eq!(scan::<true, 0>(&h, false, true, []).present, 0);
    }

    #[test]
    fn response_framing() {
        let mut h = HeaderMap::new();
        h.append(CONTENT_LENGTH, "3".parse().unwrap());
        assert!(check_response_framing(&h).is_ok());
        h.append(CONTENT_LENGTH, "3".parse().unwrap());
        assert!(check_response_framing(&h).is_err());
        let mut h = HeaderMap::new();
        h.append(TRANSFER_ENCODING, "gzip".parse().unwrap());
        assert!(check_response_framing(&h).is_err());
        // One pass, the checks' old order: the lengths are judged first.
        h.append(CONTENT_LENGTH, "x".parse().unwrap());
        assert_eq!(
            check_response_framing(&h),
            Err("upstream sent an invalid Content-Length")
        );
        // A hop-by-hop name with several values is listed once; `Connection` twice is read
        // in full.
        let mut h = HeaderMap::new();
        h.append("proxy-x", "1".parse().unwrap());
        h.append("proxy-x", "2".parse().unwrap());
        h.append("x-a", "1".parse().unwrap());
        h.append("x-b", "1".parse().unwrap());
        h.append(CONNECTION, "x-a".parse().unwrap());
        h.append(CONNECTION, "keep-alive, x-b".parse().unwrap());
        let scan = scan::<true, 0>(&h, false, true, []);
        assert_eq!(scan.framing, Ok(()));
        assert_eq!(scan.hop_by_hop, ["proxy-x", "x-a", "x-b"]);
        assert_eq!(
            hop_by_hop_names(&h, false, false),
            ["proxy-x", "connection", "x-a", "x-b"]
        );
    }
}
