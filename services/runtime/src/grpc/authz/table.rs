//! The mesh's one authorisation table: which principal may call which RPC.
//! docs/security.md prints the same table; `table_is_documented` (below)
//! fails when the two disagree.
//!
//! Default deny: a path with no rule is refused. Every RPC of every
//! `proto/moltbot/*/v1/*.proto` service has a rule (`every_rpc_has_a_rule`
//! checks against the compiled descriptor set).

use super::identity::Principal::{self, *};

/// Who a rule admits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allow {
    /// Any caller, certificate or not (health: kubelet probes, balancers).
    Anyone,
    /// Callers whose certificate names one of these principals.
    Callers(&'static [Principal]),
    /// The operator: its certificate, or `authorization: Bearer
    /// <MOLTBOT_ADMIN_TOKEN>` where the service has an admin token.
    Operator,
}

/// One line of the table.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    /// `/package.Service/Method`, or `/package.Service/*` for every method.
    pub rpc: &'static str,
    /// Who may call it.
    pub allow: Allow,
}

const fn rule(rpc: &'static str, allow: Allow) -> Rule {
    Rule { rpc, allow }
}

const GATEWAY: Allow = Allow::Callers(&[Gateway]);
const GATEWAY_OR_OPERATOR: Allow = Allow::Callers(&[Gateway, Operator]);

/// The table. Reads of the edge's data go to the gateway (and the operator
/// for inspection); provider credentials go to generation alone; every
/// write of shared configuration or knowledge, and reflection, to the
/// operator.
pub const TABLE: &[Rule] = &[
    rule("/grpc.health.v1.Health/*", Allow::Anyone),
    rule("/grpc.reflection.v1.ServerReflection/*", Allow::Operator),
    rule(
        "/grpc.reflection.v1alpha.ServerReflection/*",
        Allow::Operator,
    ),
    // context: the gateway asserts the tenant; nobody else writes turns,
    // and the operator may inspect and delete.
    rule("/moltbot.context.v1.ContextService/AppendTurns", GATEWAY),
    rule(
        "/moltbot.context.v1.ContextService/GetHistory",
        GATEWAY_OR_OPERATOR,
    ),
    rule(
        "/moltbot.context.v1.ContextService/GetSession",
        GATEWAY_OR_OPERATOR,
    ),
    rule(
        "/moltbot.context.v1.ContextService/ResetSession",
        GATEWAY_OR_OPERATOR,
    ),
    rule(
        "/moltbot.context.v1.ContextService/DeleteSession",
        GATEWAY_OR_OPERATOR,
    ),
    rule(
        "/moltbot.context.v1.ContextService/ListSessions",
        GATEWAY_OR_OPERATOR,
    ),
    // understanding
    rule(
        "/moltbot.understanding.v1.UnderstandingService/Classify",
        GATEWAY_OR_OPERATOR,
    ),
    rule(
        "/moltbot.understanding.v1.UnderstandingService/ClassifyBatch",
        GATEWAY_OR_OPERATOR,
    ),
    rule(
        "/moltbot.understanding.v1.UnderstandingService/Embed",
        GATEWAY_OR_OPERATOR,
    ),
    rule(
        "/moltbot.understanding.v1.UnderstandingService/ReloadModel",
        Allow::Operator,
    ),
    // retrieval: the gateway searches; knowledge is written by the operator.
    rule(
        "/moltbot.retrieval.v1.RetrievalService/Search",
        GATEWAY_OR_OPERATOR,
    ),
    rule(
        "/moltbot.retrieval.v1.RetrievalService/ListCollections",
        GATEWAY_OR_OPERATOR,
    ),
    rule(
        "/moltbot.retrieval.v1.RetrievalService/Versions",
        GATEWAY_OR_OPERATOR,
    ),
    rule(
        "/moltbot.retrieval.v1.RetrievalService/Stats",
        GATEWAY_OR_OPERATOR,
    ),
    rule(
        "/moltbot.retrieval.v1.RetrievalService/CreateCollection",
        Allow::Operator,
    ),
    rule(
        "/moltbot.retrieval.v1.RetrievalService/DeleteCollection",
        Allow::Operator,
    ),
    rule(
        "/moltbot.retrieval.v1.RetrievalService/Upsert",
        Allow::Operator,
    ),
    rule(
        "/moltbot.retrieval.v1.RetrievalService/Delete",
        Allow::Operator,
    ),
    // generation: spends the organisation's provider keys.
    rule(
        "/moltbot.generation.v1.GenerationService/Generate",
        GATEWAY_OR_OPERATOR,
    ),
    rule(
        "/moltbot.generation.v1.GenerationService/ListModels",
        GATEWAY_OR_OPERATOR,
    ),
    rule(
        "/moltbot.generation.v1.GenerationService/CountTokens",
        GATEWAY_OR_OPERATOR,
    ),
    // auth-rotation: keys in clear go to generation alone.
    rule(
        "/moltbot.auth.v1.AuthRotationService/AcquireCredential",
        Allow::Callers(&[Generation]),
    ),
    rule(
        "/moltbot.auth.v1.AuthRotationService/ReportOutcome",
        Allow::Callers(&[Generation]),
    ),
    rule(
        "/moltbot.auth.v1.AuthRotationService/ListProviders",
        Allow::Callers(&[Generation, Operator]),
    ),
    rule(
        "/moltbot.auth.v1.AuthRotationService/WatchProviderHealth",
        Allow::Callers(&[Generation, Operator]),
    ),
    rule(
        "/moltbot.auth.v1.AuthRotationService/UpsertProvider",
        Allow::Operator,
    ),
    rule(
        "/moltbot.generation.v1.GenerationService/LoadModel",
        Allow::Operator,
    ),
    rule(
        "/moltbot.generation.v1.GenerationService/UnloadModel",
        Allow::Operator,
    ),
    rule(
        "/moltbot.auth.v1.AuthRotationService/AddCredential",
        Allow::Operator,
    ),
    rule(
        "/moltbot.auth.v1.AuthRotationService/RotateCredential",
        Allow::Operator,
    ),
    rule(
        "/moltbot.auth.v1.AuthRotationService/RevokeCredential",
        Allow::Operator,
    ),
];

/// The rule for a request path: an exact method rule, else its service's
/// `/*` rule; `None` when the table has neither (refused).
pub fn rule_for(path: &str) -> Option<&'static Rule> {
    TABLE.iter().find(|r| r.rpc == path).or_else(|| {
        let (service, _) = path.rsplit_once('/')?;
        TABLE
            .iter()
            .find(|r| r.rpc.strip_suffix("/*") == Some(service) && !service.is_empty())
    })
}

impl Allow {
    /// The rule in words, e.g. `gateway, operator`.
    pub fn describe(self) -> String {
        match self {
            Allow::Anyone => "anyone".into(),
            Allow::Callers(ps) => ps.iter().map(|p| p.name()).collect::<Vec<_>>().join(", "),
            Allow::Operator => "operator (certificate or admin token)".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn every_rpc_has_a_rule_and_every_rule_an_rpc() {
        let set =
            prost_types::FileDescriptorSet::decode(moltbot_proto::FILE_DESCRIPTOR_SET).unwrap();
        let mut served = Vec::new();
        for file in &set.file {
            for service in &file.service {
                for method in &service.method {
                    served.push(format!(
                        "/{}.{}/{}",
                        file.package(),
                        service.name(),
                        method.name()
                    ));
                }
            }
        }
        assert!(served.len() >= 28, "{served:?}");
        for path in &served {
            assert!(rule_for(path).is_some(), "no rule for {path}");
        }
        for r in TABLE.iter().filter(|r| r.rpc.starts_with("/moltbot.")) {
            assert!(
                served.iter().any(|p| p == r.rpc),
                "rule for no RPC: {}",
                r.rpc
            );
        }
    }

    #[test]
    fn wildcards_cover_a_service_only() {
        assert_eq!(
            rule_for("/grpc.health.v1.Health/Watch").map(|r| r.allow),
            Some(Allow::Anyone)
        );
        assert!(rule_for("/grpc.health.v1.HealthX/Check").is_none());
        assert!(rule_for("/moltbot.context.v1.ContextService/Nope").is_none());
        assert!(rule_for("/*").is_none());
        assert!(rule_for("").is_none());
    }

    #[test]
    fn table_is_documented() {
        let doc = include_str!("../../../../../docs/security.md");
        for r in TABLE {
            let line = format!("| `{}` | {} |", r.rpc, r.allow.describe());
            assert!(
                doc.contains(&line),
                "docs/security.md lacks the line\n{line}"
            );
        }
    }
}
