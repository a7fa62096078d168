//! Rollouts without a gateway: the share per step, sticky sessions, the
//! route a rollout leaves, and two replicas sharing one store.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{sync::Arc, time::Duration};

use rand::SeedableRng;

use super::*;
use crate::routing::GatewayConfig;

fn route() -> Route {
    let c: GatewayConfig = serde_yaml_ng::from_str(
        r#"
routes:
  - name: default
    match: { models: [default] }
    candidates: [{ model: old, weight: 1 }]
    fallbacks: [remote/backup]
"#,
    )
    .unwrap();
    c.routes.into_iter().next().unwrap()
}

fn plan(steps: Vec<u8>) -> Plan {
    Plan {
        route: "default".into(),
        to: "new".into(),
        steps,
        step_interval_s: 1.0,
        min_requests: 10,
        max_error_rate: 0.05,
        max_latency_ratio: 1.5,
    }
}

#[test]
fn the_share_of_new_sessions_follows_each_step() {
    for share in [10u8, 30, 50, 80, 100] {
        let canary = (0..1000)
            .filter(|i| draw("ro-abc", &format!("session-{i}"), share) == Variant::Canary)
            .count();
        let measured = canary as f64 / 10.0;
        assert!(
            (measured - f64::from(share)).abs() <= 5.0,
            "step {share} %: {measured} % of 1000 sessions"
        );
    }
}

#[tokio::test]
async fn a_session_stays_on_the_variant_it_started_on() {
    let rollouts = Rollouts::in_memory();
    let first = rollouts.start(&plan(vec![10, 100])).await.unwrap();
    // Sessions started at 10 %: most stable.
    let mut at_start = Vec::new();
    for i in 0..200 {
        let a = rollouts
            .assign(&first, "acme", &format!("s{i}"), false)
            .await;
        at_start.push(a.variant);
    }
    let stable_at_start = at_start.iter().filter(|v| **v == Variant::Stable).count();
    assert!(stable_at_start > 150, "{stable_at_start}");
    // At 100 % every new session is canary, but the earlier ones keep
    // their variant (their later turns, with history, included).
    let second = first.apply(&Decision::Advance, now_ms());
    assert_eq!(second.share(), 100);
    for (i, before) in at_start.iter().enumerate() {
        let a = rollouts
            .assign(&second, "acme", &format!("s{i}"), true)
            .await;
        assert_eq!(a.variant, *before, "session s{i}");
    }
    let new = rollouts.assign(&second, "acme", "fresh", false).await;
    assert_eq!(new.variant, Variant::Canary);
    // A session with history from before the rollout stays stable.
    let old = rollouts.assign(&second, "acme", "older", true).await;
    assert_eq!(old.variant, Variant::Stable);
    // The same session id in another tenant is another session.
    let other = rollouts.assign(&second, "other", "s0", false).await;
    assert_eq!(other.variant, Variant::Canary);
}

#[test]
fn a_rollout_shapes_the_route_and_the_chains() {
    let r = route();
    let running = Arc::new(Rollout::start(&plan(vec![50, 100]), "ro-1".into(), 0, None));
    let live = effective(r.clone(), Some(&running));
    assert!(!live.cache.enabled, "no cache while the variants differ");
    assert!(live.rollout.is_some());
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    assert_eq!(
        chain(&live, "new", Variant::Canary, &mut rng),
        ["new", "old", "remote/backup"]
    );
    assert_eq!(
        chain(&live, "new", Variant::Stable, &mut rng),
        ["old", "remote/backup"]
    );

    let promoted = Arc::new(running.finish(true, 1).unwrap());
    let after = effective(r.clone(), Some(&promoted));
    assert!(after.cache.enabled && after.rollout.is_none());
    assert_eq!(after.candidates.len(), 1);
    assert_eq!(after.candidates[0].model, "new");
    assert_eq!(after.fallbacks, ["old", "remote/backup"]);

    // A later rollout that is rolled back leaves the promoted model in
    // front.
    let next = Rollout::start(
        &Plan {
            to: "newer".into(),
            ..plan(vec![50, 100])
        },
        "ro-2".into(),
        2,
        Some(&promoted),
    );
    let rolled = Arc::new(next.apply(&Decision::RollBack("bad".into()), 3));
    let back = effective(r.clone(), Some(&rolled));
    assert_eq!(back.candidates[0].model, "new");
    assert_eq!(back.fallbacks, ["old", "remote/backup"]);
    // An aborted first rollout leaves the route as configured.
    let aborted = Arc::new(running.finish(false, 1).unwrap());
    let same = effective(r.clone(), Some(&aborted));
    assert_eq!(same.candidates[0].model, "old");
    assert!(same.cache.enabled);
}

#[tokio::test]
async fn two_replicas_share_one_rollout_and_one_rollback() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let a = Rollouts::new(store.clone());
    let b = Rollouts::new(store.clone());
    let started = a.start(&plan(vec![50, 100])).await.unwrap();
    assert!(a.snapshot().contains_key("default"));
    b.refresh().await.unwrap();
    assert_eq!(b.snapshot()["default"].id, started.id);
    // A second start on the same route is refused while it runs.
    assert!(matches!(
        b.start(&plan(vec![50, 100])).await,
        Err(ApiError::Conflict(_))
    ));

    // Nine canary failures across both replicas: not judged yet.
    let canary = Assigned {
        id: started.id.clone(),
        variant: Variant::Canary,
        canary: "new".into(),
        route: "default".into(),
        step: 0,
    };
    let failed = [Attempt {
        model: "new".into(),
        outcome: "unavailable".into(),
        latency_ms: 1,
        error: None,
    }];
    for i in 0..9 {
        let replica = if i % 2 == 0 { &a } else { &b };
        replica.observe(
            &canary,
            &failed,
            Some("old"),
            Duration::from_millis(30),
            false,
        );
    }
    // The store writes run in the background.
    tokio::time::sleep(Duration::from_millis(50)).await;
    a.refresh().await.unwrap();
    assert_eq!(a.snapshot()["default"].phase, Phase::Running);
    b.observe(
        &canary,
        &failed,
        Some("old"),
        Duration::from_millis(30),
        false,
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Both replicas judge; one write wins, both see it.
    let (ra, rb) = tokio::join!(a.refresh(), b.refresh());
    ra.unwrap();
    rb.unwrap();
    a.refresh().await.unwrap();
    b.refresh().await.unwrap();
    for replica in [&a, &b] {
        let r = &replica.snapshot()["default"];
        assert_eq!(r.phase, Phase::RolledBack);
        assert!(r.reason.as_deref().unwrap().contains("100.0 %"), "{r:?}");
        assert_eq!(
            r.history
                .iter()
                .filter(|t| t.event == "rolled_back")
                .count(),
            1
        );
    }
    let reports = a.reports().await.unwrap();
    assert_eq!(reports[0].canary.turns, 10);
    assert_eq!(reports[0].canary.failed, 10);
    assert_eq!(reports[0].share, 0);
    // Over: actions are refused, a new rollout may start.
    assert!(matches!(
        a.act("default", Action::Pause).await,
        Err(ApiError::Conflict(_))
    ));
    assert!(matches!(
        a.act("nope", Action::Pause).await,
        Err(ApiError::NotFound(_))
    ));
    let again = a.start(&plan(vec![50, 100])).await.unwrap();
    assert_ne!(again.id, started.id);
}

#[tokio::test]
async fn a_clean_rollout_is_promoted_on_its_schedule() {
    let rollouts = Rollouts::in_memory();
    let started = rollouts.start(&plan(vec![50, 100])).await.unwrap();
    let ok = |step| Assigned {
        id: started.id.clone(),
        variant: Variant::Canary,
        canary: "new".into(),
        route: "default".into(),
        step,
    };
    for step in 0..2 {
        for _ in 0..10 {
            rollouts.observe(
                &ok(step),
                &[],
                Some("new"),
                Duration::from_millis(20),
                false,
            );
        }
        tokio::time::sleep(Duration::from_millis(1_050)).await;
        rollouts.refresh().await.unwrap();
    }
    let r = &rollouts.snapshot()["default"];
    assert_eq!(r.phase, Phase::Promoted, "{r:?}");
    let events: Vec<&str> = r.history.iter().map(|t| t.event.as_str()).collect();
    assert_eq!(events, ["started", "advanced", "promoted"]);
}
