//! Entry points into crate-private code for the criterion benchmarks ([`bench`](mod@bench)) and the
//! fuzz targets ([`fuzz`]), behind the `internals` cargo feature: not part of the API, and
//! absent from a default build.

pub mod bench;
pub mod fuzz;
