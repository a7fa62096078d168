//! The response cache's exact tier in the turn (stage 1b): what is stored,
//! what answers from it, and what never does.

use std::sync::atomic::Ordering;

use super::*;
use crate::cache::{CacheControl, Status};

/// A new session's greedy question.
fn greedy(text: &str) -> TurnRequest {
    let mut req = user(text);
    req.session_id = None;
    req.sampling.temperature = Some(0.0);
    req
}

fn status(ext: &Option<Extension>) -> Option<Status> {
    ext.as_ref().and_then(|e| e.cache).map(|c| c.status)
}

fn answers(n: usize, text: &str) -> FakeGeneration {
    FakeGeneration::new(&[(
        "local",
        Count::Words(4096),
        (0..n).map(|_| Gen::answer(text)).collect(),
    )])
}

#[tokio::test(start_paused = true)]
async fn a_greedy_question_asked_again_is_answered_from_the_cache() {
    let mesh = Mesh::new(answers(1, "MoltBot is a mesh."));
    let (first, ext1) = mesh.ask(greedy("What is MoltBot?")).await;
    let first = first.unwrap();
    assert_eq!(status(&ext1), Some(Status::Miss));
    let classified = mesh.understanding.0.count();
    let searched = mesh.retrieval.0.count();

    let (second, ext2) = mesh.ask(greedy("What is MoltBot?")).await;
    let second = second.unwrap();
    let ext2 = ext2.unwrap();
    assert_eq!(ext2.cache.map(|c| c.status), Some(Status::Hit));
    assert_eq!(second.text, first.text);
    assert_eq!(second.model, "local");
    // Replayed: no generation, classification or retrieval the second time.
    assert_eq!(mesh.generation.calls(), ["local"]);
    assert_eq!(mesh.understanding.0.count(), classified);
    assert_eq!(mesh.retrieval.0.count(), searched);
    // The original counts, the whole prompt reported as cached.
    assert_eq!(second.usage.prompt_tokens, first.usage.prompt_tokens);
    assert_eq!(
        second.usage.prompt_tokens_details.map(|d| d.cached_tokens),
        Some(first.usage.prompt_tokens)
    );
    // The intent and sources of the original answer come with the hit.
    assert_eq!(ext2.intent.map(|i| i.name).as_deref(), Some("balance"));
    assert_eq!(ext2.sources.len(), 1);
    // Both turns are in their sessions: the hit wrote user and answer.
    let writes = mesh.sessions.writes();
    assert_eq!(writes.len(), 2);
    assert_eq!(writes[1].len(), 2);
    assert_eq!(writes[1][1].content, "MoltBot is a mesh.");
}

#[tokio::test(start_paused = true)]
async fn another_tenant_never_gets_the_entry() {
    let mesh = Mesh::new(answers(2, "Yes."));
    mesh.ask(greedy("Is it cached?")).await.0.unwrap();
    let turn = mesh
        .engine
        .start(greedy("Is it cached?"), "globex", &Free)
        .await
        .unwrap();
    assert_eq!(
        turn.prepared().ext.cache.map(|c| c.status),
        Some(Status::Miss)
    );
    let (ended, _) = turn.run(&mut Buffered).await;
    into_result(ended).unwrap();
    assert_eq!(mesh.generation.calls(), ["local", "local"]);
}

#[tokio::test(start_paused = true)]
async fn sampled_or_logprob_requests_bypass_the_cache() {
    let mesh = Mesh::new(answers(4, "Maybe."));
    for _ in 0..2 {
        // No temperature: OpenAI's default of 1, above the route's 0.
        let mut req = greedy("Roll a die.");
        req.sampling.temperature = None;
        let (_, ext) = mesh.ask(req).await;
        assert_eq!(status(&ext), Some(Status::Bypass));
    }
    for _ in 0..2 {
        let mut req = greedy("Roll a die.");
        req.sampling.logprobs = true;
        let (_, ext) = mesh.ask(req).await;
        assert_eq!(status(&ext), Some(Status::Bypass));
    }
    assert_eq!(mesh.generation.calls().len(), 4);
}

#[tokio::test(start_paused = true)]
async fn a_collection_write_makes_rag_answers_unreachable() {
    let mesh = Mesh::new(answers(2, "From the docs."));
    mesh.ask(greedy("What do the docs say?")).await.0.unwrap();
    mesh.retrieval.1.fetch_add(1, Ordering::SeqCst);
    let (_, ext) = mesh.ask(greedy("What do the docs say?")).await;
    assert_eq!(status(&ext), Some(Status::Miss));
    assert_eq!(mesh.generation.calls().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_failed_or_cancelled_generation_is_never_stored() {
    let generation = FakeGeneration::new(&[(
        "local",
        Count::Words(4096),
        vec![
            Gen::BreakAfter {
                words: vec!["Half ".into()],
                broke: Broke {
                    status: tonic::Status::internal("provider stalled"),
                    transport: false,
                },
            },
            Gen::answer("Whole."),
            Gen::answer("Whole."),
        ],
    )]);
    let mesh = Mesh::new(generation);
    assert!(mesh.ask(greedy("Tell me.")).await.0.is_err());
    // The client leaves at the first delta: cancelled, not stored.
    let turn = mesh
        .engine
        .start(greedy("Tell me."), "acme", &Free)
        .await
        .unwrap();
    assert!(matches!(turn.run(&mut Leaves).await.0, Ended::Cancelled));
    let (answer, ext) = mesh.ask(greedy("Tell me.")).await;
    assert_eq!(answer.unwrap().text, "Whole.");
    assert_eq!(status(&ext), Some(Status::Miss));
    assert_eq!(mesh.generation.calls().len(), 3);
    let (_, ext) = mesh.ask(greedy("Tell me.")).await;
    assert_eq!(status(&ext), Some(Status::Hit));
}

#[tokio::test(start_paused = true)]
async fn cache_control_skips_the_read_the_write_or_old_entries() {
    let mesh = Mesh::new(answers(4, "Fresh."));
    let with = |cc: &str| {
        let mut req = greedy("Anything new?");
        req.cache_control = CacheControl::parse(cc).unwrap();
        req
    };
    // no-store: answered, not stored.
    let (_, ext) = mesh.ask(with("no-store")).await;
    assert_eq!(status(&ext), Some(Status::Miss));
    let (_, ext) = mesh.ask(with("")).await;
    assert_eq!(status(&ext), Some(Status::Miss), "no-store stored nothing");
    // no-cache: not read (the entry above exists).
    let (_, ext) = mesh.ask(with("no-cache")).await;
    assert_eq!(status(&ext), Some(Status::Bypass));
    // max-age=0 refuses an entry that aged (the cache's clock is the
    // wall clock, not tokio's paused one).
    std::thread::sleep(Duration::from_millis(5));
    let (_, ext) = mesh.ask(with("max-age=0")).await;
    assert_eq!(status(&ext), Some(Status::Miss));
    let (_, ext) = mesh.ask(with("max-age=600")).await;
    assert_eq!(status(&ext), Some(Status::Hit));
    assert_eq!(mesh.generation.calls().len(), 4);
}

#[tokio::test(start_paused = true)]
async fn a_route_without_cache_never_looks_up() {
    let routes = ROUTES.replace(
        "    fallbacks: [backup]\n",
        "    fallbacks: [backup]\n    cache: { enabled: false }\n",
    );
    let mesh = Mesh::with(
        FakeSessions::new(Vec::new()),
        FakeUnderstanding::in_scope(),
        FakeRetrieval::one_passage(),
        answers(2, "Again."),
        &routes,
    );
    for _ in 0..2 {
        let (_, ext) = mesh.ask(greedy("Same?")).await;
        assert_eq!(status(&ext), Some(Status::Bypass));
    }
    assert_eq!(mesh.generation.calls().len(), 2);
}
