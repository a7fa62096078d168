//! Authorisation of every gRPC call by the caller's identity: the peer's
//! mutual-TLS certificate ([`identity`]) checked against one table
//! ([`table`]), in a tower layer ([`AuthzLayer`]) so no handler decides on
//! its own who may call it.
//!
//! Refusals are gRPC `UNAUTHENTICATED` (no certificate, no admin token) or
//! `PERMISSION_DENIED` (a certificate the rule does not name, a wrong
//! token, a path with no rule), and the message names the rule. The check is
//! pure ([`decide`]) and unit-tested here; the layer only gathers the inputs.
//!
//! Enforcement needs mutual TLS (`MOLTBOT_TLS_CERT`, `MOLTBOT_TLS_KEY` and
//! `MOLTBOT_TLS_CA`): without a client CA no caller can prove who it is, the
//! layer lets calls through, and the server refuses to start on a
//! non-loopback address unless `MOLTBOT_INSECURE_PLAINTEXT=true` says the
//! network itself is trusted ([`crate::config::ServerArgs::validate`]).

pub mod identity;
mod layer;
pub mod table;

pub use identity::{Identity, Principal};
pub use layer::{Authz, AuthzLayer, Caller};
pub use table::{Allow, Rule, rule_for};

/// The `authorization: Bearer` token a call carried, as checked against
/// the service's admin token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bearer {
    /// No bearer token.
    Absent,
    /// The service's admin token (compared in constant time).
    Admin,
    /// Some other token (or the service has no admin token).
    Wrong,
}

/// Why a call is refused; the message names the rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// gRPC UNAUTHENTICATED: the rule needs an identity the call did not
    /// prove.
    Unauthenticated(String),
    /// gRPC PERMISSION_DENIED: the proven identity is not allowed.
    PermissionDenied(String),
}

impl From<Refusal> for tonic::Status {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::Unauthenticated(m) => tonic::Status::unauthenticated(m),
            Refusal::PermissionDenied(m) => tonic::Status::permission_denied(m),
        }
    }
}

/// Decides a call to `path` by `identity` carrying `bearer`.
///
/// Errors with [`Refusal`]: UNAUTHENTICATED when the rule names callers and
/// the call is anonymous (or, for an operator rule, carries neither the
/// operator certificate nor a token); PERMISSION_DENIED for another
/// identity, a wrong token, or a path with no rule (default deny).
pub fn decide(path: &str, identity: &Identity, bearer: Bearer) -> Result<(), Refusal> {
    let Some(rule) = rule_for(path) else {
        return Err(Refusal::PermissionDenied(format!(
            "no authorisation rule for `{path}` (docs/security.md): refused"
        )));
    };
    let refused = |why: String| {
        format!(
            "`{}` may be called by {} (docs/security.md); {why}",
            rule.rpc,
            rule.allow.describe()
        )
    };
    match (rule.allow, identity) {
        (Allow::Anyone, _) => Ok(()),
        (Allow::Callers(ps), Identity::Principal(p)) if ps.contains(p) => Ok(()),
        (Allow::Operator, Identity::Principal(Principal::Operator)) => Ok(()),
        (Allow::Operator, _) if bearer == Bearer::Admin => Ok(()),
        (Allow::Operator, _) if bearer == Bearer::Wrong => Err(Refusal::PermissionDenied(refused(
            "the bearer token is not this service's admin token".into(),
        ))),
        (_, Identity::Anonymous) => Err(Refusal::Unauthenticated(refused(
            "the call presented no client certificate of the mesh CA".into(),
        ))),
        (_, other) => Err(Refusal::PermissionDenied(refused(format!(
            "the caller is {other}"
        )))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACQUIRE: &str = "/moltbot.auth.v1.AuthRotationService/AcquireCredential";
    const UPSERT: &str = "/moltbot.retrieval.v1.RetrievalService/Upsert";
    const HEALTH: &str = "/grpc.health.v1.Health/Check";

    fn p(p: Principal) -> Identity {
        Identity::Principal(p)
    }

    #[test]
    fn credentials_go_to_generation_alone() {
        assert_eq!(
            decide(ACQUIRE, &p(Principal::Generation), Bearer::Absent),
            Ok(())
        );
        let anon = decide(ACQUIRE, &Identity::Anonymous, Bearer::Absent).unwrap_err();
        assert!(
            matches!(&anon, Refusal::Unauthenticated(m) if m.contains("AcquireCredential") && m.contains("generation")),
            "{anon:?}"
        );
        for other in Principal::ALL
            .into_iter()
            .filter(|x| *x != Principal::Generation)
        {
            let r = decide(ACQUIRE, &p(other), Bearer::Absent).unwrap_err();
            assert!(
                matches!(&r, Refusal::PermissionDenied(m) if m.contains(&other.spiffe_id())),
                "{r:?}"
            );
        }
        // An admin token is no way around a component rule.
        assert!(decide(ACQUIRE, &Identity::Anonymous, Bearer::Admin).is_err());
    }

    #[test]
    fn operator_rules_take_the_certificate_or_the_token() {
        assert_eq!(
            decide(UPSERT, &p(Principal::Operator), Bearer::Absent),
            Ok(())
        );
        assert_eq!(decide(UPSERT, &Identity::Anonymous, Bearer::Admin), Ok(()));
        assert!(matches!(
            decide(UPSERT, &Identity::Anonymous, Bearer::Absent),
            Err(Refusal::Unauthenticated(_))
        ));
        assert!(matches!(
            decide(UPSERT, &Identity::Anonymous, Bearer::Wrong),
            Err(Refusal::PermissionDenied(_))
        ));
        assert!(matches!(
            decide(UPSERT, &p(Principal::Gateway), Bearer::Absent),
            Err(Refusal::PermissionDenied(_))
        ));
    }

    #[test]
    fn health_is_open_and_unknown_paths_are_denied() {
        assert_eq!(decide(HEALTH, &Identity::Anonymous, Bearer::Absent), Ok(()));
        assert_eq!(
            decide(
                HEALTH,
                &Identity::Unknown("spiffe://x/y".into()),
                Bearer::Absent
            ),
            Ok(())
        );
        assert!(matches!(
            decide("/moltbot.x.v1.X/Y", &p(Principal::Operator), Bearer::Admin),
            Err(Refusal::PermissionDenied(_))
        ));
        assert!(matches!(
            decide(
                "/moltbot.context.v1.ContextService/GetHistory",
                &Identity::Unknown("spiffe://moltbot/intruder".into()),
                Bearer::Absent
            ),
            Err(Refusal::PermissionDenied(m)) if m.contains("spiffe://moltbot/intruder")
        ));
    }
}
