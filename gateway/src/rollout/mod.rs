//! Live rollouts (issue 34): a route's new sessions split between its
//! configured (stable) models and a canary model, in steps (10, 30, 50,
//! 80, 100 % by default), with an automatic rollback on a breach and a
//! promotion after a clean last step.
//!
//! - [`plan`]: the state and the pure rules ([`decide`]), tested without a
//!   clock or a store;
//! - [`window`]: one variant's turns and times to first token over a step;
//! - [`store`]: Redis (shared by replicas, survives restarts) or memory;
//! - this file, [`Rollouts`]: what the turn engine asks (the route as a
//!   rollout leaves it, the variant of a session, the chain per variant),
//!   what it reports (each turn's outcome), the controller that judges
//!   every active rollout each tick on every replica (the store's
//!   compare-and-set makes one replica's transition win), and the
//!   operator's actions (`gateway/src/http/rollouts.rs`).
//!
//! How a turn meets a rollout: the route is taken as [`effective`] makes it
//! (a promoted canary heads the candidates; the response cache is off
//! while a rollout is active, since an answer depends on the variant); a
//! session is put on a variant once, at its first turn under the rollout
//! (a session that already has history stays stable), by a hash of its id
//! against the step's share, and stays there; a canary turn tries the
//! canary first and falls back to the stable chain within the turn, so a
//! client never sees a canary failure, while the failure counts against
//! the canary.

mod metrics;
pub mod plan;
pub mod store;
pub mod window;

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rand::Rng;
use serde::Serialize;
use sha2::{Digest, Sha256};

pub use metrics::register_all;
pub use plan::{Decision, Phase, Plan, Rollout, Variant, decide};
pub use store::{MemoryStore, RedisStore, Store};
pub use window::Window;

use crate::{
    ApiError,
    reload::Live,
    routing::{Route, config::Candidate, model_chain},
    turn::Attempt,
};

/// Where a turn's session went in a rollout: `moltbot.rollout`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Assigned {
    /// The rollout's id.
    pub id: String,
    /// `stable` or `canary`.
    pub variant: Variant,
    /// The canary model.
    #[serde(skip)]
    pub canary: String,
    /// The route.
    #[serde(skip)]
    pub route: String,
    /// The step the session was served at (its turn counts there).
    #[serde(skip)]
    pub step: usize,
}

/// One variant's numbers at a rollout's current step (status).
#[derive(Debug, Clone, Serialize)]
pub struct WindowSummary {
    /// Turns answered plus failed.
    pub turns: u64,
    /// Failed turns.
    pub failed: u64,
    /// `failed / turns`.
    pub error_rate: f64,
    /// p95 time to first token, ms (upper bound of its bucket).
    pub p95_ttft_ms: Option<f64>,
}

impl From<&Window> for WindowSummary {
    fn from(w: &Window) -> Self {
        Self {
            turns: w.turns(),
            failed: w.fail,
            error_rate: w.error_rate(),
            p95_ttft_ms: w.p95_ms(),
        }
    }
}

/// A rollout with its current step's numbers (`GET /admin/rollouts`).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The stored rollout.
    #[serde(flatten)]
    pub rollout: Rollout,
    /// Canary share of new sessions now, percent.
    pub share: u8,
    /// The canary at the current step.
    pub canary: WindowSummary,
    /// The stable side at the current step.
    pub stable: WindowSummary,
}

/// The operator's actions on a running or paused rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Hold the share.
    Pause,
    /// Go on.
    Resume,
    /// Make the canary the route's head now.
    Promote,
    /// Send every new session to stable.
    Abort,
}

impl Action {
    /// `pause`, `resume`, `promote`, `abort`; `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pause" => Some(Self::Pause),
            "resume" => Some(Self::Resume),
            "promote" => Some(Self::Promote),
            "abort" => Some(Self::Abort),
            _ => None,
        }
    }
}

/// Unix milliseconds: rollout times are wall-clock, shared by replicas.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// `route` as `rollout` leaves it: a head model (a promoted canary, or
/// one promoted by an earlier rollout) becomes the only candidate, the
/// configured candidates (by file order) and fallbacks following it as
/// fallbacks; an active rollout is attached (`route.rollout`) and turns
/// the route's response cache off.
pub fn effective(mut route: Route, rollout: Option<&Arc<Rollout>>) -> Route {
    let Some(r) = rollout else {
        return route;
    };
    let mut heads: Vec<String> = Vec::new();
    if r.phase == Phase::Promoted {
        heads.push(r.to.clone());
    }
    heads.extend(r.base.clone());
    if !heads.is_empty() {
        let mut fallbacks: Vec<String> = heads[1..].to_vec();
        fallbacks.extend(
            route
                .candidates
                .iter()
                .filter(|c| c.weight > 0)
                .map(|c| c.model.clone()),
        );
        fallbacks.extend(route.fallbacks.iter().cloned());
        let mut seen = vec![heads[0].clone()];
        fallbacks.retain(|m| {
            let new = !seen.contains(m);
            seen.push(m.clone());
            new
        });
        route.candidates = vec![Candidate {
            model: heads[0].clone(),
            weight: 1,
        }];
        route.fallbacks = fallbacks;
    }
    if r.phase.is_active() {
        route.cache.enabled = false;
        route.rollout = Some(r.clone());
    }
    route
}

/// The models a turn of `variant` tries on `route` (as [`effective`] left
/// it): the stable side is the route's own chain without the canary; the
/// canary side tries the canary first, then the stable chain.
pub fn chain(route: &Route, canary: &str, variant: Variant, rng: &mut impl Rng) -> Vec<String> {
    let mut stable = model_chain(route, rng);
    stable.retain(|m| m != canary);
    match variant {
        Variant::Stable => stable,
        Variant::Canary => std::iter::once(canary.to_owned()).chain(stable).collect(),
    }
}

/// The variant a new session draws at `share` percent: a uniform hash of
/// rollout and session, the same on every replica.
pub fn draw(rollout_id: &str, session: &str, share: u8) -> Variant {
    let digest = Sha256::new()
        .chain_update(rollout_id.as_bytes())
        .chain_update([0])
        .chain_update(session.as_bytes())
        .finalize();
    let mut head = [0u8; 8];
    head.copy_from_slice(&digest[..8]);
    if u64::from_be_bytes(head) % 10_000 < u64::from(share) * 100 {
        Variant::Canary
    } else {
        Variant::Stable
    }
}

/// A session's key in the store: a SHA-256 of tenant and session id (no
/// session id is written out as is).
fn session_key(tenant: &str, session_id: &str) -> String {
    let digest = Sha256::new()
        .chain_update(tenant.as_bytes())
        .chain_update([0])
        .chain_update(session_id.as_bytes())
        .finalize();
    crate::cache::key::hex(&digest)
}

/// The gateway's rollouts: the store, and the snapshot turns read (the
/// controller refreshes it each tick and after every operator action).
#[derive(Debug)]
pub struct Rollouts {
    store: Arc<dyn Store>,
    snapshot: Live<HashMap<String, Arc<Rollout>>>,
}

impl Rollouts {
    /// Rollouts in `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            snapshot: Live::new(HashMap::new()),
        }
    }

    /// Rollouts of this process alone.
    pub fn in_memory() -> Self {
        Self::new(Arc::new(MemoryStore::default()))
    }

    /// Every route's rollout as last read, by route.
    pub fn snapshot(&self) -> Arc<HashMap<String, Arc<Rollout>>> {
        self.snapshot.get()
    }

    /// The variant of the session `session_id` of `tenant` under `rollout`:
    /// the one it started on, else (a first turn) a [`draw`] at the current
    /// share — or stable for a session that has history from before the
    /// rollout. Stable when the store fails.
    pub async fn assign(
        &self,
        rollout: &Rollout,
        tenant: &str,
        session_id: &str,
        has_history: bool,
    ) -> Assigned {
        let session = session_key(tenant, session_id);
        let proposed = if has_history {
            Variant::Stable
        } else {
            draw(&rollout.id, &session, rollout.share())
        };
        let variant = match self.store.sticky(&rollout.id, &session, proposed).await {
            Ok(v) => v,
            Err(e) => {
                tracing::debug!(error = %e, "rollout assignment unavailable; stable");
                Variant::Stable
            }
        };
        Assigned {
            id: rollout.id.clone(),
            variant,
            canary: rollout.to.clone(),
            route: rollout.route.clone(),
            step: rollout.step,
        }
    }

    /// Counts a turn of `assigned` once its generation started or failed:
    /// `answered_by` the model whose first event arrived (none: every
    /// attempt failed), `attempts` the turn's attempts. A canary turn
    /// answered by the canary is a success with its time to first token;
    /// one where the canary was tried and failed is a failure (whatever
    /// answered instead); a stable turn is a success when answered and a
    /// failure when `failed_all`. Anything else (a request no model could
    /// serve) is not counted. The store write runs in the background.
    pub fn observe(
        &self,
        assigned: &Assigned,
        attempts: &[Attempt],
        answered_by: Option<&str>,
        ttft: Duration,
        failed_all: bool,
    ) {
        let outcome = match assigned.variant {
            Variant::Canary if answered_by == Some(assigned.canary.as_str()) => Some(true),
            Variant::Canary if attempts.iter().any(|a| a.model == assigned.canary) => Some(false),
            Variant::Canary => None,
            Variant::Stable if answered_by.is_some() => Some(true),
            Variant::Stable if failed_all => Some(false),
            Variant::Stable => None,
        };
        let Some(ok) = outcome else {
            return;
        };
        metrics::TURNS
            .with_label_values(&[
                assigned.route.as_str(),
                assigned.variant.as_str(),
                if ok { "ok" } else { "error" },
            ])
            .inc();
        let store = self.store.clone();
        let assigned = assigned.clone();
        tokio::spawn(async move {
            let ttft = ok.then_some(ttft);
            if let Err(e) = store
                .record(&assigned.id, assigned.step, assigned.variant, ok, ttft)
                .await
            {
                metrics::LOST.inc();
                tracing::debug!(error = %e, "a rollout turn was not counted");
            }
        });
    }

    /// One controller tick: reads every rollout, judges the active ones
    /// ([`decide`] on their current step's windows), writes any transition
    /// (compare-and-set: a replica that loses the race keeps what the
    /// winner wrote) and refreshes the snapshot. Errors with the store's
    /// failure; the snapshot then stays as it was.
    pub async fn refresh(&self) -> Result<(), String> {
        let now = now_ms();
        let mut map = HashMap::new();
        for r in self.store.load_all().await? {
            let r = if r.phase.is_active() {
                self.judge(r, now).await
            } else {
                r
            };
            metrics::publish(&r);
            map.insert(r.route.clone(), Arc::new(r));
        }
        self.snapshot.set(map);
        Ok(())
    }

    async fn judge(&self, r: Rollout, now: u64) -> Rollout {
        let (canary, stable) = match self.windows(&r).await {
            Ok(w) => w,
            Err(_) => return r,
        };
        let decision = decide(&r, &canary, &stable, now);
        if decision == Decision::Stay {
            return r;
        }
        let next = r.apply(&decision, now);
        match self.store.replace(r.revision, &next).await {
            Ok(true) => {
                announce(&next);
                next
            }
            // Another replica wrote first: the next tick reads its state.
            Ok(false) | Err(_) => r,
        }
    }

    async fn windows(&self, r: &Rollout) -> Result<(Window, Window), String> {
        let (canary, stable) = tokio::join!(
            self.store.window(&r.id, r.step, Variant::Canary),
            self.store.window(&r.id, r.step, Variant::Stable)
        );
        Ok((canary?, stable?))
    }

    /// The controller: [`Rollouts::refresh`] every `every`, forever. A
    /// store failure is logged once until the store answers again.
    pub async fn run(self: Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tick.tick().await;
            match self.refresh().await {
                Ok(()) if failing => {
                    tracing::info!("rollout store reachable again");
                    failing = false;
                }
                Ok(()) => {}
                Err(e) if !failing => {
                    tracing::warn!(error = %e, "rollout store unreachable; rollouts keep their last known state");
                    failing = true;
                }
                Err(_) => {}
            }
        }
    }

    /// Every rollout with its current step's numbers, by route name.
    ///
    /// Errors: 503 when the store fails.
    pub async fn reports(&self) -> Result<Vec<Report>, ApiError> {
        let mut all = self.store.load_all().await.map_err(store_error)?;
        all.sort_by(|a, b| a.route.cmp(&b.route));
        let mut out = Vec::with_capacity(all.len());
        for r in all {
            out.push(self.report_of(r).await?);
        }
        Ok(out)
    }

    /// `route`'s rollout with its current step's numbers.
    ///
    /// Errors: 404 when the route has none, 503 when the store fails.
    pub async fn report(&self, route: &str) -> Result<Report, ApiError> {
        let r = self
            .current(route)
            .await?
            .ok_or_else(|| no_rollout(route))?;
        self.report_of(r).await
    }

    async fn report_of(&self, r: Rollout) -> Result<Report, ApiError> {
        let (canary, stable) = self.windows(&r).await.map_err(store_error)?;
        Ok(Report {
            share: r.share(),
            canary: (&canary).into(),
            stable: (&stable).into(),
            rollout: r,
        })
    }

    /// Starts `plan` (validated by the caller against the routes and the
    /// served models).
    ///
    /// Errors: 400 for an invalid plan, 409 when the route has an active
    /// rollout (or another writer came first), 503 when the store fails.
    pub async fn start(&self, plan: &Plan) -> Result<Rollout, ApiError> {
        plan.validate().map_err(ApiError::InvalidRequest)?;
        let previous = self.current(&plan.route).await?;
        if let Some(p) = &previous
            && p.phase.is_active()
        {
            return Err(ApiError::Conflict(format!(
                "route `{}` has a {} rollout to `{}` ({}); abort or promote it first",
                p.route,
                p.phase.as_str(),
                p.to,
                p.id
            )));
        }
        let id = crate::turn::new_id("ro-");
        let next = Rollout::start(plan, id, now_ms(), previous.as_ref());
        self.write(previous.as_ref().map_or(0, |p| p.revision), next)
            .await
    }

    /// Applies `action` to `route`'s rollout.
    ///
    /// Errors: 404 when the route has no rollout, 409 when the action does
    /// not fit its phase, 503 when the store fails.
    pub async fn act(&self, route: &str, action: Action) -> Result<Rollout, ApiError> {
        let current = self
            .current(route)
            .await?
            .ok_or_else(|| no_rollout(route))?;
        let now = now_ms();
        let next = match action {
            Action::Pause => current.pause(now),
            Action::Resume => current.resume(now),
            Action::Promote => current.finish(true, now),
            Action::Abort => current.finish(false, now),
        }
        .map_err(ApiError::Conflict)?;
        self.write(current.revision, next).await
    }

    async fn current(&self, route: &str) -> Result<Option<Rollout>, ApiError> {
        Ok(self
            .store
            .load_all()
            .await
            .map_err(store_error)?
            .into_iter()
            .find(|r| r.route == route))
    }

    async fn write(&self, expected: u64, next: Rollout) -> Result<Rollout, ApiError> {
        if !self
            .store
            .replace(expected, &next)
            .await
            .map_err(store_error)?
        {
            return Err(ApiError::Conflict(
                "the rollout changed while this request was applied; read its status and retry"
                    .to_owned(),
            ));
        }
        announce(&next);
        // This replica serves the change at once; the others at their
        // next tick.
        if let Err(e) = self.refresh().await {
            tracing::debug!(error = %e, "rollout snapshot not refreshed");
        }
        Ok(next)
    }
}

fn no_rollout(route: &str) -> ApiError {
    ApiError::NotFound(format!("route `{route}` has no rollout"))
}

fn store_error(e: String) -> ApiError {
    ApiError::Upstream {
        service: "rollout store",
        status: tonic::Status::unavailable(e),
    }
}

/// Logs and counts the last transition of `r`.
fn announce(r: &Rollout) {
    if let Some(t) = r.history.last() {
        metrics::TRANSITIONS
            .with_label_values(&[r.route.as_str(), t.event.as_str()])
            .inc();
        tracing::info!(
            route = %r.route,
            rollout = %r.id,
            to = %r.to,
            event = %t.event,
            share = t.share,
            reason = %t.reason,
            "rollout {}", t.event
        );
    }
}

#[cfg(test)]
mod tests;
