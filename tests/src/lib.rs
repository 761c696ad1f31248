//! Lookaside's end-to-end scenarios and the harnesses they share.
//!
//! # Layout
//! - [`kube_api`]: a Kubernetes API server stand-in for EndpointSlices that
//!   speaks the real list/watch wire protocol, with the EndpointSlice fixture
//!   builders (lb-server's `source::kube::fixtures`, re-exported).
//! - [`local`]: greeter backends, lb-server (in-process or a real process) and
//!   the file source, on loopback, each stopped by its own handle.

pub mod kube_api;
pub mod local;
