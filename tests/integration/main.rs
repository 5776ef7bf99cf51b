//! Integration tests against the real Docker engine (scripts/test.sh provides it).

mod api;
mod concurrency;
mod crash;
mod dataplane;
mod faults;
mod filewatch;
mod hibernation;
mod hostile;
mod images;
mod lifecycle;
mod load;
mod old_clients;
mod operators;
mod processes;
mod profiles;
mod proxy;
mod restart;
mod retries;
mod storage;
mod store_mirror;
mod support;
mod takeover;
mod terminal;
mod warm;
mod warm_support;
mod watch;
