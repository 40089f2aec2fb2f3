//! Integration tests: a real server started through the library on 127.0.0.1:0 with a
//! temporary database, spoken to over real HTTP.

mod abuse;
mod bad_input;
mod browser;
mod checkpoint;
mod crash;
mod embedded;
mod longpoll;
#[cfg(feature = "postgres")]
mod nodes;
mod pg;
mod props;
mod proxy;
mod retention;
mod security;
mod service;
mod sse;
mod status;
mod streams;
mod support;
