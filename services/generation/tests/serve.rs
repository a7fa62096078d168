//! The generation service through real gRPC on a socket with the real
//! Qwen2.5-Coder-0.5B-Instruct weights (f32, CPU): real answers, streaming
//! that concatenates to the direct greedy answer, batching that does not
//! change results, cancellation that frees the slot, and the error codes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

mod common;

use std::time::{Duration, Instant};

use common::{collect, request, user};
use moltbot_generation::{engine::EngineConfig, model::Decoder, text::ChatTokenizer};
use moltbot_proto::generation::v1 as pb;
use tonic::Code;

const ENGINE: EngineConfig = EngineConfig {
    max_batch_size: 8,
    max_batch_tokens: 16_384,
    queue_capacity: 64,
    ..EngineConfig::DEFAULT
};

fn server() -> &'static common::Server {
    common::server(ENGINE)
}

#[tokio::test(flavor = "multi_thread")]
async fn answers_the_capital_of_france() {
    let mut c = server().client().await;
    let (deltas, summary) = collect(
        &mut c,
        request(vec![user("What is the capital of France?")], 32),
    )
    .await
    .unwrap();
    let text = deltas.concat();
    assert!(text.contains("Paris"), "{text:?}");
    assert_eq!(summary.finish_reason, pb::FinishReason::Stop as i32);
    let usage = summary.usage.unwrap();
    // 36 = transformers' apply_chat_template with Qwen's default system prompt.
    assert_eq!(usage.prompt_tokens, 36);
    assert!(usage.completion_tokens >= 2);
    assert!(usage.time_to_first_token_ms <= usage.total_time_ms);
    assert_eq!(summary.backend, "local");
}

#[tokio::test(flavor = "multi_thread")]
async fn streamed_deltas_concatenate_to_the_direct_greedy_answer() {
    let mut c = server().client().await;
    let prompt = "List three prime numbers and explain briefly why each is prime.";
    let (deltas, summary) = collect(&mut c, request(vec![user(prompt)], 40))
        .await
        .unwrap();
    assert!(deltas.len() > 5, "only {} deltas", deltas.len());
    assert!(deltas.iter().all(|d| !d.is_empty()));

    // The same prompt, greedy, straight on the decoder with no scheduler.
    let model = common::model_dir();
    let direct = tokio::task::spawn_blocking(move || {
        let tok = ChatTokenizer::load(&model, vec![151645, 151643]).unwrap();
        let decoder = Decoder::load(&model, tch::Device::Cpu, tch::Kind::Float).unwrap();
        let ids = tok
            .encode_chat(&[moltbot_generation::text::ChatMessage {
                role: "user".into(),
                content: prompt.into(),
                ..Default::default()
            }])
            .unwrap();
        let out = common::greedy(&decoder, &ids, 40, tok.eos_ids());
        tok.decode(&out).unwrap()
    })
    .await
    .unwrap();
    assert_eq!(deltas.concat(), direct);
    assert_eq!(summary.usage.unwrap().completion_tokens, 40);
    assert_eq!(summary.finish_reason, pb::FinishReason::Length as i32);
}

#[tokio::test(flavor = "multi_thread")]
async fn eight_concurrent_streams_equal_their_solo_outputs() {
    let mut c = server().client().await;
    let prompts: Vec<String> = [
        "Name a colour.",
        "What is 2 + 2?",
        "Say hello in French.",
        "Write a haiku about the sea.",
        "What does CPU stand for?",
        "Give me a Python one-liner that reverses a string.",
        "Who wrote Hamlet?",
        "Describe a cat in one sentence.",
    ]
    .map(String::from)
    .to_vec();
    let mut solo = Vec::new();
    for p in &prompts {
        solo.push(
            collect(&mut c, request(vec![user(p)], 16))
                .await
                .unwrap()
                .0
                .concat(),
        );
    }
    let tasks: Vec<_> = prompts
        .iter()
        .map(|p| {
            let mut c = c.clone();
            let r = request(vec![user(p)], 16);
            tokio::spawn(async move { collect(&mut c, r).await.unwrap().0.concat() })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(
            t.await.unwrap(),
            solo[i],
            "prompt {i} changed under batching"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn dropping_a_stream_frees_its_slot() {
    let mut c = server().client().await;
    let mut stream = c
        .generate(request(
            vec![user("Write a very long essay about the ocean.")],
            400,
        ))
        .await
        .unwrap()
        .into_inner();
    // Wait for three deltas: the sequence is in the running batch.
    for _ in 0..3 {
        stream.message().await.unwrap().unwrap();
    }
    let active = |c: &mut pb::generation_service_client::GenerationServiceClient<_>| {
        let mut c = c.clone();
        async move {
            c.list_models(pb::ListModelsRequest {})
                .await
                .unwrap()
                .into_inner()
                .models[0]
                .active_sequences
        }
    };
    assert!(active(&mut c).await >= 1);
    drop(stream);
    let dropped = Instant::now();
    // Other tests may run sequences too; wait until ours is gone: the count
    // must reach 0 once they finish, and ours no longer holds it up.
    loop {
        if active(&mut c).await == 0 {
            break;
        }
        assert!(
            dropped.elapsed() < Duration::from_secs(60),
            "slot not freed after the stream was dropped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_the_right_codes() {
    let mut c = server().client().await;
    let mut r = request(vec![user("hi")], 8);
    r.model = "no-such-model".into();
    let e = collect(&mut c, r).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    let e = collect(&mut c, request(vec![user("hi")], 40_000))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("40000") && e.message().contains("32768"),
        "{}",
        e.message()
    );

    let mut r = request(vec![user("hi")], 8);
    r.sampling.as_mut().unwrap().top_p = Some(1.5);
    let e = collect(&mut c, r).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("top_p"));

    let e = collect(&mut c, request(vec![], 8)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    let mut r = request(vec![user("hi")], 8);
    r.messages[0].role = 0;
    let e = collect(&mut c, r).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread")]
async fn list_models_and_count_tokens() {
    let mut c = server().client().await;
    let models = c
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models;
    assert_eq!(models.len(), 1);
    let m = &models[0];
    assert_eq!(m.name, moltbot_generation::DEFAULT_MODEL);
    assert_eq!(
        (m.context_length, m.device.as_str(), m.dtype.as_str()),
        (32768, "cpu", "f32")
    );
    assert_eq!(m.max_batch_size, 8);

    let counted = c
        .count_tokens(pb::CountTokensRequest {
            model: "default".into(),
            messages: vec![user("What is the capital of France?")],
            texts: vec!["hello world".into(), String::new()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(counted.prompt_tokens, 36);
    assert_eq!(counted.text_tokens, [2, 0]);
    assert_eq!(counted.context_length, 32768);
}

#[tokio::test(flavor = "multi_thread")]
async fn stop_sequences_and_seeded_sampling() {
    let mut c = server().client().await;
    let mut r = request(vec![user("Count from 1 to 10, separated by commas.")], 40);
    r.sampling.as_mut().unwrap().stop = vec!["5".into()];
    let (deltas, summary) = collect(&mut c, r).await.unwrap();
    let text = deltas.concat();
    assert!(!text.contains('5') && text.contains('4'), "{text:?}");
    assert_eq!(summary.finish_reason, pb::FinishReason::Stop as i32);

    let sampled = |seed| {
        let mut r = request(vec![user("Invent a name for a pet dragon.")], 12);
        let s = r.sampling.as_mut().unwrap();
        s.temperature = Some(1.0);
        s.top_p = Some(0.95);
        s.top_k = Some(50);
        s.seed = Some(seed);
        r
    };
    let a = collect(&mut c, sampled(11)).await.unwrap().0.concat();
    let b = collect(&mut c, sampled(11)).await.unwrap().0.concat();
    assert_eq!(a, b, "same seed, different samples");
}
