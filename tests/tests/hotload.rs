//! Models loaded and unloaded while serving
//! (services/generation/src/hotload.rs): a real generation process on the
//! real weights (the dtype of `MOLTBOT_DTYPE`, f32 under `make test`),
//! gRPC over a socket. A second copy of the model loads under another name
//! while the first streams, serves, and unloads again; the stream on the
//! first is not disturbed.
//!
//! Needs the prepared model (`make models`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failures are the assertions

use std::time::{Duration, Instant};

use moltbot_e2e::{grpc, process::ServiceProcess};
use moltbot_proto::generation::v1::{
    self as pb, generation_service_client::GenerationServiceClient,
};
use tonic::Code;

const ADMIN: &str = "hotload-admin";

fn request(model: &str, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        model: model.into(),
        messages: vec![pb::ChatMessage {
            role: pb::Role::User as i32,
            content: "Count from one to fifty in words, separated by commas.".into(),
            ..Default::default()
        }],
        sampling: Some(pb::SamplingParams {
            max_tokens,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn with_token<T>(token: Option<&str>, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(t) = token {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

/// Drains a Generate stream: (text, completion tokens).
async fn drain(mut stream: tonic::Streaming<pb::GenerateResponse>) -> (String, u32) {
    let mut text = String::new();
    while let Some(event) = stream.message().await.unwrap() {
        match event.event {
            Some(pb::generate_response::Event::Delta(d)) => text.push_str(&d.text),
            Some(pb::generate_response::Event::Summary(s)) => {
                return (text, s.usage.unwrap().completion_tokens);
            }
            _ => {}
        }
    }
    panic!("the stream ended without a summary: {text:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_model_loads_serves_and_unloads_while_another_streams() {
    let generation = ServiceProcess::start(
        "moltbot-generation",
        &[
            ("MOLTBOT_ADMIN_TOKEN", ADMIN.to_owned()),
            ("MOLTBOT_KV_CACHE_MB", "64".to_owned()),
            ("MOLTBOT_AUTH_URL", "http://127.0.0.1:9".to_owned()),
        ],
    );
    let channel = grpc::connect(&generation.grpc_url()).await;
    grpc::wait_serving(&channel, "", Duration::from_secs(300)).await;
    let mut client = GenerationServiceClient::new(channel);
    let served = client
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models;
    let first = served[0].name.clone();

    // The operator's RPCs take the admin token.
    let load = |token: Option<&str>, dir: &str, name: &str| {
        with_token(
            token,
            pb::LoadModelRequest {
                dir: dir.into(),
                name: name.into(),
                warmup_requests: 1,
            },
        )
    };
    let refused = client
        .load_model(load(None, &first, "v2"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    let refused = client
        .load_model(load(Some("wrong"), &first, "v2"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let missing = client
        .load_model(load(Some(ADMIN), "no-such-model", ""))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
    let taken = client
        .load_model(load(Some(ADMIN), &first, ""))
        .await
        .unwrap_err();
    assert_eq!(taken.code(), Code::AlreadyExists, "{taken:?}");

    // A long stream on the served model, while a second copy loads.
    let streaming = client
        .generate(request(&first, 96))
        .await
        .unwrap()
        .into_inner();
    let stream = tokio::spawn(drain(streaming));
    let began = Instant::now();
    let loaded = client
        .load_model(load(Some(ADMIN), &first, "v2"))
        .await
        .unwrap()
        .into_inner();
    eprintln!(
        "LoadModel: load {} ms, warm-up {} ms, estimated {} MiB, RSS {} MiB, {:.1} s in all",
        loaded.load_ms,
        loaded.warmup_ms,
        loaded.needed_bytes >> 20,
        loaded.rss_bytes >> 20,
        began.elapsed().as_secs_f64()
    );
    assert_eq!(loaded.model.as_ref().unwrap().name, "v2");
    assert!(loaded.needed_bytes > 0 && loaded.rss_bytes > 0);
    let names: Vec<String> = client
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models
        .into_iter()
        .map(|m| m.name)
        .collect();
    assert!(
        names.contains(&first) && names.contains(&"v2".to_owned()),
        "{names:?}"
    );
    // The copy answers as the original does (greedy, same weights).
    let (copy, _) = drain(
        client
            .generate(request("v2", 12))
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    let (original, _) = drain(
        client
            .generate(request(&first, 12))
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    assert_eq!(copy, original);

    // Unload while a stream on the copy runs: the call waits for it.
    let on_copy = client
        .generate(request("v2", 48))
        .await
        .unwrap()
        .into_inner();
    let copy_stream = tokio::spawn(drain(on_copy));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let unloaded = client
        .unload_model(with_token(
            Some(ADMIN),
            pb::UnloadModelRequest {
                name: "v2".into(),
                wait_ms: 120_000,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(unloaded.drained, "{unloaded:?}");
    // It ended with its summary (a cut stream fails `drain`), with the
    // answer the original gives to the same greedy request.
    let (during_unload, _) = copy_stream.await.unwrap();
    let (reference, _) = drain(
        client
            .generate(request(&first, 48))
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    assert_eq!(during_unload, reference);
    let gone = client
        .generate(request("v2", 4))
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");
    let again = client
        .unload_model(with_token(
            Some(ADMIN),
            pb::UnloadModelRequest {
                name: "v2".into(),
                wait_ms: 0,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::NotFound);

    // The first model's stream went on undisturbed through both.
    let (text, tokens) = stream.await.unwrap();
    assert!(tokens > 0 && !text.is_empty(), "{text}");
    generation.assert_no_panic();
}
