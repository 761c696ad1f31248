//! Command-line flags; every flag also reads an `LB_...` environment variable.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, ValueEnum};

pub use crate::runtime::PinWorkers;

/// Where endpoints come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SourceKind {
    /// Kubernetes EndpointSlices (in-cluster config or KUBECONFIG).
    Kube,
    /// A local YAML file, reloaded when it changes.
    File,
}

/// The balancing policy xDS clients are told to use for every cluster (CDS `lb_policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum XdsLbPolicy {
    /// Round robin over the endpoints (weighted by locality and endpoint weight where the client supports it).
    #[default]
    RoundRobin,
    /// The endpoint with the fewest outstanding requests of a random few (Envoy; gRPC only where supported).
    LeastRequest,
    /// Consistent hashing on a ring (needs a hash policy on the route to be useful).
    RingHash,
    /// A random endpoint (Envoy only: proxyless gRPC rejects it).
    Random,
}

/// lb-server's configuration.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "lb-server",
    version,
    about = "Lookaside LB server: streams live backend lists to gRPC clients"
)]
pub struct Config {
    /// Where endpoints come from.
    #[arg(long, env = "LB_SOURCE", value_enum, default_value = "kube")]
    pub source: SourceKind,

    /// The YAML file, with `--source file`.
    #[arg(long, env = "LB_FILE", required_if_eq("source", "file"))]
    pub file: Option<PathBuf>,

    /// How often to poll the file for changes, besides watching its directory.
    #[arg(long, env = "LB_FILE_POLL_INTERVAL", default_value = "1s", value_parser = parse_poll_interval)]
    pub file_poll_interval: Duration,

    /// Watch only these namespaces (repeat, or comma-separate in the env var);
    /// none means cluster-wide. With namespaces, a namespaced Role suffices.
    #[arg(long = "namespace", env = "LB_NAMESPACE", value_delimiter = ',')]
    pub namespaces: Vec<String>,

    /// gRPC listen address.
    #[arg(long, env = "LB_LISTEN", default_value = "0.0.0.0:7000")]
    pub listen: SocketAddr,

    /// HTTP listen address for /metrics, /healthz and /readyz.
    #[arg(long, env = "LB_METRICS_LISTEN", default_value = "0.0.0.0:9090")]
    pub metrics_listen: SocketAddr,

    /// How often grpclb clients should report client stats (0s disables reports).
    #[arg(long, env = "LB_GRPCLB_STATS_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub grpclb_stats_interval: Duration,

    /// The balancing policy lb-server's xDS clusters (CDS) ask xDS clients to use.
    #[arg(
        long,
        env = "LB_XDS_LB_POLICY",
        value_enum,
        default_value = "round-robin"
    )]
    pub xds_lb_policy: XdsLbPolicy,

    /// How long to wait for streams to end on SIGTERM/SIGINT.
    #[arg(long, env = "LB_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    /// Whether each worker thread gets a CPU of its own (auto: when the process may run on exactly
    /// as many CPUs as it has workers, e.g. a pod given whole CPUs). Read by the binary, which
    /// builds the runtime; TOKIO_WORKER_THREADS sets the number of workers.
    #[arg(long, env = "LB_PIN_WORKERS", value_enum, default_value = "auto")]
    pub pin_workers: PinWorkers,
}

impl Config {
    /// A configuration for the file source on loopback ports the OS picks.
    pub fn for_file(path: impl Into<PathBuf>) -> Self {
        Self {
            source: SourceKind::File,
            file: Some(path.into()),
            file_poll_interval: Duration::from_millis(50),
            namespaces: Vec::new(),
            listen: ([127, 0, 0, 1], 0).into(),
            metrics_listen: ([127, 0, 0, 1], 0).into(),
            grpclb_stats_interval: Duration::from_secs(10),
            xds_lb_policy: XdsLbPolicy::RoundRobin,
            shutdown_timeout: Duration::from_secs(5),
            pin_workers: PinWorkers::Auto,
        }
    }
}

/// Parses `250ms`, `10s`, `2m` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("bad duration {text:?}: expected e.g. 250ms, 10s, 2m"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        _ => return Err(format!("bad duration unit in {text:?}: use ms, s or m")),
    };
    Ok(Duration::from_secs_f64(seconds))
}

/// Parses the file poll interval, which must be more than zero.
pub fn parse_poll_interval(text: &str) -> Result<Duration, String> {
    let interval = parse_duration(text)?;
    if interval.is_zero() {
        return Err(format!(
            "the file poll interval must be more than 0, not {text:?} \
             (the file's directory is watched too, so a long interval is fine)"
        ));
    }
    Ok(interval)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("3h").is_err());
        assert!(parse_duration("x").is_err());
        assert_eq!(parse_poll_interval("1m").unwrap(), Duration::from_secs(60));
        let zero = parse_poll_interval("0s").unwrap_err();
        assert!(zero.contains("more than 0"), "{zero}");
    }

    #[test]
    fn flags_and_defaults() {
        let config =
            Config::try_parse_from(["lb-server", "--source", "file", "--file", "a.yaml"]).unwrap();
        assert_eq!(config.listen.to_string(), "0.0.0.0:7000");
        assert_eq!(config.metrics_listen.to_string(), "0.0.0.0:9090");
        assert!(Config::try_parse_from(["lb-server", "--source", "file"]).is_err());
        let config =
            Config::try_parse_from(["lb-server", "--namespace", "a", "--namespace", "b,c"])
                .unwrap();
        assert_eq!(config.namespaces, ["a", "b", "c"]);
        assert_eq!(config.source, SourceKind::Kube);
        assert_eq!(config.xds_lb_policy, XdsLbPolicy::RoundRobin);
        let config = Config::try_parse_from(["lb-server", "--xds-lb-policy", "ring-hash"]).unwrap();
        assert_eq!(config.xds_lb_policy, XdsLbPolicy::RingHash);
        assert!(Config::try_parse_from(["lb-server", "--xds-lb-policy", "maglev"]).is_err());
    }
}
