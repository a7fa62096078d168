//! Admission control of the generation scheduler through real gRPC, with a
//! server whose batch holds one sequence and whose queue holds one request:
//! a third request is refused with RESOURCE_EXHAUSTED rather than queued
//! without end, the queued one is counted by ListModels, and it runs as
//! soon as the running sequence's caller goes away.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

mod common;

use std::time::Duration;

use common::{request, user};
use moltbot_generation::engine::EngineConfig;
use moltbot_proto::generation::v1 as pb;
use tonic::Code;

const ENGINE: EngineConfig = EngineConfig {
    max_batch_size: 1,
    max_batch_tokens: 16_384,
    queue_capacity: 1,
    ..EngineConfig::DEFAULT
};

#[tokio::test(flavor = "multi_thread")]
async fn a_full_queue_answers_resource_exhausted_and_drains() {
    let mut c = common::server(ENGINE).client().await;
    let long = || request(vec![user("Write a very long essay about mountains.")], 400);

    // A runs (its first delta proves it left the queue).
    let mut a = c.generate(long()).await.unwrap().into_inner();
    a.message().await.unwrap().unwrap();
    // B waits: the batch holds one sequence.
    let mut b = c.generate(long()).await.unwrap().into_inner();
    let load = c
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models[0]
        .clone();
    assert_eq!((load.active_sequences, load.queued_requests), (1, 1));
    // C finds the queue full.
    let refused = c.generate(long()).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("queue is full"),
        "{}",
        refused.message()
    );

    // Dropping A frees the slot: B starts streaming.
    drop(a);
    let first = tokio::time::timeout(Duration::from_secs(60), b.message())
        .await
        .expect("B never started after A was dropped")
        .unwrap()
        .unwrap();
    assert!(matches!(
        first.event,
        Some(pb::generate_response::Event::Delta(_))
    ));
}
