//! One trace per request: a gateway request that calls services produces
//! spans in every process, exported over OTLP to an in-process collector, all
//! with one trace id, and each service's server span descends from the
//! gateway's HTTP span.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failures are the assertions

use std::time::Duration;

use moltbot_e2e::{
    collector::{CollectedSpan, Collector},
    grpc,
    process::ServiceProcess,
};

const SERVER: i32 = 2;
const CLIENT: i32 = 3;

/// The parent chain of `span`, nearest first. `all` can hold thousands of
/// spans (every h2 frame write is one): parents are looked up in a map.
fn ancestors<'a>(span: &'a CollectedSpan, all: &'a [CollectedSpan]) -> Vec<&'a CollectedSpan> {
    let by_id: std::collections::HashMap<&[u8], &CollectedSpan> =
        all.iter().map(|s| (s.span_id.as_slice(), s)).collect();
    ancestors_in(span, &by_id)
}

fn ancestors_in<'a>(
    span: &'a CollectedSpan,
    by_id: &std::collections::HashMap<&[u8], &'a CollectedSpan>,
) -> Vec<&'a CollectedSpan> {
    let mut chain = Vec::new();
    let mut current = span;
    while let Some(parent) = by_id.get(current.parent_span_id.as_slice()) {
        if chain.len() > 64 {
            break; // a cycle would mean corrupt ids; the asserts below report it
        }
        chain.push(*parent);
        current = parent;
    }
    chain
}

#[tokio::test(flavor = "multi_thread")]
async fn one_trace_spans_gateway_and_services() {
    let collector = Collector::start().await;
    let otel = |name: &str| {
        vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint()),
            ("OTEL_SERVICE_NAME", name.to_owned()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
        ]
    };
    let context = ServiceProcess::start("moltbot-context", &otel("moltbot-context"));
    let generation = ServiceProcess::start("moltbot-generation", &otel("moltbot-generation"));
    let mut gw_env = otel("moltbot-gateway");
    gw_env.push(("MOLTBOT_CONTEXT_URL", context.grpc_url()));
    gw_env.push(("MOLTBOT_GENERATION_URL", generation.grpc_url()));
    let gateway = ServiceProcess::start("moltbot-gateway", &gw_env);

    // Generation loads the real model before it serves (tens of seconds on
    // a debug build while other tests run): wait for it, then for the
    // gateway to see it.
    for process in [&context, &generation] {
        let channel = grpc::connect(&process.grpc_url()).await;
        grpc::wait_serving(&channel, "", Duration::from_secs(180)).await;
    }
    let client = reqwest::Client::new();
    let base = gateway.http_url();
    let mut ready = false;
    for _ in 0..300 {
        if client
            .get(format!("{base}/readyz"))
            .send()
            .await
            .unwrap()
            .status()
            == 200
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "gateway never ready");

    // The caller starts the trace; the gateway must join it.
    let trace_hex = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let response = client
        .get(format!("{base}/readyz"))
        .header("traceparent", format!("00-{trace_hex}-{caller_span}-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let trace_id: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&trace_hex[2 * i..2 * i + 2], 16).unwrap())
        .collect();

    // Every process exports on its own schedule: wait for all three.
    let has_both = |spans: &[CollectedSpan]| {
        ["moltbot-gateway", "moltbot-context", "moltbot-generation"]
            .iter()
            .all(|svc| {
                spans
                    .iter()
                    .any(|s| s.trace_id == trace_id && s.service_name == *svc && s.kind == SERVER)
            })
    };
    let spans = collector.wait_for(Duration::from_secs(15), has_both).await;

    let gateway_span = spans
        .iter()
        .find(|s| s.trace_id == trace_id && s.service_name == "moltbot-gateway" && s.kind == SERVER)
        .unwrap_or_else(|| panic!("no gateway HTTP span in trace: {spans:#?}"));
    assert_eq!(gateway_span.name, "GET /readyz");
    assert_eq!(
        hex(&gateway_span.parent_span_id),
        caller_span,
        "gateway span joins the caller's trace"
    );

    for service in ["moltbot-context", "moltbot-generation"] {
        let server = spans
            .iter()
            .find(|s| s.trace_id == trace_id && s.service_name == service && s.kind == SERVER)
            .unwrap_or_else(|| panic!("no {service} server span in trace: {spans:#?}"));
        assert_eq!(server.name, "grpc.health.v1.Health/Check");
        let chain = ancestors(server, &spans);
        assert!(
            chain.iter().any(|s| s.span_id == gateway_span.span_id),
            "{service}'s server span does not descend from the gateway span: {chain:#?}"
        );
        assert!(
            chain
                .iter()
                .any(|s| s.kind == CLIENT && s.service_name == "moltbot-gateway")
        );
    }
    // Everything that descends from the gateway span carries the same trace id.
    let by_id: std::collections::HashMap<&[u8], &CollectedSpan> =
        spans.iter().map(|s| (s.span_id.as_slice(), s)).collect();
    for s in spans.iter().filter(|s| {
        ancestors_in(s, &by_id)
            .iter()
            .any(|a| a.span_id == gateway_span.span_id)
    }) {
        assert_eq!(s.trace_id, trace_id, "{s:?}");
    }

    gateway.stop();
    context.stop();
    generation.stop();
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
