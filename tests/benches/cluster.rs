//! Cluster scale: lb-server's kube source against a bare kube-rs reflector
//! of the same EndpointSlices, side by side in one run.
//!
//! The Kubernetes API stand-in (`lookaside_tests::kube_api`) serves
//! `CLUSTER_SERVICES` services (default 2,000) of `CLUSTER_ENDPOINTS`
//! endpoints each (default 50), one EndpointSlice per service, spread over
//! 20 namespaces, each slice as the EndpointSlice controller writes it
//! (labels, owner reference, trigger-time annotation, one managed-fields
//! entry; endpoints with conditions, node, zone and a Pod target). Each
//! contender runs as its own process from `KUBECONFIG`: the time from its
//! start to ready (lb-server: `source synced; ready`; the reflector: its
//! store ready) and its RSS once ready and settled. `CLUSTER_ROUNDS` rounds
//! (default 2), contenders interleaved.
//!
//! ```sh
//! cargo build --release --workspace --bins --examples
//! cargo bench -p lookaside-tests --bench cluster
//! ```

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::discovery::v1::EndpointSlice,
    apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry, OwnerReference},
};
use lookaside_tests::{
    kube_api::{KubeApi, ep, slice},
    local::lb_server_binary,
};

const NAMESPACES: usize = 20;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A 5-character pod-name suffix, as ReplicaSets make them.
fn suffix(n: usize) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut n = n.wrapping_mul(2_654_435_761);
    (0..5)
        .map(|_| {
            let c = ALPHABET[n % ALPHABET.len()];
            n /= ALPHABET.len();
            c as char
        })
        .collect()
}

/// Service `s` as the EndpointSlice controller writes its slice.
fn service_slice(s: usize, endpoints: usize) -> EndpointSlice {
    let namespace = format!("team-{}", s % NAMESPACES);
    let service = format!("service-{s}");
    let template = format!("{service}-7d9c8b6f5");
    let mut builder = slice(&namespace, &format!("{service}-{}", suffix(s)), &service)
        .port("grpc", 50051)
        .label("app.kubernetes.io/name", &service)
        .label(
            "endpointslice.kubernetes.io/managed-by",
            "endpointslice-controller.k8s.io",
        );
    for i in 0..endpoints {
        let n = s * endpoints + i;
        let address = format!("10.{}.{}.{}", (n >> 16) & 255, (n >> 8) & 255, n & 255);
        builder = builder.endpoint(
            ep(&address)
                .ready(true)
                .serving(true)
                .zone(&format!("europe-west1-{}", ["b", "c", "d"][i % 3]))
                .node(&format!(
                    "gke-prod-pool-1-{:08x}-{}",
                    n % 300,
                    suffix(n % 300)
                ))
                .pod(&format!("{template}-{}", suffix(n))),
        );
    }
    let mut slice = builder.build();
    for endpoint in &mut slice.endpoints {
        if let Some(conditions) = &mut endpoint.conditions {
            conditions.terminating = Some(false);
        }
        if let Some(target) = &mut endpoint.target_ref {
            target.namespace = Some(namespace.clone());
            target.uid = Some(format!(
                "4f0c2a7e-1b3d-4e5f-8a9b-{:012x}",
                s * endpoints + 1
            ));
        }
    }
    let metadata = &mut slice.metadata;
    metadata.generate_name = Some(format!("{service}-"));
    metadata.annotations = Some(BTreeMap::from([(
        "endpoints.kubernetes.io/last-change-trigger-time".to_owned(),
        "2026-11-27T10:15:30Z".to_owned(),
    )]));
    metadata.owner_references = Some(vec![OwnerReference {
        api_version: "v1".into(),
        kind: "Service".into(),
        name: service.clone(),
        uid: format!("9b1d6c3a-2e4f-4a5b-9c8d-{s:012x}"),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }]);
    // `endpoints` and `ports` are atomic lists: the controller's entry names
    // them whole, not per endpoint.
    metadata.managed_fields = Some(vec![ManagedFieldsEntry {
        api_version: Some("discovery.k8s.io/v1".into()),
        fields_type: Some("FieldsV1".into()),
        fields_v1: Some(FieldsV1(serde_json::json!({
            "f:addressType": {},
            "f:endpoints": {},
            "f:metadata": {
                "f:annotations": {".": {}, "f:endpoints.kubernetes.io/last-change-trigger-time": {}},
                "f:generateName": {},
                "f:labels": {
                    ".": {},
                    "f:app.kubernetes.io/name": {},
                    "f:endpointslice.kubernetes.io/managed-by": {},
                    "f:kubernetes.io/service-name": {}
                },
                "f:ownerReferences": {".": {}, format!("k:{{\"uid\":\"{s}\"}}"): {}}
            },
            "f:ports": {}
        }))),
        manager: Some("kube-controller-manager".into()),
        operation: Some("Update".into()),
        subresource: None,
        time: None,
    }]);
    slice
}

fn kubeconfig(dir: &tempfile::TempDir, server: &str) -> PathBuf {
    let path = dir.path().join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: stand-in\n  cluster:\n    server: {server}\n\
             users:\n- name: bench\n  user: {{}}\ncontexts:\n- name: bench\n  context:\n    cluster: stand-in\n    user: bench\n\
             current-context: bench\n"
        ),
    )
    .unwrap();
    path
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

struct Contender {
    name: &'static str,
    program: PathBuf,
    args: &'static [&'static str],
    /// The output line that says it is ready.
    ready_line: &'static str,
    logs_to_stderr: bool,
}

struct Run {
    ready: Duration,
    rss_kib: u64,
}

/// Starts `command`, waits for the line that says it is ready, lets it
/// settle, reads its RSS and kills it.
fn measure(mut command: Command, ready_line: &str, from_stderr: bool) -> Run {
    let started = Instant::now();
    if from_stderr {
        command.stdout(Stdio::null()).stderr(Stdio::piped());
    } else {
        command.stdout(Stdio::piped()).stderr(Stdio::inherit());
    }
    let mut child: Child = command.spawn().expect("start the contender");
    let output: Box<dyn std::io::Read + Send> = if from_stderr {
        Box::new(child.stderr.take().unwrap())
    } else {
        Box::new(child.stdout.take().unwrap())
    };
    let mut lines = BufReader::new(output).lines();
    let ready = loop {
        let line = lines
            .next()
            .expect("the contender exited before it was ready")
            .unwrap();
        if line.contains(ready_line) {
            break started.elapsed();
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    // Allocations settle (the last list pages freed, lb-server's first
    // encodings made) before memory is read.
    std::thread::sleep(Duration::from_secs(2));
    let rss_kib = rss_kib(child.id());
    let _ = child.kill();
    let _ = child.wait();
    Run { ready, rss_kib }
}

fn examples_binary(name: &str) -> PathBuf {
    let binary = lb_server_binary()
        .parent()
        .unwrap()
        .join("examples")
        .join(name);
    assert!(
        binary.exists(),
        "{} is missing: run `cargo build --release --workspace --bins --examples` first",
        binary.display()
    );
    binary
}

fn main() {
    let services = env_or("CLUSTER_SERVICES", 2_000);
    let endpoints = env_or("CLUSTER_ENDPOINTS", 50);
    let rounds = env_or("CLUSTER_ROUNDS", 2);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let api = runtime.block_on(KubeApi::start());
    let written = Instant::now();
    for s in 0..services {
        api.apply(service_slice(s, endpoints));
    }
    let list_bytes = serde_json::to_vec(&api.objects()).unwrap().len();
    eprintln!(
        "{services} services x {endpoints} endpoints ({} slices, {:.1} MB of JSON) written in {:.1} s",
        services,
        list_bytes as f64 / 1e6,
        written.elapsed().as_secs_f64()
    );
    let dir = tempfile::tempdir().unwrap();
    let config = kubeconfig(&dir, &api.url());

    let contenders = [
        Contender {
            name: "kube-rs reflector, bare",
            program: examples_binary("bare_reflector"),
            args: &[],
            ready_line: "ready ",
            logs_to_stderr: false,
        },
        Contender {
            name: "kube-rs reflector, managed fields and annotations dropped",
            program: examples_binary("bare_reflector"),
            args: &["--strip-managed-fields"],
            ready_line: "ready ",
            logs_to_stderr: false,
        },
        Contender {
            name: "lb-server (kube source, defaults)",
            program: lb_server_binary(),
            args: &[
                "--source",
                "kube",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
            ],
            ready_line: "source synced; ready",
            logs_to_stderr: true,
        },
    ];
    let mut results: Vec<Vec<Run>> = contenders.iter().map(|_| Vec::new()).collect();
    for _ in 0..rounds {
        for (contender, runs) in contenders.iter().zip(&mut results) {
            let mut command = Command::new(&contender.program);
            command
                .args(contender.args)
                .env("KUBECONFIG", &config)
                .env("LB_LOG", "info");
            runs.push(measure(
                command,
                contender.ready_line,
                contender.logs_to_stderr,
            ));
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let base_rss = median(results[0].iter().map(|r| r.rss_kib as f64).collect());
    println!(
        "\n{services} services x {endpoints} endpoints ({} endpoints), {rounds} rounds, medians:\n",
        services * endpoints
    );
    println!("| contender | ready s (each run) | RSS MiB (each run) | RSS / bare reflector |");
    println!("|---|---|---|---:|");
    for (Contender { name, .. }, runs) in contenders.iter().zip(&results) {
        let ready: Vec<String> = runs
            .iter()
            .map(|r| format!("{:.2}", r.ready.as_secs_f64()))
            .collect();
        let rss: Vec<String> = runs
            .iter()
            .map(|r| format!("{:.1}", r.rss_kib as f64 / 1024.0))
            .collect();
        let ratio = median(runs.iter().map(|r| r.rss_kib as f64).collect()) / base_rss;
        println!(
            "| {name} | {} | {} | {ratio:.2} |",
            ready.join(", "),
            rss.join(", ")
        );
    }
    runtime.block_on(api.shutdown());
}
