//! `greeter-client`: N calls at concurrency C through lookaside, DNS, or one
//! direct channel; prints calls per backend, throughput, latency and errors.

use std::{collections::BTreeMap, fmt::Write as _, path::PathBuf};

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
    /// Lookaside policy: round-robin, p2c, least-request or wrr (weighted round robin
    /// from the backends' load reports).
    #[arg(long, env = "GREETER_POLICY", default_value = "round-robin")]
    policy: lb_client::Policy,
    /// With --policy wrr: read the backends' load reports out of band, one every this
    /// many seconds (e.g. 1), instead of from every call's trailers.
    #[arg(long, env = "GREETER_ORCA_OOB")]
    orca_oob: Option<f64>,
    /// Lookaside: the zone this client runs in (its node's topology.kubernetes.io/zone), for
    /// zone-aware routing; empty: unknown. The summary then shows calls per zone.
    #[arg(long, env = "LB_ZONE", default_value = "")]
    zone: String,
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

/// Where a zone-aware run's calls went (endpoints removed during the run not
/// counted).
#[derive(Debug, serde::Serialize)]
struct Zones {
    /// This client's zone.
    zone: String,
    /// Calls sent to each zone's endpoints.
    calls: BTreeMap<String, u64>,
    /// The shares the LB server last sent, in parts per million.
    shares: BTreeMap<String, u32>,
}

impl Zones {
    fn table(&self) -> String {
        let total: u64 = self.calls.values().sum::<u64>().max(1);
        let mut out = format!(
            "\nzone (this client: {})          calls    share  LB share\n",
            self.zone
        );
        let names: std::collections::BTreeSet<&String> =
            self.calls.keys().chain(self.shares.keys()).collect();
        for name in names {
            let calls = self.calls.get(name).copied().unwrap_or(0);
            let shown = if name.is_empty() { "(none)" } else { name };
            let lb_share = match self.shares.get(name) {
                Some(ppm) => format!("{:.2}%", f64::from(*ppm) / 10_000.0),
                None => "-".into(),
            };
            let local = if *name == self.zone { " (local)" } else { "" };
            let _ = writeln!(
                out,
                "{:<30} {calls:>8} {:>7.2}% {lb_share:>9}{local}",
                shown,
                calls as f64 * 100.0 / total as f64,
            );
        }
        out
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
    // Lookaside with a zone: calls per zone and the shares in use, after the run.
    let mut zones = None;
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
        let mut builder = lb_client::Channel::builder(&args.target)
            .policy(args.policy)
            .zone(&args.zone);
        if let Some(seconds) = args.orca_oob {
            let interval = std::time::Duration::try_from_secs_f64(seconds)
                .map_err(|e| anyhow::anyhow!("--orca-oob {seconds}: {e}"))?;
            builder = builder.orca_out_of_band(interval);
        }
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
            GreeterClient::new(channel.clone()),
            calls,
            concurrency,
            tally.clone(),
            stop,
        )
        .await;
        if !args.zone.is_empty() {
            zones = Some(Zones {
                zone: args.zone.clone(),
                calls: channel.calls_per_zone(),
                shares: channel.zone_shares().into_iter().collect(),
            });
        }
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
        let mut json = serde_json::to_value(&summary)?;
        if let (Some(zones), Some(object)) = (&zones, json.as_object_mut()) {
            object.insert("zones".into(), serde_json::to_value(zones)?);
        }
        println!("{json}");
    } else {
        println!(
            "{mode}: {} calls at concurrency {}\n",
            args.calls, args.concurrency
        );
        print!("{}", summary.table());
        if let Some(zones) = &zones {
            print!("{}", zones.table());
        }
    }
    if summary.ok < summary.calls {
        std::process::exit(2);
    }
    Ok(())
}
