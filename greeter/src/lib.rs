//! The greeter: Lookaside's example service and the tools that prove the balance.
//!
//! # Layout
//! - [`server`]: `helloworld.Greeter` that names the backend serving each call,
//!   with health, reflection, `MaxConnectionAge` and graceful drain on shutdown.
//! - [`demo`]: the whole system on loopback: lb-server, backends, a client.
//! - [`load`]: the load generator and its summary (calls per backend, latency, errors).

pub mod demo;
pub mod load;
pub mod server;
