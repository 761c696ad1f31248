//! The greeter: Lookaside's example service and the tools that prove the balance.
//!
//! # Layout
//! - [`server`]: `helloworld.Greeter` that names the backend serving each call,
//!   with health, reflection, `MaxConnectionAge` and graceful drain on shutdown.

pub mod server;
