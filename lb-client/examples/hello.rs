//! A complete lb-client program: subscribes to an LB server, sends calls to
//! a service's backends, and prints how they spread over the backends.
//!
//! Against the demo (`cargo build --release -p greeter --bins && target/release/demo`, which serves the LB
//! on 127.0.0.1:7000 and the service `greeter.default:grpc`):
//!
//! ```sh
//! cargo run --release -p lb-client --example hello -- http://127.0.0.1:7000 greeter.default:grpc 300
//! ```
//!
//! Over mutual TLS (`demo --tls` prints where its files are), set
//! `LB_TLS_CA`, `LB_TLS_CERT` and `LB_TLS_KEY` and use an `https://` URL.

use std::{collections::BTreeMap, time::Duration};

use lookaside_proto::helloworld::{HelloRequest, greeter_client::GreeterClient};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let lb = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:7000".to_owned());
    let target = args
        .next()
        .unwrap_or_else(|| "greeter.default:grpc".to_owned());
    let calls: u32 = args.next().map_or(Ok(300), |n| n.parse())?;

    let mut builder = lb_client::Channel::builder(target.as_str())
        .lb(lb.as_str())
        .policy(lb_client::Policy::PeakEwma);
    if let Ok(ca) = std::env::var("LB_TLS_CA") {
        let mut tls = lb_client::ClientTls::ca_file(ca);
        if let (Ok(cert), Ok(key)) = (std::env::var("LB_TLS_CERT"), std::env::var("LB_TLS_KEY")) {
            tls = tls.identity(cert, key);
        }
        builder = builder.tls(tls);
    }
    // Waits for the first endpoint list and a connected backend.
    let channel = builder.connect().await?;
    let mut client = GreeterClient::new(channel.clone());

    let mut failed = 0u32;
    for i in 0..calls {
        let mut request = tonic::Request::new(HelloRequest {
            name: format!("call {i}"),
        });
        // Enforced by the channel: DEADLINE_EXCEEDED if no reply in time.
        request.set_timeout(Duration::from_secs(1));
        if let Err(status) = client.say_hello(request).await {
            failed += 1;
            eprintln!("call {i}: {status}");
        }
    }

    let by_backend: BTreeMap<String, u64> = channel
        .endpoints()
        .into_iter()
        .map(|endpoint| {
            let name = if endpoint.pod.is_empty() {
                endpoint.addr.to_string()
            } else {
                format!("{} ({})", endpoint.pod, endpoint.addr)
            };
            (name, endpoint.calls)
        })
        .collect();
    println!("{calls} calls to {target} through {lb}, {failed} failed:");
    for (backend, calls) in by_backend {
        println!("  {backend}: {calls}");
    }
    Ok(())
}
