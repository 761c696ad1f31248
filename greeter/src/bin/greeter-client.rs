//! `greeter-client`: N calls at concurrency C through lookaside, DNS, or one
//! direct channel; prints calls per backend, throughput, latency and errors.

use std::path::PathBuf;

use clap::{ArgGroup, Parser};
use greeter::{
    client,
    load::{self, Tally},
};
use lookaside_proto::helloworld::greeter_client::GreeterClient;
use tokio_util::sync::CancellationToken;

/// Load generator for the greeter: shows how calls spread over backends.
#[derive(Debug, Parser)]
#[command(name = "greeter-client", version)]
#[command(group(ArgGroup::new("mode").required(true).args(["lb", "dns", "direct"])))]
struct Args {
    /// The service, as lb-server names it.
    #[arg(long, env = "GREETER_TARGET", default_value = "greeter.default:grpc")]
    target: String,
    /// Lookaside: LB server URL (repeat for failover).
    #[arg(long, env = "GREETER_LB", value_delimiter = ',')]
    lb: Vec<String>,
    /// Headless-DNS style: balance over every address HOST:PORT resolves to (resolved once).
    #[arg(long, env = "GREETER_DNS")]
    dns: Option<String>,
    /// One channel to one address: what a ClusterIP Service gives you.
    #[arg(long, env = "GREETER_DIRECT")]
    direct: Option<String>,
    /// Fallback addresses for lookaside (IP:PORT or dns:///HOST:PORT).
    #[arg(long, value_delimiter = ',')]
    fallback: Vec<String>,
    /// Calls to make.
    #[arg(long, env = "GREETER_CALLS", default_value_t = 10_000)]
    calls: u64,
    /// Calls in flight at once.
    #[arg(long, env = "GREETER_CONCURRENCY", default_value_t = 10)]
    concurrency: usize,
    /// Lookaside policy: round-robin, p2c or least-request.
    #[arg(long, env = "GREETER_POLICY", default_value = "round-robin")]
    policy: lb_client::Policy,
    /// Print the summary as one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Call over TLS, trusting the CA certificates in this PEM file (for the LB and the
    /// backends alike).
    #[arg(long, env = "GREETER_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Present this client certificate (PEM) to servers that require one (mTLS).
    #[arg(long, env = "GREETER_TLS_CERT", requires_all = ["tls_ca", "tls_key"])]
    tls_cert: Option<PathBuf>,
    /// The key of --tls-cert (PEM).
    #[arg(long, env = "GREETER_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The name to verify on the server's certificate: for --lb, the backends' (default
    /// NAME.NAMESPACE.svc of --target); for --direct and --dns, the servers' (default the
    /// host given).
    #[arg(long, env = "GREETER_TLS_SERVER_NAME", requires = "tls_ca")]
    tls_server_name: Option<String>,
}

impl Args {
    /// TLS for --direct and --dns, if calls go over TLS.
    fn tls(&self) -> Option<client::Tls> {
        Some(client::Tls {
            files: lookaside_tls::ClientFiles {
                roots: lookaside_tls::Roots::File(self.tls_ca.clone()?),
                identity: self.tls_cert.clone().zip(self.tls_key.clone()),
            },
            server_name: self.tls_server_name.clone(),
        })
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    greeter::init_tracing("warn");
    let args = Args::parse();
    let tally = Tally::new(args.concurrency);
    let done = CancellationToken::new();
    let show_progress = !args.json && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let bar = show_progress
        .then(|| tokio::spawn(load::progress(tally.clone(), args.calls, done.clone())));
    let (calls, concurrency, stop) = (Some(args.calls), args.concurrency, CancellationToken::new());

    let tls = args.tls();
    let mode = if let Some(addr) = &args.direct {
        let channel = client::direct(addr, tls.as_ref()).await?;
        load::run(
            GreeterClient::new(channel),
            calls,
            concurrency,
            tally.clone(),
            stop,
        )
        .await;
        format!("direct {addr}")
    } else if let Some(host_port) = &args.dns {
        let resolved = client::dns(host_port, tls.as_ref()).await?;
        load::run(
            GreeterClient::new(resolved.channel),
            calls,
            concurrency,
            tally.clone(),
            stop,
        )
        .await;
        format!(
            "dns {host_port} ({} addresses, resolved once)",
            resolved.addrs.len()
        )
    } else {
        let mut builder = lb_client::Channel::builder(&args.target).policy(args.policy);
        for lb in &args.lb {
            builder = builder.lb(lb);
        }
        for fallback in &args.fallback {
            builder = builder.fallback(fallback);
        }
        if let Some(ca) = &args.tls_ca {
            let mut client_tls = lb_client::ClientTls::ca_file(ca);
            if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
                client_tls = client_tls.identity(cert, key);
            }
            builder = builder.tls(client_tls);
            if let Some(name) = &args.tls_server_name {
                builder = builder.tls_server_name(name);
            }
        }
        let channel = builder.connect().await?;
        load::run(
            GreeterClient::new(channel),
            calls,
            concurrency,
            tally.clone(),
            stop,
        )
        .await;
        format!(
            "lookaside {} via {} ({})",
            args.target,
            args.lb.join(","),
            args.policy
        )
    };
    done.cancel();
    if let Some(bar) = bar {
        let _ = bar.await;
    }
    let summary = tally.summary();
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!(
            "{mode}: {} calls at concurrency {}\n",
            args.calls, args.concurrency
        );
        print!("{}", summary.table());
    }
    if summary.ok < summary.calls {
        std::process::exit(2);
    }
    Ok(())
}
