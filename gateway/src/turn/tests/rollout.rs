//! A turn under a rollout, in process: the canary tried first for a canary
//! session and its failure hidden from the client, a stable session never
//! sent to it, and each outcome counted for the controller.

use super::*;
use crate::rollout::{Phase, Plan, Variant};

fn plan(steps: Vec<u8>) -> Plan {
    Plan {
        route: "default".into(),
        to: "canary".into(),
        steps,
        step_interval_s: 60.0,
        min_requests: 2,
        max_error_rate: 0.05,
        max_latency_ratio: 1.5,
    }
}

fn with_canary(canary: Gen) -> FakeGeneration {
    FakeGeneration::new(&[
        ("local", Count::Words(4096), vec![Gen::answer("Stable.")]),
        ("canary", Count::Remote, vec![canary]),
        ("backup", Count::Remote, vec![Gen::answer("Backup.")]),
    ])
}

#[tokio::test(start_paused = true)]
async fn a_failing_canary_falls_back_within_the_turn_and_is_rolled_back() {
    let mesh = Mesh::new(with_canary(Gen::Fail(unavailable())));
    let rollouts = mesh.engine.rollouts().clone();
    rollouts.start(&plan(vec![100])).await.unwrap();
    for i in 0..2 {
        let mut req = user("Hi");
        req.session_id = Some(format!("new-{i}"));
        let (answer, ext) = mesh.ask(req).await;
        // The client sees the stable model's answer.
        let answer = answer.unwrap();
        assert_eq!(answer.model, "local");
        let ext = ext.unwrap();
        let rollout = ext.rollout.unwrap();
        assert_eq!(rollout.variant, Variant::Canary);
        let tried: Vec<&str> = ext.attempts.iter().map(|a| a.model.as_str()).collect();
        assert_eq!(tried, ["canary", "canary", "local"]);
    }
    // The counts are written in the background; then the controller's
    // tick judges two failures of two.
    tokio::task::yield_now().await;
    rollouts.refresh().await.unwrap();
    let r = &rollouts.snapshot()["default"];
    assert_eq!(r.phase, Phase::RolledBack, "{r:?}");
    // From now on no session meets the canary.
    let mut req = user("Hi");
    req.session_id = Some("after".into());
    let (answer, ext) = mesh.ask(req).await;
    assert_eq!(answer.unwrap().model, "local");
    let ext = ext.unwrap();
    assert!(ext.rollout.is_none());
    assert!(ext.attempts.iter().all(|a| a.model != "canary"));
}

#[tokio::test(start_paused = true)]
async fn a_session_with_history_stays_on_the_stable_model() {
    let history = vec![ctx::Turn {
        role: ctx::Role::User as i32,
        content: "Earlier".into(),
        ..Default::default()
    }];
    let mesh = Mesh::with_sessions(
        FakeSessions::new(history),
        with_canary(Gen::answer("Canary.")),
    );
    mesh.engine
        .rollouts()
        .start(&plan(vec![100]))
        .await
        .unwrap();
    let (answer, ext) = mesh.ask(user("Hi")).await;
    assert_eq!(answer.unwrap().model, "local");
    assert_eq!(ext.unwrap().rollout.unwrap().variant, Variant::Stable);
    assert!(!mesh.generation.calls().contains(&"canary".to_owned()));
    // A new session goes to the healthy canary and gets its answer.
    let fresh = Mesh::new(with_canary(Gen::answer("Canary.")));
    fresh
        .engine
        .rollouts()
        .start(&plan(vec![100]))
        .await
        .unwrap();
    let (answer, _) = fresh.ask(user("Hi")).await;
    assert_eq!(answer.unwrap().model, "canary");
}

#[tokio::test(start_paused = true)]
async fn a_canary_refusing_the_request_leaves_the_turn_to_stable() {
    let mesh = Mesh::new(with_canary(Gen::Fail(tonic::Status::invalid_argument(
        "unsupported parameter",
    ))));
    mesh.engine
        .rollouts()
        .start(&plan(vec![100]))
        .await
        .unwrap();
    let (answer, ext) = mesh.ask(user("Hi")).await;
    assert_eq!(answer.unwrap().model, "local");
    let outcomes: Vec<(String, String)> = ext
        .unwrap()
        .attempts
        .into_iter()
        .map(|a| (a.model, a.outcome))
        .collect();
    assert_eq!(
        outcomes,
        [
            ("canary".into(), "invalid_argument".into()),
            ("local".into(), "ok".into())
        ]
    );
}
