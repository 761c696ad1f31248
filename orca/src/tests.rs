//! The reporter against a real tonic server and client on loopback.

use std::time::Duration;

use lookaside_proto::{
    helloworld::{
        HelloReply, HelloRequest,
        greeter_client::GreeterClient,
        greeter_server::{Greeter, GreeterServer},
    },
    xds::service::orca::v3::{
        OrcaLoadReportRequest, open_rca_service_client::OpenRcaServiceClient,
    },
};
use tokio::net::TcpListener;
use tokio_stream::{StreamExt as _, wrappers::TcpListenerStream};
use tonic::{Request, Response, Status, transport::Channel};

use super::*;

const WINDOW: Duration = Duration::from_millis(100);
const WAIT: Duration = Duration::from_secs(5);

/// The CPU time of the calling thread.
fn thread_cpu_time() -> Duration {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID).unwrap();
    Duration::from(t)
}

/// CPU each call spends.
const CALL_CPU: Duration = Duration::from_millis(2);

/// Spends [`CALL_CPU`] of CPU per call; a name of "fail" fails the call.
struct Busy;

#[tonic::async_trait]
impl Greeter for Busy {
    async fn say_hello(
        &self,
        request: Request<HelloRequest>,
    ) -> Result<Response<HelloReply>, Status> {
        let started = thread_cpu_time();
        let mut x = 0u64;
        while thread_cpu_time() - started < CALL_CPU {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        if request.get_ref().name == "fail" {
            return Err(Status::internal("asked to fail"));
        }
        Ok(Response::new(HelloReply {
            message: format!("{x}"),
            backend: String::new(),
        }))
    }
}

async fn serve(reporter: &LoadReporter) -> (Channel, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = tonic::transport::Server::builder()
        .layer(reporter.layer())
        .add_service(reporter.service())
        .add_service(GreeterServer::new(Busy));
    let task = tokio::spawn(async move {
        router
            .serve_with_incoming(TcpListenerStream::new(listener).map(|tcp| {
                // tonic leaves a handed-in socket as it is: without this a
                // report can wait 40 ms for a delayed ACK (Nagle).
                tcp.inspect(|tcp| tcp.set_nodelay(true).unwrap())
            }))
            .await
            .unwrap();
    });
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    (channel, task)
}

#[tokio::test]
async fn every_call_carries_the_last_windows_load() {
    let reporter = LoadReporter::with_window(WINDOW, WINDOW);
    let (channel, server) = serve(&reporter).await;
    let mut client = GreeterClient::new(channel);
    let call = async |client: &mut GreeterClient<Channel>, name: &str| {
        let request = Request::new(HelloRequest { name: name.into() });
        match client.say_hello(request).await {
            Ok(response) => response.metadata().clone().into_headers(),
            Err(status) => status.metadata().clone().into_headers(),
        }
    };

    // Calls for a window and more, one in four failing: the next report
    // shows the rates and the CPU they took.
    let started = std::time::Instant::now();
    let mut calls = 0u32;
    while started.elapsed() < WINDOW * 3 {
        let name = if calls % 4 == 3 { "fail" } else { "ok" };
        let _ = call(&mut client, name).await;
        calls += 1;
    }
    let trailers = call(&mut client, "ok").await;
    let report = decode_trailer(&trailers).expect("a report in the trailers");
    let rate = f64::from(calls) / started.elapsed().as_secs_f64();
    assert!(
        report.rps_fractional > rate * 0.5 && report.rps_fractional < rate * 2.0,
        "{report:?} for about {rate:.0} calls/s"
    );
    assert!(
        report.eps > report.rps_fractional * 0.1 && report.eps < report.rps_fractional * 0.5,
        "a quarter of calls failed: {report:?}"
    );
    // The process spent at least the calls' own CPU, spread over its CPUs.
    let cpus = std::thread::available_parallelism().unwrap().get() as f64;
    let calls_cpu = report.rps_fractional * CALL_CPU.as_secs_f64() / cpus;
    assert!(
        report.cpu_utilization > calls_cpu * 0.8 && report.cpu_utilization <= 1.0,
        "{report:?} on {cpus} CPUs; the calls alone take {calls_cpu:.3}"
    );

    // A trailers-only response (the error) carries one too.
    let trailers = call(&mut client, "fail").await;
    assert!(decode_trailer(&trailers).is_some(), "{trailers:?}");
    server.abort();
}

#[tokio::test]
async fn out_of_band_reports_come_at_the_interval_until_closed() {
    let reporter = LoadReporter::with_window(WINDOW, WINDOW);
    let (channel, server) = serve(&reporter).await;
    let mut greeter = GreeterClient::new(channel.clone());
    let mut oob = OpenRcaServiceClient::new(channel);

    // Asked for 1 ms, served at the minimum: the first report at once.
    let mut reports = oob
        .stream_core_metrics(OrcaLoadReportRequest {
            report_interval: Some(prost_types_duration(Duration::from_millis(1))),
            request_cost_names: Vec::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(WAIT, reports.message()).await.unwrap();
    assert!(first.unwrap().is_some());
    let interval_start = std::time::Instant::now();
    tokio::time::timeout(WAIT, reports.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        interval_start.elapsed() >= WINDOW * 9 / 10,
        "served faster than the minimum interval: {:?}",
        interval_start.elapsed()
    );

    // Calls for two windows: a later report has them (and the reports'
    // own stream is not counted as a call).
    let started = std::time::Instant::now();
    let mut calls = 0u32;
    while started.elapsed() < WINDOW * 2 {
        greeter
            .say_hello(HelloRequest { name: "ok".into() })
            .await
            .unwrap();
        calls += 1;
    }
    let mut busy = None;
    for _ in 0..10 {
        let report = tokio::time::timeout(WAIT, reports.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if report.rps_fractional > 0.0 {
            busy = Some(report);
            break;
        }
    }
    let busy = busy.expect("a report with the calls in it");
    assert!(busy.cpu_utilization > 0.0, "{busy:?}");
    let rate = f64::from(calls) / WINDOW.as_secs_f64() / 2.0;
    assert!(busy.rps_fractional < rate * 2.0, "{busy:?} for {rate:.0}/s");

    reporter.close();
    // A report already on its way when close() ran may still arrive; then
    // the stream must end cleanly.
    let end = tokio::time::timeout(WAIT, async {
        loop {
            match reports.message().await {
                Ok(Some(_)) => continue,
                other => break other,
            }
        }
    })
    .await
    .unwrap();
    assert!(matches!(end, Ok(None)), "{end:?}");
    let refused = oob
        .stream_core_metrics(OrcaLoadReportRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    server.abort();
}

fn prost_types_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration::try_from(d).unwrap()
}

#[test]
fn a_trailer_decodes_padded_or_not() {
    let report = OrcaLoadReport {
        cpu_utilization: 0.5,
        rps_fractional: 12.25,
        ..OrcaLoadReport::default()
    };
    let bytes = report.encode_to_vec();
    for engine in [
        base64::engine::general_purpose::STANDARD,
        base64::engine::general_purpose::STANDARD_NO_PAD,
    ] {
        let mut headers = http::HeaderMap::new();
        headers.insert(TRAILER, engine.encode(&bytes).parse().unwrap());
        assert_eq!(decode_trailer(&headers), Some(report.clone()));
    }
}
