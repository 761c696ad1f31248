//! Command-line flags; every flag also reads an `LB_...` environment variable.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, ValueEnum};

use crate::limits::Limits;
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
    /// Weighted round robin with weights from the backends' ORCA load reports
    /// (`client_side_weighted_round_robin`: gRPC's `weighted_round_robin`, gRFC A58, and
    /// Envoy's), in the cluster's `load_balancing_policy`; clients that do not know it fall
    /// back to round robin.
    WeightedRoundRobin,
}

/// Where Envoy finds the SDS files of `--xds-upstream-tls` unless told otherwise.
pub const DEFAULT_XDS_UPSTREAM_SDS_DIR: &str = "/etc/envoy/sds";

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

    /// Serve lookaside.v1.Admin (every client's address, every pod's IP, node and zone) on
    /// this address of its own, in plaintext (e.g. 127.0.0.1:7001, reached with
    /// `kubectl port-forward`), and not on the gRPC port.
    #[arg(long, env = "LB_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,

    /// The gRPC port's TLS certificate chain (PEM, leaf first); with --tls-key, the port
    /// serves TLS only. Reloaded when it changes.
    #[arg(long, env = "LB_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM). Reloaded when it changes.
    #[arg(long, env = "LB_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Require clients of the gRPC port to present a certificate signed by a CA in this
    /// PEM file (mutual TLS). Reloaded when it changes.
    #[arg(long, env = "LB_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

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

    /// Tell xDS clients to call the backends over mutual TLS: every Cluster carries an
    /// UpstreamTlsContext that verifies a backend as NAME.NAMESPACE.svc (and sends it as SNI).
    /// Envoy reads its certificate and CA by SDS from --xds-upstream-sds-dir; proxyless gRPC
    /// from the certificate provider instance `lookaside-upstream` of its bootstrap.
    #[arg(long, env = "LB_XDS_UPSTREAM_TLS")]
    pub xds_upstream_tls: bool,

    /// With --xds-upstream-tls: the directory, in each Envoy's filesystem, holding the SDS files
    /// lookaside-upstream-cert.yaml and lookaside-upstream-ca.yaml; Envoy watches it, so a
    /// Secret volume's rotation is picked up.
    #[arg(
        long,
        env = "LB_XDS_UPSTREAM_SDS_DIR",
        default_value = DEFAULT_XDS_UPSTREAM_SDS_DIR,
        requires = "xds_upstream_tls"
    )]
    pub xds_upstream_sds_dir: PathBuf,

    /// How long to wait for streams to end on SIGTERM/SIGINT. Connections whose clients have
    /// not read the end of their streams by half of it are closed.
    #[arg(long, env = "LB_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    /// Whether each worker thread gets a CPU of its own (auto: when the process may run on exactly
    /// as many CPUs as it has workers, e.g. a pod given whole CPUs by the static CPU manager).
    /// Off by default: a pod with no CPU limit on a shared node would pin a worker to every
    /// CPU of the node. Read by the binary, which builds the runtime; TOKIO_WORKER_THREADS
    /// sets the number of workers.
    #[arg(long, env = "LB_PIN_WORKERS", value_enum, default_value = "off")]
    pub pin_workers: PinWorkers,

    /// gRPC connections open at once; more are closed as they arrive. Lowered at start to
    /// what the file descriptor limit allows.
    #[arg(long, env = "LB_MAX_CONNECTIONS", default_value = "20000", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Time a new gRPC connection has to finish its TLS handshake and send the HTTP/2 preface.
    #[arg(long, env = "LB_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_positive_duration)]
    pub handshake_timeout: Duration,

    /// Streams (calls) one gRPC connection may have open at once.
    #[arg(long, env = "LB_MAX_STREAMS_PER_CONNECTION", default_value = "100", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_streams_per_connection: u32,

    /// Time a call has to send its first complete request message, and any later message
    /// from its first byte to its last.
    #[arg(long, env = "LB_REQUEST_TIMEOUT", default_value = "10s", value_parser = parse_positive_duration)]
    pub request_timeout: Duration,

    /// Bytes of request messages all connections together may be receiving at once
    /// (e.g. 64Mi); a message that would go over is refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "LB_REQUEST_MEMORY", default_value = "64Mi", value_parser = parse_bytes)]
    pub request_memory: usize,

    /// Time a client of the metrics port has to send a request's headers; a kept-alive
    /// connection idle that long is closed.
    #[arg(long, env = "LB_METRICS_HEADER_TIMEOUT", default_value = "5s", value_parser = parse_positive_duration)]
    pub metrics_header_timeout: Duration,

    /// Bursts of changes to one service go out as at most one version per this window
    /// (e.g. 50ms); the first change of a burst, and a change after a quiet window, go
    /// out at once. 0 publishes every change at once.
    #[arg(long, env = "LB_COALESCE_WINDOW", default_value = DEFAULT_COALESCE_WINDOW, value_parser = parse_duration)]
    pub coalesce_window: Duration,
}

/// The default of `--coalesce-window` (BENCHMARKS.md, "Rolling restart", says why).
pub const DEFAULT_COALESCE_WINDOW: &str = "50ms";

impl Config {
    /// A configuration for the file source on loopback ports the OS picks.
    pub fn for_file(path: impl Into<PathBuf>) -> Self {
        let limits = Limits::default();
        Self {
            source: SourceKind::File,
            file: Some(path.into()),
            file_poll_interval: Duration::from_millis(50),
            namespaces: Vec::new(),
            listen: ([127, 0, 0, 1], 0).into(),
            admin_listen: None,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            metrics_listen: ([127, 0, 0, 1], 0).into(),
            grpclb_stats_interval: Duration::from_secs(10),
            xds_lb_policy: XdsLbPolicy::RoundRobin,
            xds_upstream_tls: false,
            xds_upstream_sds_dir: DEFAULT_XDS_UPSTREAM_SDS_DIR.into(),
            shutdown_timeout: Duration::from_secs(5),
            pin_workers: PinWorkers::Off,
            max_connections: u32::try_from(limits.max_connections).unwrap_or(u32::MAX),
            handshake_timeout: limits.handshake_timeout,
            max_streams_per_connection: limits.max_streams_per_connection,
            request_timeout: limits.request_timeout,
            request_memory: limits.request_memory,
            metrics_header_timeout: limits.metrics_header_timeout,
            coalesce_window: parse_duration(DEFAULT_COALESCE_WINDOW).expect("a valid default"),
        }
    }

    /// The TLS files of the gRPC port, if it serves TLS.
    pub fn tls_files(&self) -> Option<lookaside_tls::ServerFiles> {
        Some(lookaside_tls::ServerFiles {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            client_ca: self.tls_client_ca.clone(),
        })
    }

    /// The limits the flags set.
    pub fn limits(&self) -> Limits {
        Limits {
            max_connections: self.max_connections as usize,
            handshake_timeout: self.handshake_timeout,
            max_streams_per_connection: self.max_streams_per_connection,
            request_timeout: self.request_timeout,
            request_memory: self.request_memory,
            metrics_header_timeout: self.metrics_header_timeout,
        }
    }
}

/// Parses a duration that must be more than zero.
pub fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    let duration = parse_duration(text)?;
    if duration.is_zero() {
        return Err(format!("must be more than 0, not {text:?}"));
    }
    Ok(duration)
}

/// Parses a size in bytes: `65536`, `64Ki`, `64Mi`, `1Gi` (a trailing `B` is allowed).
pub fn parse_bytes(text: &str) -> Result<usize, String> {
    let trimmed = text.trim();
    let trimmed = trimmed.strip_suffix('B').unwrap_or(trimmed);
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let value: usize = number
        .parse()
        .map_err(|_| format!("bad size {text:?}: expected e.g. 65536, 64Ki, 64Mi, 1Gi"))?;
    let scale: usize = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        _ => return Err(format!("bad size unit in {text:?}: use Ki, Mi or Gi")),
    };
    let bytes = value
        .checked_mul(scale)
        .ok_or_else(|| format!("size {text:?} is too large"))?;
    if bytes == 0 {
        return Err(format!("must be more than 0, not {text:?}"));
    }
    Ok(bytes)
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
        let config =
            Config::try_parse_from(["lb-server", "--xds-lb-policy", "weighted-round-robin"])
                .unwrap();
        assert_eq!(config.xds_lb_policy, XdsLbPolicy::WeightedRoundRobin);
        assert!(Config::try_parse_from(["lb-server", "--xds-lb-policy", "maglev"]).is_err());
    }

    #[test]
    fn xds_upstream_tls_is_off_by_default_and_the_sds_dir_needs_it() {
        let config = Config::try_parse_from(["lb-server"]).unwrap();
        assert!(!config.xds_upstream_tls);
        assert_eq!(config.xds_upstream_sds_dir.to_str(), Some("/etc/envoy/sds"));
        let config = Config::try_parse_from([
            "lb-server",
            "--xds-upstream-tls",
            "--xds-upstream-sds-dir",
            "/sds",
        ])
        .unwrap();
        assert!(config.xds_upstream_tls);
        assert_eq!(config.xds_upstream_sds_dir.to_str(), Some("/sds"));
        assert!(
            Config::try_parse_from(["lb-server", "--xds-upstream-sds-dir", "/sds"]).is_err(),
            "an SDS directory without --xds-upstream-tls is a mistake"
        );
        assert!(!Config::for_file("a.yaml").xds_upstream_tls);
    }

    #[test]
    fn limits_default_to_the_documented_values() {
        // The flags' defaults are text for `--help`: this holds them to `Limits::default()`.
        let config = Config::try_parse_from(["lb-server"]).unwrap();
        assert_eq!(config.limits(), Limits::default());
        assert_eq!(config.pin_workers, PinWorkers::Off);
        assert_eq!(
            Config::for_file("a.yaml").limits(),
            Limits::default(),
            "tests run with the production limits"
        );
    }

    #[test]
    fn coalesce_window_defaults_to_the_documented_value_and_0_turns_it_off() {
        let config = Config::try_parse_from(["lb-server"]).unwrap();
        assert_eq!(config.coalesce_window, Duration::from_millis(50));
        assert_eq!(
            Config::for_file("a.yaml").coalesce_window,
            config.coalesce_window
        );
        let off = Config::try_parse_from(["lb-server", "--coalesce-window", "0"]).unwrap();
        assert_eq!(off.coalesce_window, Duration::ZERO);
        let set = Config::try_parse_from(["lb-server", "--coalesce-window", "20ms"]).unwrap();
        assert_eq!(set.coalesce_window, Duration::from_millis(20));
    }

    #[test]
    fn tls_flags_come_together() {
        let config =
            Config::try_parse_from(["lb-server", "--tls-cert", "c.pem", "--tls-key", "k.pem"])
                .unwrap();
        let files = config.tls_files().unwrap();
        assert_eq!(
            (files.cert.to_str(), files.client_ca),
            (Some("c.pem"), None)
        );
        assert!(Config::try_parse_from(["lb-server", "--tls-cert", "c.pem"]).is_err());
        assert!(Config::try_parse_from(["lb-server", "--tls-key", "k.pem"]).is_err());
        assert!(Config::try_parse_from(["lb-server", "--tls-client-ca", "ca.pem"]).is_err());
        assert!(
            Config::try_parse_from(["lb-server"])
                .unwrap()
                .tls_files()
                .is_none()
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("65536").unwrap(), 65536);
        assert_eq!(parse_bytes("64Ki").unwrap(), 64 << 10);
        assert_eq!(parse_bytes("64Mi").unwrap(), 64 << 20);
        assert_eq!(parse_bytes("1GiB").unwrap(), 1 << 30);
        assert!(parse_bytes("0").is_err());
        assert!(parse_bytes("12MB").is_err());
        assert!(parse_bytes("x").is_err());
        assert!(parse_bytes("99999999999999999999Gi").is_err());
        assert!(Config::try_parse_from(["lb-server", "--max-connections", "0"]).is_err());
        assert!(Config::try_parse_from(["lb-server", "--request-timeout", "0s"]).is_err());
    }
}
