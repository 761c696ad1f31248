//! Sources: where endpoint sets come from.
//!
//! A source publishes whole, consistent endpoint sets per service into the
//! [`Store`](crate::store::Store), never half a list, and reports when it has
//! synced. It knows nothing of subscribers or gRPC. A transient error never
//! publishes an empty set: the last good state stays.

pub mod file;
pub mod kube;
