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

use crate::*;
use bytes::Bytes;
use http::header;
use pingora_error::Error;

#[derive(Debug, Clone)]
pub struct CaseHeaderName(Bytes);

impl CaseHeaderName {
    pub fn new(name: String) -> Self {
        CaseHeaderName(name.into())
    }
}

impl CaseHeaderName {
    pub fn as_slice(&self) -> &[u8] {
        &self.0
    }

    pub fn from_slice(buf: &[u8]) -> Self {
        CaseHeaderName(Bytes::copy_from_slice(buf))
    }

    /// A name written as given, without copying it.
    pub const fn from_static(name: &'static str) -> Self {
        CaseHeaderName(Bytes::from_static(name.as_bytes()))
    }
}

/// A trait that converts into case-sensitive header names.
pub trait IntoCaseHeaderName {
    fn into_case_header_name(self) -> CaseHeaderName;

    /// The name for the header map together with the case written on the wire.
    ///
    /// The default parses [`Self::into_case_header_name`] into a [`HeaderName`], which
    /// allocates for every name the `http` crate does not know. Types that already hold
    /// a parsed name ([`HeaderName`], [`PreparedHeaderName`]) skip the parse.
    fn into_header_names(self) -> Result<(HeaderName, CaseHeaderName)>
    where
        Self: Sized,
    {
        let case = self.into_case_header_name();
        let name = HeaderName::from_bytes(case.as_slice())
            .or_err(InvalidHTTPHeader, "invalid header name")?;
        Ok((name, case))
    }
}

/// A header name parsed once, together with the case it is written in on HTTP/1.
///
/// Inserting a header by `&str` or [`Bytes`] parses the name (and allocates a
/// [`HeaderName`] for every non-standard one) on every call; inserting a [`HeaderName`]
/// copies it to build its case. A proxy that adds the same headers to every message can
/// build them once, for example in a `const`, and insert them with no parsing and no
/// allocation:
///
/// ```
/// use pingora_http::{PreparedHeaderName, RequestHeader};
///
/// const X_REQUEST_ID: PreparedHeaderName = PreparedHeaderName::from_static("x-request-id");
///
/// let mut req = RequestHeader::build("GET", b"/", None).unwrap();
/// req.insert_header(&X_REQUEST_ID, "abc").unwrap();
/// assert_eq!(req.headers["x-request-id"], "abc");
/// ```
#[derive(Debug, Clone)]
pub struct PreparedHeaderName {
    name: HeaderName,
    case: CaseHeaderName,
}

impl PreparedHeaderName {
    /// A lowercase name, written on the wire as given. Panics (at compile time in a
    /// `const`) on what [`HeaderName::from_static`] refuses, e.g. uppercase letters.
    pub const fn from_static(name: &'static str) -> Self {
        PreparedHeaderName {
            name: HeaderName::from_static(name),
            case: CaseHeaderName::from_static(name),
        }
    }

    /// `name` with the case [`IntoCaseHeaderName`] gives a [`HeaderName`] (title case for
    /// the standard names Pingora knows, lowercase otherwise).
    pub fn new(name: HeaderName) -> Self {
        let case = CaseHeaderName(titled_header_name(&name));
        PreparedHeaderName { name, case }
    }

    /// `name` written on the wire as `case`, which must be the same name up to ASCII case.
    pub fn with_case(name: HeaderName, case: impl Into<Bytes>) -> Result<Self> {
        let case: Bytes = case.into();
        if !case.eq_ignore_ascii_case(name.as_str().as_bytes()) {
            return Error::e_explain(
                InvalidHTTPHeader,
                "header name case does not match the header name",
            );
        }
        Ok(PreparedHeaderName {
            name,
            case: CaseHeaderName(case),
        })
    }

    /// The name as the header map keys it.
    pub fn name(&self) -> &HeaderName {
        &self.name
    }

    /// The name as written on the wire.
    pub fn case(&self) -> &[u8] {
        self.case.as_slice()
    }
}

impl IntoCaseHeaderName for PreparedHeaderName {
    fn into_case_header_name(self) -> CaseHeaderName {
        self.case
    }

    fn into_header_names(self) -> Result<(HeaderName, CaseHeaderName)> {
        Ok((self.name, self.case))
    }
}

impl IntoCaseHeaderName for &PreparedHeaderName {
    fn into_case_header_name(self) -> CaseHeaderName {
        self.case.clone()
    }

    fn into_header_names(self) -> Result<(HeaderName, CaseHeaderName)> {
        Ok((self.name.clone(), self.case.clone()))
    }
}

impl IntoCaseHeaderName for CaseHeaderName {
    fn into_case_header_name(self) -> CaseHeaderName {
        self
    }
}

impl IntoCaseHeaderName for String {
    fn into_case_header_name(self) -> CaseHeaderName {
        CaseHeaderName(self.into())
    }
}

impl IntoCaseHeaderName for &'static str {
    fn into_case_header_name(self) -> CaseHeaderName {
        CaseHeaderName(self.into())
    }
}

impl IntoCaseHeaderName for HeaderName {
    fn into_case_header_name(self) -> CaseHeaderName {
        CaseHeaderName(titled_header_name(&self))
    }

    // Already parsed: no second parse of its own bytes.
    fn into_header_names(self) -> Result<(HeaderName, CaseHeaderName)> {
        let case = CaseHeaderName(titled_header_name(&self));
        Ok((self, case))
    }
}

impl IntoCaseHeaderName for &HeaderName {
    fn into_case_header_name(self) -> CaseHeaderName {
        CaseHeaderName(titled_header_name(self))
    }

    fn into_header_names(self) -> Result<(HeaderName, CaseHeaderName)> {
        Ok((self.clone(), CaseHeaderName(titled_header_name(self))))
    }
}

impl IntoCaseHeaderName for Bytes {
    fn into_case_header_name(self) -> CaseHeaderName {
        CaseHeaderName(self)
    }
}

fn titled_header_name(header_name: &HeaderName) -> Bytes {
    titled_header_name_str(header_name).map_or_else(
        || Bytes::copy_from_slice(header_name.as_str().as_bytes()),
        |s| Bytes::from_static(s.as_bytes()),
    )
}

pub(crate) fn titled_header_name_str(header_name: &HeaderName) -> Option<&'static str> {
    Some(match *header_name {
        header::ACCEPT_RANGES => "Accept-Ranges",
        header::AGE => "Age",
        header::CACHE_CONTROL => "Cache-Control",
        header::CONNECTION => "Connection",
        header::CONTENT_TYPE => "Content-Type",
        header::CONTENT_ENCODING => "Content-Encoding",
        header::CONTENT_LENGTH => "Content-Length",
        header::DATE => "Date",
        header::TRANSFER_ENCODING => "Transfer-Encoding",
        header::HOST => "Host",
        header::SERVER => "Server",
        header::SET_COOKIE => "Set-Cookie",
        // TODO: add more const header here to map to their titled case
        // TODO: automatically upper case the first letter?
        _ => {
            return None;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_case_header_name() {
        assert_eq!("FoO".into_case_header_name().as_slice(), b"FoO");
        assert_eq!("FoO".to_string().into_case_header_name().as_slice(), b"FoO");
        assert_eq!(header::SERVER.into_case_header_name().as_slice(), b"Server");
    }

    #[test]
    fn test_header_names() {
        let (name, case) = "X-Foo".into_header_names().unwrap();
        assert_eq!((name.as_str(), case.as_slice()), ("x-foo", &b"X-Foo"[..]));
        assert!("bad name".into_header_names().is_err());
        let (name, case) = header::SERVER.into_header_names().unwrap();
        assert_eq!((name, case.as_slice()), (header::SERVER, &b"Server"[..]));
        let (name, case) = (&header::HOST).into_header_names().unwrap();
        assert_eq!((name, case.as_slice()), (header::HOST, &b"Host"[..]));

        const FOO: PreparedHeaderName = PreparedHeaderName::from_static("x-foo");
        let (name, case) = (&FOO).into_header_names().unwrap();
        assert_eq!((name.as_str(), case.as_slice()), ("x-foo", &b"x-foo"[..]));
        let titled = PreparedHeaderName::new(header::CONTENT_LENGTH);
        assert_eq!(titled.case(), b"Content-Length");
        let cased = PreparedHeaderName::with_case(FOO.name().clone(), "X-FOO").unwrap();
        assert_eq!(cased.into_case_header_name().as_slice(), b"X-FOO");
        assert!(PreparedHeaderName::with_case(FOO.name().clone(), "X-Bar").is_err());
    }
}
