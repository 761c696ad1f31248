//! The baseline of the cluster-scale benchmark (`benches/cluster.rs`): a
//! bare kube-rs reflector of the EndpointSlices lb-server watches (the same
//! label selector, the same watcher defaults), and nothing else. Prints
//! `ready MS SLICES` once its store has the initial list, then waits to be
//! killed so its memory can be read.
//!
//! `bare_reflector [--strip-managed-fields]`: the flag drops each object's
//! managed fields and annotations as it arrives, as lb-server does.
//! The API server comes from `KUBECONFIG`, as for lb-server.

use std::time::Instant;

use futures::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, reflector, watcher},
};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let started = Instant::now();
    let strip = std::env::args().any(|a| a == "--strip-managed-fields");
    let client = Client::try_default().await?;
    let api: Api<EndpointSlice> = Api::all(client);
    let (reader, writer) = reflector::store();
    let config = watcher::Config::default().labels(lb_server::source::kube::SERVICE_NAME_LABEL);
    let events = watcher(api, config).modify(move |slice| {
        if strip {
            slice.metadata.managed_fields = None;
            slice.metadata.annotations = None;
        }
    });
    let stream = reflector(writer, events).applied_objects();
    tokio::spawn(stream.for_each(|_| async {}));
    reader.wait_until_ready().await?;
    println!("ready {} {}", started.elapsed().as_millis(), reader.len());
    std::future::pending::<()>().await;
    Ok(())
}
