//! Integration tests against the real Docker engine (scripts/test.sh provides it).

mod api;
mod concurrency;
mod hostile;
mod lifecycle;
mod restart;
mod support;
