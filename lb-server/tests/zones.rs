//! Zone-aware routing through lb-server: a Watch that names its zone gets
//! the shares of its zone, computed from every subscriber's zone, and new
//! shares with an unchanged version when the mix of subscribers changes.

use lookaside_proto::lookaside::v1::{
    ListSubscribersRequest, WatchRequest, WatchResponse, ZoneShare, admin_client::AdminClient,
    discovery_client::DiscoveryClient,
};
use tonic::{Code, transport::Channel};

mod common;

use common::{TestServer, next_update};

/// Zone a has one endpoint, zone b three; one is hinted.
const ZONES: &str = "services:\n  greeter.default:grpc:\n    - address: 127.0.0.1:50051\n      zone: a\n      for_zones: [a]\n      for_nodes: [node-1]\n    - address: 127.0.0.1:50052\n      zone: b\n    - address: 127.0.0.1:50053\n      zone: b\n    - address: 127.0.0.1:50054\n      zone: b\n";

async fn watch(
    channel: Channel,
    zone: &str,
) -> Result<tonic::Streaming<WatchResponse>, tonic::Status> {
    let request = WatchRequest {
        target: "greeter.default:grpc".into(),
        zone: zone.into(),
        ..Default::default()
    };
    Ok(DiscoveryClient::new(channel)
        .watch(request)
        .await?
        .into_inner())
}

fn shares(response: &WatchResponse) -> Vec<(&str, u32)> {
    response
        .zone_shares
        .iter()
        .map(|s| (s.zone.as_str(), s.share))
        .collect()
}

#[tokio::test]
async fn a_zone_gets_its_shares_and_new_ones_when_another_zone_subscribes() {
    let server = TestServer::start(ZONES).await;
    let mut a = watch(server.channel().await, "a").await.unwrap();
    let first = next_update(&mut a).await;
    // Alone, zone a's clients are all the clients, for a quarter of the capacity.
    assert_eq!(shares(&first), [("a", 250_000), ("b", 750_000)]);
    assert_eq!(first.endpoints.len(), 4);
    assert_eq!(first.endpoints[0].for_zones, ["a"], "hints pass through");
    assert_eq!(first.endpoints[0].for_nodes, ["node-1"]);

    // A client in b: half the clients now, so a keeps 0.25 / 0.5 local.
    let mut b = watch(server.channel().await, "b").await.unwrap();
    assert_eq!(shares(&next_update(&mut b).await), [("b", 1_000_000)]);
    let update = next_update(&mut a).await;
    assert_eq!(
        update.version, first.version,
        "shares alone keep the version"
    );
    assert_eq!(*update.endpoints, first.endpoints, "the same list again");
    assert_eq!(shares(&update), [("a", 500_000), ("b", 500_000)]);

    // A client without a zone gets no shares and counts nowhere.
    let mut none = watch(server.channel().await, "").await.unwrap();
    assert!(next_update(&mut none).await.zone_shares.is_empty());

    // Admin shows each subscriber's zone and the shares it was sent.
    let listed = AdminClient::new(server.channel().await)
        .list_subscribers(ListSubscribersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .subscribers;
    let zone_of = |zone: &str| listed.iter().find(|s| s.zone == zone).unwrap();
    let share = |zone: &str, share: u32| ZoneShare {
        zone: zone.into(),
        share,
    };
    assert_eq!(
        zone_of("a").zone_shares,
        [share("a", 500_000), share("b", 500_000)]
    );
    assert_eq!(zone_of("b").zone_shares, [share("b", 1_000_000)]);
    assert!(zone_of("").zone_shares.is_empty());

    // Zone a's only endpoint drains: a new version, and a's clients go to b.
    server.write_file(&ZONES.replacen(
        "      zone: a\n",
        "      zone: a\n      draining: true\n",
        1,
    ));
    let drained = next_update(&mut a).await;
    assert!(drained.version > first.version);
    assert!(
        drained.zone_shares.is_empty(),
        "one usable zone: no shares needed"
    );

    drop((a, b, none));
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_bad_zone_or_node_is_invalid_argument() {
    let server = TestServer::start(ZONES).await;
    for (zone, node, want) in [
        ("zone a", "", "bad zone \"zone a\""),
        ("a\n\u{1b}[31m", "", "bad zone \"a\\n\\u{1b}[31m\""),
        (
            &*"z".repeat(64),
            "",
            "zone is 64 bytes long; the limit is 63",
        ),
        ("a", "Node_1", "bad node \"Node_1\""),
        (
            "a",
            &*"n".repeat(254),
            "node is 254 bytes long; the limit is 253",
        ),
    ] {
        let request = WatchRequest {
            target: "greeter.default:grpc".into(),
            zone: zone.into(),
            node: node.into(),
            ..Default::default()
        };
        let status = DiscoveryClient::new(server.channel().await)
            .watch(request)
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{zone:?} {node:?}");
        assert!(status.message().contains(want), "{}", status.message());
    }
    let metrics = server.metrics().await;
    assert!(
        metrics.contains("rejected_requests_total{api=\"discovery\",reason=\"bad_zone\"} 2"),
        "{metrics}"
    );
    server.shutdown().await.unwrap();
}
