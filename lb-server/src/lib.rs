//! lb-server: Lookaside's control plane.
//!
//! It watches Kubernetes EndpointSlices (or a local YAML file) and streams
//! each client the live list of healthy backends of the service it names,
//! over `lookaside.v1.Discovery` (lb-client), `grpc.lb.v1.LoadBalancer`
//! (stock grpclb clients) and xDS ADS (Envoy, proxyless gRPC); operators inspect it through `lookaside.v1.Admin`,
//! health, reflection and Prometheus metrics.
//!
//! # Layout
//! - [`config`]: flags and `LB_*` environment variables.
//! - [`model`]: service keys, targets, endpoints, snapshots.
//! - [`source`]: where endpoints come from: [`source::kube`] and [`source::file`].
//! - [`store`]: one watch channel per service; knows nothing of gRPC or Kubernetes.
//! - [`api`]: the gRPC edge: Discovery, grpclb, xDS, Admin, and the subscriber registry.
//! - [`http`]: `/metrics`, `/healthz`, `/readyz`.
//! - [`limits`]: every limit that protects the server from its clients, in one place.
//! - [`listener`]: the gRPC port's accept loop and handshakes.
//! - [`metrics`]: the Prometheus metrics.
//! - [`server`]: binds, wires and runs it all, and drains on shutdown.
//! - [`signal`]: the SIGTERM/SIGINT future.
//! - [`runtime`]: the binary's tokio runtime, and pinning its workers to CPUs.
//! - [`zones`]: zone shares for zone-aware routing, from subscribers' and endpoints' zones.

pub mod api;
pub mod config;
pub mod http;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod model;
pub mod runtime;
pub mod server;
pub mod signal;
pub mod source;
pub mod store;
pub mod zones;

pub use config::Config;
pub use server::LbServer;
