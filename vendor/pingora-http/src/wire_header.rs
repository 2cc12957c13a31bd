// Copyright 2026 Cloudflare, Inc.
//
// Licensed under the Apache License, Version 2.0 (the "License");
// you may not use this file except in compliance with the License.
// You may obtain a copy of the License at
//
// http://www.apache.org/licenses/LICENSE-2.0
//
// Unless required by applicable law or agreed to in writing, software
// distributed under the License is distributed on an "AS IS" BASIS,
// WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
// See the License for the specific language governing permissions and
// limitations under the License.

//! Wire headers: headers a proxy adds to a message it forwards, kept in a short list beside
//! the header maps and written after the maps' own headers when the head is serialized
//! (HTTP/1) or converted into `http` parts (HTTP/2, [`crate::RequestHeader::as_owned_parts`]).
//!
//! Inserting a header into a [`crate::RequestHeader`] or [`crate::ResponseHeader`] costs two
//! hash-map inserts (the value map and the case map), and the first insert into a copied head
//! grows both maps. A header that nothing reads after it is added (`X-Forwarded-For`, a
//! request id, a version tag) does not need to be in the maps at all: a wire header is one
//! push onto this list, plus one lookup when a header of the same name must be replaced.

use crate::case_header_name::CaseHeaderName;
use http::header::{HeaderName, HeaderValue};
use pingora_error::{Error, ErrorType::InvalidHTTPHeader, Result};

/// One wire header: its name for comparisons and the `http` conversion, the case written on
/// HTTP/1, and the value.
#[derive(Debug, Clone)]
pub(crate) struct WireHeader {
    pub(crate) name: HeaderName,
    pub(crate) case: CaseHeaderName,
    pub(crate) value: HeaderValue,
}

/// Refuses the names Pingora itself reads or rewrites in a head after the filters ran: they
/// must be in the maps, where `headers.get` sees them. The framing and connection fields
/// (the HTTP/1 body reader and writer, keep-alive, upgrades, the HTTP/2 conversion's
/// connection-specific cleanup), `Host` (`:authority`), and the representation fields the
/// compression and conditional-request filters rewrite.
pub(crate) fn check_wire_header_name(name: &HeaderName) -> Result<()> {
    // Matched as text: the compiler switches on the length first, so a name of another
    // length (most added headers) is refused or let through in a few instructions.
    // Comparing against a list of `HeaderName`s cost ~350 instructions per call.
    if matches!(
        name.as_str(),
        "content-length"
            | "transfer-encoding"
            | "connection"
            | "upgrade"
            | "te"
            | "trailer"
            | "host"
            | "content-encoding"
            | "content-type"
            | "content-range"
            | "accept-ranges"
            | "etag"
            | "keep-alive"
            | "proxy-connection"
            | "http2-settings"
    ) {
        return Error::e_explain(
            InvalidHTTPHeader,
            format!("{name} is read by Pingora after the filters: it cannot be a wire header"),
        );
    }
    Ok(())
}

/// The wire headers of a head: `None` until the first is added. A box, so that a head
/// without any (every head a proxy does not add to) grows by one word, copies and drops it
/// with one branch, and clones it without an allocation.
pub(crate) type WireList = Option<Box<Vec<WireHeader>>>;

/// The wire headers as a slice (empty for `None`).
#[inline]
pub(crate) fn wire_slice(list: &WireList) -> &[WireHeader] {
    list.as_deref().map_or(&[], |v| &v[..])
}

/// The list to push onto, allocated on the first use with room for a proxy's usual few
/// headers (no growth from empty on the first push).
#[inline]
pub(crate) fn wire_vec(list: &mut WireList) -> &mut Vec<WireHeader> {
    list.get_or_insert_with(|| Box::new(Vec::with_capacity(4)))
}

// The functions below run only for heads that have wire headers: kept out of line (and
// `cold`), so the paths of heads without any (a branch on an empty list) stay as they were.

/// A copy of the list (`Clone` of the heads).
#[inline]
pub(crate) fn clone_wire_list(list: &WireList) -> WireList {
    match list {
        None => None,
        Some(v) => Some(clone_wire_vec(v)),
    }
}

#[cold]
#[inline(never)]
fn clone_wire_vec(v: &[WireHeader]) -> Box<Vec<WireHeader>> {
    Box::new(v.to_vec())
}

/// Removes the wire headers of `name` (a map insert of the name replaces them).
#[cold]
#[inline(never)]
pub(crate) fn remove_wire_named(list: &mut Vec<WireHeader>, name: &HeaderName) {
    list.retain(|h| h.name != *name);
}

/// Writes the wire headers in HTTP/1 form, after the maps' headers.
#[cold]
#[inline(never)]
pub(crate) fn write_wire_headers_h1(wire: &[WireHeader], buf: &mut impl bytes::BufMut) {
    for h in wire {
        buf.put_slice(h.case.as_slice());
        buf.put_slice(b": ");
        buf.put_slice(h.value.as_ref());
        buf.put_slice(b"\r\n");
    }
}

/// Appends the wire headers to a header map (the `http` conversions).
pub(crate) fn append_wire_headers_to_map(map: &mut http::HeaderMap, wire: &[WireHeader]) {
    for h in wire {
        // `try_append` does not panic: a map past `http`'s size limit (32,768 entries, far
        // above the headers Pingora parses or a proxy adds) drops the header instead.
        let _ = map.try_append(h.name.clone(), h.value.clone());
    }
}

/// The wire header methods, the same for requests and responses (both have
/// `header_name_map`, `base.headers` and `wire_headers`).
macro_rules! wire_header_methods {
    () => {
        /// Add a header written after the header maps' headers, replacing every header of
        /// the same name (in the maps and among the wire headers).
        ///
        /// A wire header is kept in a short list instead of the header maps: it is written
        /// by [Self::header_to_h1_wire()] and appended by [Self::as_owned_parts()] (the
        /// HTTP/2 conversion), the `From` conversions into `http` parts, [Self::map()] and
        /// [Self::case_header_iter()], and kept by [Clone], but **`headers.get()` does not
        /// see it**, nor does [Self::remove_header()]. Use it for headers that nothing reads
        /// after they are added, typically what a proxy adds to a message just before it
        /// is sent (`X-Forwarded-For`, a request id): it costs one lookup (for the
        /// replacement) and a push, where [Self::insert_header()] costs an insert into each
        /// of the two maps. Names Pingora reads after the filters are refused (framing and
        /// connection fields, `Host`, `Content-Type`, `Content-Encoding`, `Content-Range`,
        /// `Accept-Ranges`, `ETag`).
        ///
        /// The value is written as given; the name in the case given (see
        /// [crate::PreparedHeaderName] to build it once).
        pub fn insert_wire_header(
            &mut self,
            name: impl IntoCaseHeaderName,
            value: impl TryInto<HeaderValue>,
        ) -> Result<()> {
            let value = value
                .try_into()
                .explain_err(InvalidHTTPHeader, |_| "invalid value while insert")?;
            let (name, case) = name.into_header_names()?;
            wire_header::check_wire_header_name(&name)?;
            if self.base.headers.remove(&name).is_some() {
                if let Some(name_map) = self.header_name_map.as_mut() {
                    name_map.remove(&name);
                }
            }
            let list = wire_header::wire_vec(&mut self.wire_headers);
            list.retain(|h| h.name != name);
            list.push(wire_header::WireHeader { name, case, value });
            Ok(())
        }

        /// Add a header written after the header maps' headers, keeping the headers of the
        /// same name: those in the maps are written first, then the wire headers in the
        /// order they were added.
        ///
        /// As [Self::insert_wire_header()] without its lookup: when the caller knows the
        /// name is absent (it looked, or created the head), this is the cheapest way to add
        /// a header (a push onto a list).
        pub fn append_wire_header(
            &mut self,
            name: impl IntoCaseHeaderName,
            value: impl TryInto<HeaderValue>,
        ) -> Result<()> {
            let value = value
                .try_into()
                .explain_err(InvalidHTTPHeader, |_| "invalid value while append")?;
            let (name, case) = name.into_header_names()?;
            wire_header::check_wire_header_name(&name)?;
            wire_header::wire_vec(&mut self.wire_headers).push(wire_header::WireHeader {
                name,
                case,
                value,
            });
            Ok(())
        }

        /// Remove the wire headers of the name; whether there was one. The header maps are
        /// not touched (see [Self::remove_header()]).
        pub fn remove_wire_header(&mut self, name: &HeaderName) -> bool {
            let Some(list) = self.wire_headers.as_mut() else {
                return false;
            };
            let before = list.len();
            list.retain(|h| h.name != *name);
            list.len() != before
        }

        /// The wire headers, in the order they are written.
        pub fn wire_headers(&self) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> + '_ {
            wire_header::wire_slice(&self.wire_headers)
                .iter()
                .map(|h| (&h.name, &h.value))
        }
    };
}

impl crate::ResponseHeader {
    /// Pingora-internal, not part of the public API (hidden from the docs; it skips the name
    /// check of `insert_wire_header` on purpose): sets a header Pingora's own HTTP/1 server
    /// writes into every response head (`Date`, `Connection`, in
    /// `HttpSession::write_response_header`) with as few header-map operations as possible,
    /// where `insert_header` costs an insert into each of the two maps:
    /// - the maps hold exactly one header of the name (a peer's `Date`): its value is replaced
    ///   in place (one lookup; the case map is untouched, so the peer's case is kept);
    /// - they hold none: the header becomes a wire header (one lookup and a push), written
    ///   after the maps' headers, which `headers.get()` does not see;
    /// - they hold several: replaced as `insert_header` does.
    ///
    /// Wire headers of the name are dropped first, as `insert_header` drops them.
    ///
    /// The caller's contract: nothing reads the header from `headers` after this call (the
    /// server serializes the head right after, and keeps it only for `response_written()`,
    /// whose readers in Pingora look at the status).
    #[doc(hidden)]
    pub fn insert_serialized_header(
        &mut self,
        name: &crate::PreparedHeaderName,
        value: HeaderValue,
    ) -> Result<()> {
        use crate::IntoCaseHeaderName;
        use http::header::Entry;
        if let Some(list) = self.wire_headers.as_mut() {
            remove_wire_named(list, name.name());
        }
        match self.base.headers.entry(name.name()) {
            Entry::Occupied(mut e) => {
                if e.iter().nth(1).is_none() {
                    // One value: the case map holds one entry for it, which stays right.
                    e.insert(value);
                    return Ok(());
                }
            }
            Entry::Vacant(_) => {
                let (name, case) = name.into_header_names()?;
                wire_vec(&mut self.wire_headers).push(WireHeader { name, case, value });
                return Ok(());
            }
        }
        // Several values: both maps must drop all of them, as `insert_header` does.
        self.insert_header(name, value)
    }
}

#[cfg(test)]
mod tests {
    use crate::{PreparedHeaderName, ResponseHeader};
    use http::header::{self, HeaderValue};

    fn wire(resp: &ResponseHeader) -> String {
        let mut buf = Vec::new();
        resp.header_to_h1_wire(&mut buf);
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn serialized_header_absent_one_several() {
        let date = PreparedHeaderName::new(header::DATE);
        let v = || HeaderValue::from_static("now");

        // Absent: a wire header, after the maps' headers, in title case.
        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.insert_header("x-a", "1").unwrap();
        resp.insert_serialized_header(&date, v()).unwrap();
        assert!(resp.headers.get(header::DATE).is_none());
        assert_eq!(wire(&resp), "x-a: 1\r\nDate: now\r\n");

        // One: replaced in place, the peer's case kept.
        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.insert_header("date", "old").unwrap();
        resp.insert_header("x-a", "1").unwrap();
        resp.insert_serialized_header(&date, v()).unwrap();
        assert_eq!(wire(&resp), "date: now\r\nx-a: 1\r\n");

        // Several: both maps drop them all.
        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.append_header("date", "old1").unwrap();
        resp.append_header("Date", "old2").unwrap();
        resp.insert_serialized_header(&date, v()).unwrap();
        assert_eq!(wire(&resp), "Date: now\r\n");

        // A wire header of the name is replaced too.
        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.append_wire_header("date", "old").unwrap();
        resp.insert_serialized_header(&date, v()).unwrap();
        assert_eq!(wire(&resp), "Date: now\r\n");

        // The name check is skipped: `Connection` is refused by the public methods only.
        let conn = PreparedHeaderName::new(header::CONNECTION);
        let mut resp = ResponseHeader::build(200, None).unwrap();
        assert!(resp.insert_wire_header(&conn, "close").is_err());
        resp.insert_serialized_header(&conn, HeaderValue::from_static("close"))
            .unwrap();
        assert_eq!(wire(&resp), "Connection: close\r\n");
    }
}
