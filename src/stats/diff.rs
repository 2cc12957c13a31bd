//! Two answers to the same request compared field by field (the dark launch's shadow):
//! which fields differ, named so that the same field of the same kind of request has the
//! same name across requests.
//!
//! A field is `status`, `header:NAME` for each compared header, and for a JSON body each
//! leaf of the document as a path (`$.items[].price`): array positions are folded (`[]`)
//! and each path's values compared as a multiset, so an array whose order is not part of
//! the answer does not differ by order. A body that is not JSON (or that reached the
//! compare limit in either answer) is one field, `body`, compared by its bytes. Requests
//! are grouped by a path template in which ids are folded (`/items/{id}`), so a field's
//! differences add up across users.
//!
//! Pure functions: no I/O, no clock.

use std::collections::BTreeMap;

use serde_json::Value;

/// The most fields one answer is flattened into; the rest of a larger document is one
/// field, `$…`, compared as a whole (a bound on the work and on the labels it can make).
pub const MAX_FIELDS: usize = 256;

/// One answer as the shadow keeps it: its status, the compared headers (names lowercase,
/// in the order the route lists them), and its body up to the route's limit.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, Option<String>)>,
    pub body: Vec<u8>,
    /// The body went past the limit: only its first bytes are here.
    pub truncated: bool,
}

impl Answer {
    /// Appends a piece of the body, keeping at most `limit` bytes in all; past it the
    /// answer is `truncated` and later pieces are ignored.
    pub fn keep(&mut self, chunk: &[u8], limit: usize) {
        if self.truncated {
            return;
        }
        let room = limit.saturating_sub(self.body.len());
        if chunk.len() > room {
            self.body.extend_from_slice(&chunk[..room]);
            self.truncated = true;
        } else {
            self.body.extend_from_slice(chunk);
        }
    }
}

/// A field that differs, with each answer's value (as compact text, cut to 120 bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    pub field: String,
    pub left: String,
    pub right: String,
}

/// The fields in which `a` and `b` differ, in field order.
pub fn differences(a: &Answer, b: &Answer) -> Vec<Difference> {
    let mut out = Vec::new();
    if a.status != b.status {
        out.push(diff("status", &a.status.to_string(), &b.status.to_string()));
    }
    for ((name, va), (_, vb)) in a.headers.iter().zip(&b.headers) {
        if va != vb {
            let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "(none)".into());
            out.push(diff(&format!("header:{name}"), &show(va), &show(vb)));
        }
    }
    let json = |x: &Answer| {
        (!x.truncated)
            .then(|| serde_json::from_slice::<Value>(&x.body).ok())
            .flatten()
    };
    match (json(a), json(b)) {
        (Some(ja), Some(jb)) => {
            let (fa, fb) = (flatten(&ja), flatten(&jb));
            let mut keys: Vec<&String> = fa.keys().chain(fb.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let (va, vb) = (fa.get(k), fb.get(k));
                if va != vb {
                    let show = |v: Option<&Vec<String>>| match v {
                        None => "(absent)".to_string(),
                        Some(v) if v.len() == 1 => v[0].clone(),
                        Some(v) => format!("[{}]", v.join(",")),
                    };
                    out.push(diff(k, &show(va), &show(vb)));
                }
            }
        }
        _ if a.body != b.body => {
            let show = |x: &Answer| String::from_utf8_lossy(&x.body).into_owned();
            out.push(diff("body", &show(a), &show(b)));
        }
        _ => {}
    }
    out
}

fn diff(field: &str, left: &str, right: &str) -> Difference {
    Difference {
        field: field.to_string(),
        left: cut(left),
        right: cut(right),
    }
}

/// At most 120 bytes, on a character boundary.
fn cut(s: &str) -> String {
    if s.len() <= 120 {
        return s.to_string();
    }
    let mut end = 120;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Each leaf's path and the sorted values found there (array positions folded).
fn flatten(v: &Value) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut count = 0;
    walk(v, "$".to_string(), &mut out, &mut count);
    for values in out.values_mut() {
        values.sort();
    }
    out
}

fn walk(v: &Value, path: String, out: &mut BTreeMap<String, Vec<String>>, count: &mut usize) {
    if *count >= MAX_FIELDS {
        // The rest of the document as one field.
        out.entry("$…".into()).or_default().push(v.to_string());
        return;
    }
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, x) in m {
                walk(x, format!("{path}.{k}"), out, count);
            }
        }
        Value::Array(a) if !a.is_empty() => {
            for x in a {
                walk(x, format!("{path}[]"), out, count);
            }
        }
        leaf => {
            *count += 1;
            out.entry(path).or_default().push(leaf.to_string());
        }
    }
}

/// The request path with its ids folded: a segment that is all digits, a UUID, a hex
/// string of 8 or more with a digit, or a token of 16 or more letters and digits with a
/// digit in it becomes `{id}`. The query is not part of it.
pub fn path_template(path: &str) -> String {
    let path = path.split('?').next().unwrap_or("");
    let mut out = String::with_capacity(path.len());
    for (i, seg) in path.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        if is_id(seg) {
            out.push_str("{id}");
        } else {
            out.push_str(seg);
        }
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

fn is_id(seg: &str) -> bool {
    if seg.is_empty() {
        return false;
    }
    let digits = seg.bytes().filter(u8::is_ascii_digit).count();
    if digits == seg.len() {
        return true;
    }
    let uuid = seg.len() == 36
        && seg.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        });
    let hex = seg.len() >= 8 && digits > 0 && seg.bytes().all(|b| b.is_ascii_hexdigit());
    let token = seg.len() >= 16 && digits > 0 && seg.bytes().all(|b| b.is_ascii_alphanumeric());
    uuid || hex || token
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(status: u16, body: &str) -> Answer {
        Answer {
            status,
            headers: vec![("content-type".into(), Some("application/json".into()))],
            body: body.as_bytes().to_vec(),
            truncated: false,
        }
    }

    #[test]
    fn json_bodies_differ_by_field_and_not_by_order_or_spacing() {
        let a = json(
            200,
            r#"{"id": 7, "price": 10, "tags": ["a", "b"], "ts": 1}"#,
        );
        let b = json(200, r#"{"ts":2,"tags":["b","a"],"price":11,"id":7}"#);
        let d = differences(&a, &b);
        let fields: Vec<&str> = d.iter().map(|d| d.field.as_str()).collect();
        assert_eq!(fields, ["$.price", "$.ts"]);
        assert_eq!((d[0].left.as_str(), d[0].right.as_str()), ("10", "11"));
        assert!(differences(&a, &a).is_empty());
    }

    #[test]
    fn status_headers_absent_fields_and_other_bodies() {
        let a = json(200, r#"{"a": {"b": 1}}"#);
        let mut b = json(503, r#"{"a": {}}"#);
        b.headers[0].1 = None;
        let fields: Vec<String> = differences(&a, &b).into_iter().map(|d| d.field).collect();
        assert_eq!(fields, ["status", "header:content-type", "$.a", "$.a.b"]);
        let text = |s: &str| Answer {
            body: s.as_bytes().to_vec(),
            ..Answer::default()
        };
        let d = differences(&text("hello"), &text("hellO"));
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].field, "body");
    }

    #[test]
    fn a_truncated_body_is_compared_by_its_bytes() {
        let mut a = json(200, r#"{"a": 1"#);
        a.truncated = true;
        let b = a.clone();
        assert!(differences(&a, &b).is_empty());
    }

    #[test]
    fn ids_fold_in_path_templates() {
        assert_eq!(path_template("/items/123?x=1"), "/items/{id}");
        assert_eq!(
            path_template("/u/3f2504e0-4f89-11d3-9a0c-0305e82c3301/cart"),
            "/u/{id}/cart"
        );
        assert_eq!(path_template("/blob/deadbeef01"), "/blob/{id}");
        assert_eq!(path_template("/s/abcDEF1234567890xyz"), "/s/{id}");
        assert_eq!(path_template("/items/search"), "/items/search");
        assert_eq!(path_template("/"), "/");
        assert_eq!(path_template(""), "/");
    }

    #[test]
    fn a_huge_document_is_bounded() {
        let big: Vec<u32> = (0..10_000).collect();
        let a = json(200, &serde_json::json!({ "v": big }).to_string());
        assert!(flatten(&serde_json::from_slice(&a.body).unwrap()).len() <= 2);
    }
}
