//! The negative-authorisation suite: every RPC of every service, called
//! over real mutual TLS by every identity there is — no certificate, each
//! component's certificate, the operator's — against the five service
//! binaries started with certificates from the dev CA that `moltbot up`
//! uses (`services/runtime/src/grpc/pki.rs`).
//!
//! The expectations below are written from the rules, not read
//! from the code's table, so a wrong line in the table fails here:
//! gateway → context, understanding, retrieval reads, generation;
//! generation → auth-rotation acquire/report (and provider listing);
//! retrieval writes and every admin RPC → the operator (certificate or
//! admin token); health → anyone; reflection → the operator.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failures are the assertions

use std::time::Duration;

use moltbot_e2e::{grpc, process::ServiceProcess};
use moltbot_runtime::grpc::{
    authz::Principal,
    pki::{DevCa, Files},
};
use prost::Message;
use tonic::{
    Code,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    transport::Channel,
};

const ADMIN_TOKEN: &str = "authz-test-admin-token";

/// A codec that sends an empty message (every field at its default) and
/// discards whatever comes back: enough to see the status of any RPC.
#[derive(Debug, Clone, Default)]
struct Empty;

impl Encoder for Empty {
    type Item = ();
    type Error = tonic::Status;
    fn encode(&mut self, _: (), _: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        Ok(())
    }
}

impl Decoder for Empty {
    type Item = ();
    type Error = tonic::Status;
    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<()>, tonic::Status> {
        use prost::bytes::Buf;
        let n = buf.remaining();
        buf.advance(n);
        Ok(Some(()))
    }
}

impl Codec for Empty {
    type Encode = ();
    type Decode = ();
    type Encoder = Empty;
    type Decoder = Empty;
    fn encoder(&mut self) -> Empty {
        Empty
    }
    fn decoder(&mut self) -> Empty {
        Empty
    }
}

/// The status of calling `path` with an empty request: OK when the call
/// got through to the handler, which then answered (any code but the two
/// refusals means "admitted").
async fn call(channel: &Channel, path: &str, bearer: Option<&str>) -> tonic::Status {
    let mut client = tonic::client::Grpc::new(channel.clone());
    client.ready().await.unwrap();
    let mut request = tonic::Request::new(());
    request.set_timeout(Duration::from_secs(20));
    if let Some(token) = bearer {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    match client
        .server_streaming(request, path.parse().unwrap(), Empty)
        .await
    {
        Ok(_) => tonic::Status::ok(""),
        Err(status) => status,
    }
}

/// Who may call `path` by the rules (the operator aside for admin
/// RPCs, which take its certificate or the admin token).
fn allowed(path: &str, caller: Principal) -> bool {
    use Principal::*;
    let method = path.rsplit('/').next().unwrap();
    if path.starts_with("/grpc.health.v1.Health/") {
        return true;
    }
    if path.starts_with("/grpc.reflection.") {
        return caller == Operator;
    }
    let service = path.trim_start_matches('/').split('/').next().unwrap();
    match service {
        "moltbot.context.v1.ContextService" => match method {
            "AppendTurns" => caller == Gateway,
            _ => matches!(caller, Gateway | Operator),
        },
        "moltbot.understanding.v1.UnderstandingService" => match method {
            "ReloadModel" => caller == Operator,
            _ => matches!(caller, Gateway | Operator),
        },
        "moltbot.retrieval.v1.RetrievalService" => match method {
            "Search" | "ListCollections" | "Stats" | "Versions" => {
                matches!(caller, Gateway | Operator)
            }
            _ => caller == Operator,
        },
        "moltbot.generation.v1.GenerationService" => match method {
            "LoadModel" | "UnloadModel" => caller == Operator,
            _ => matches!(caller, Gateway | Operator),
        },
        "moltbot.auth.v1.AuthRotationService" => match method {
            "AcquireCredential" | "ReportOutcome" => caller == Generation,
            "ListProviders" | "WatchProviderHealth" => matches!(caller, Generation | Operator),
            _ => caller == Operator,
        },
        other => panic!("unexpected service {other}"),
    }
}

/// Every RPC path of the mesh's protos, by service.
fn rpcs() -> Vec<(String, String)> {
    let set = prost_types::FileDescriptorSet::decode(moltbot_proto::FILE_DESCRIPTOR_SET).unwrap();
    let mut out = Vec::new();
    for file in &set.file {
        for service in &file.service {
            let full = format!("{}.{}", file.package(), service.name());
            for method in &service.method {
                out.push((full.clone(), format!("/{full}/{}", method.name())));
            }
        }
    }
    out
}

async fn channel(url: &str, pki: &std::path::Path, identity: Option<Principal>) -> Channel {
    grpc::pki_endpoint(url, pki, identity.map(Principal::name))
        .connect()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_rpc_refuses_every_caller_the_table_does_not_name() {
    let dir = std::env::temp_dir().join(format!("moltbot-authz-{}", std::process::id()));
    let pki = dir.join("pki");
    DevCa::generate().unwrap().write(&pki).unwrap();
    let env = |principal: &str| {
        let files = Files::of(&pki, principal);
        vec![
            ("MOLTBOT_TLS_CERT", files.cert.display().to_string()),
            ("MOLTBOT_TLS_KEY", files.key.display().to_string()),
            ("MOLTBOT_TLS_CA", files.ca.display().to_string()),
            ("MOLTBOT_HEALTH_ADDR", "127.0.0.1:0".to_owned()),
            ("MOLTBOT_ADMIN_TOKEN", ADMIN_TOKEN.to_owned()),
        ]
    };
    let services = [
        (
            "moltbot.context.v1.ContextService",
            "moltbot-context",
            "context",
        ),
        (
            "moltbot.auth.v1.AuthRotationService",
            "moltbot-auth-rotation",
            "auth-rotation",
        ),
        (
            "moltbot.retrieval.v1.RetrievalService",
            "moltbot-retrieval",
            "retrieval",
        ),
        (
            "moltbot.understanding.v1.UnderstandingService",
            "moltbot-understanding",
            "understanding",
        ),
        (
            "moltbot.generation.v1.GenerationService",
            "moltbot-generation",
            "generation",
        ),
    ];
    let mut processes = Vec::new();
    for (_, binary, principal) in services {
        let mut e = env(principal);
        if principal == "generation" {
            // Nothing to reach: its own calls are not under test here.
            e.push(("MOLTBOT_AUTH_URL", "https://127.0.0.1:9".to_owned()));
        }
        processes.push(ServiceProcess::start(binary, &e));
    }
    for p in &processes {
        let health = grpc::connect(&format!("http://{}", p.addrs.health_addr.unwrap())).await;
        grpc::wait_serving(&health, "", Duration::from_secs(180)).await;
    }

    let all = rpcs();
    assert!(all.len() >= 28, "{all:?}");
    let mut checked = 0;
    let mut failures = Vec::new();
    for ((service, _, _), process) in services.iter().zip(&processes) {
        let url = format!(
            "https://127.0.0.1:{}",
            process.addrs.grpc_addr.unwrap().port()
        );
        let mut paths: Vec<String> = all
            .iter()
            .filter(|(s, _)| s == service)
            .map(|(_, p)| p.clone())
            .collect();
        paths.push("/grpc.health.v1.Health/Check".into());
        paths.push("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo".into());
        let anonymous = channel(&url, &pki, None).await;
        for path in &paths {
            // No certificate: refused as UNAUTHENTICATED, health aside.
            let status = call(&anonymous, path, None).await;
            let open = path.starts_with("/grpc.health.v1.Health/");
            let want_refused = !open;
            let got_refused = status.code() == Code::Unauthenticated;
            if want_refused != got_refused {
                failures.push(format!("anonymous {path}: {status:?}"));
            }
            if want_refused && !status.message().contains("docs/security.md") {
                failures.push(format!(
                    "anonymous {path}: the refusal names no rule: {status:?}"
                ));
            }
            checked += 1;
        }
        for principal in Principal::ALL {
            let with_cert = channel(&url, &pki, Some(principal)).await;
            for path in &paths {
                let status = call(&with_cert, path, None).await;
                // The layer's refusals name docs/security.md; a handler's
                // own answer (INVALID_ARGUMENT for the empty request, …)
                // means the call got through.
                let admitted = !(matches!(
                    status.code(),
                    Code::Unauthenticated | Code::PermissionDenied
                ) && status.message().contains("docs/security.md"));
                if admitted != allowed(path, principal) {
                    failures.push(format!("{} {path}: {status:?}", principal.name()));
                }
                if !admitted && !status.message().contains(&principal.spiffe_id()) {
                    failures.push(format!(
                        "{} {path}: the refusal does not name the caller: {status:?}",
                        principal.name()
                    ));
                }
                checked += 1;
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} wrong answers:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(checked >= 8 * 28, "{checked}");

    // The admin token stands in for the operator certificate on operator
    // rules only; a wrong token is PERMISSION_DENIED.
    let retrieval = &processes[2];
    let url = format!(
        "https://127.0.0.1:{}",
        retrieval.addrs.grpc_addr.unwrap().port()
    );
    let anonymous = channel(&url, &pki, None).await;
    let create = "/moltbot.retrieval.v1.RetrievalService/CreateCollection";
    let with_token = call(&anonymous, create, Some(ADMIN_TOKEN)).await;
    assert!(
        !matches!(
            with_token.code(),
            Code::Unauthenticated | Code::PermissionDenied
        ),
        "{with_token:?}"
    );
    assert_eq!(
        call(&anonymous, create, Some("not-the-token")).await.code(),
        Code::PermissionDenied
    );
    let auth = &processes[1];
    let url = format!("https://127.0.0.1:{}", auth.addrs.grpc_addr.unwrap().port());
    let anonymous = channel(&url, &pki, None).await;
    let acquire = call(
        &anonymous,
        "/moltbot.auth.v1.AuthRotationService/AcquireCredential",
        Some(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(acquire.code(), Code::Unauthenticated, "{acquire:?}");

    // A certificate from another CA does not complete the handshake.
    let rogue_dir = dir.join("rogue");
    DevCa::generate().unwrap().write(&rogue_dir).unwrap();
    // Trusting the mesh CA, presenting a generation certificate of another.
    let rogue_ca = std::fs::read_to_string(rogue_dir.join("ca.pem")).unwrap();
    std::fs::copy(pki.join("ca.pem"), rogue_dir.join("ca.pem")).unwrap();
    let rogue = grpc::pki_endpoint(&url, &rogue_dir, Some("generation"))
        .connect()
        .await;
    assert_ne!(
        rogue_ca,
        std::fs::read_to_string(pki.join("ca.pem")).unwrap()
    );
    let rogue_refused = match rogue {
        Err(_) => true,
        Ok(c) => {
            let s = call(
                &c,
                "/moltbot.auth.v1.AuthRotationService/AcquireCredential",
                None,
            )
            .await;
            s.code() != Code::Ok && s.code() != Code::InvalidArgument && s.code() != Code::NotFound
        }
    };
    assert!(rogue_refused, "a certificate of another CA was accepted");

    for p in processes {
        p.stop();
    }
    let _ = std::fs::remove_dir_all(&dir);
}
