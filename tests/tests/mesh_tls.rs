//! The whole mesh with mutual TLS on every gRPC hop: each component has a
//! certificate from one mesh CA (SAN `spiffe://moltbot/<component>`), every
//! server requires a client certificate from that CA, and every client
//! (the gateway, generation → auth-rotation) dials `https://` with its own.
//! One chat turn goes through all of it with no enrichment skipped; the
//! kubelet's plaintext health probes still answer on the health listener;
//! a plaintext client and a TLS client without a certificate are refused;
//! a certificate replaced on disk is served to the next connection without
//! a restart.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failures are the assertions

use std::{sync::Arc, time::Duration};

use moltbot_e2e::{
    grpc,
    process::ServiceProcess,
    tls::{Leaf, TestCa},
};
use moltbot_proto::{
    context::v1::{GetHistoryRequest, context_service_client::ContextServiceClient},
    retrieval::v1::{
        CreateCollectionRequest, Document, UpsertRequest,
        retrieval_service_client::RetrievalServiceClient,
    },
};
use serde_json::{Value, json};
use tonic::transport::Channel;

struct Pki {
    dir: std::path::PathBuf,
    ca: TestCa,
}

impl Pki {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("moltbot-mesh-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = TestCa::new("MoltBot test mesh CA");
        ca.write_pem(&dir.join("ca.pem"));
        Self { dir, ca }
    }

    /// The TLS environment of `component`, its certificate written to disk.
    fn env(&self, component: &str) -> (Leaf, Vec<(&'static str, String)>) {
        let leaf = self.ca.component(component);
        let (cert, key) = leaf.write(&self.dir.join(component));
        let env = vec![
            ("MOLTBOT_TLS_CERT", cert.display().to_string()),
            ("MOLTBOT_TLS_KEY", key.display().to_string()),
            (
                "MOLTBOT_TLS_CA",
                self.dir.join("ca.pem").display().to_string(),
            ),
            ("MOLTBOT_HEALTH_ADDR", "127.0.0.1:0".to_owned()),
        ];
        (leaf, env)
    }
}

fn https(p: &ServiceProcess) -> String {
    format!("https://127.0.0.1:{}", p.addrs.grpc_addr.unwrap().port())
}

fn health_url(p: &ServiceProcess) -> String {
    format!("http://{}", p.addrs.health_addr.unwrap())
}

/// A tonic client (tonic's own rustls connector, independent of ours) with
/// the operator's certificate, or none.
async fn client(
    pki: &Pki,
    url: &str,
    identity: Option<&Leaf>,
) -> Result<Channel, tonic::transport::Error> {
    grpc::mtls_endpoint(
        url,
        &pki.ca.pem(),
        identity.map(|l| (l.cert_pem.as_str(), l.key_pem.as_str())),
    )
    .connect()
    .await
}

/// The certificate a fresh TLS connection to `port` is shown.
async fn presented(pki: &Pki, port: u16, identity: &Leaf) -> Vec<u8> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.der()).unwrap();
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![identity.der().to_vec().into()], identity.key())
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// True when the connection failed, or a call over it did.
async fn refused(connected: Result<Channel, tonic::transport::Error>) -> bool {
    match connected {
        Err(_) => true,
        Ok(channel) => ContextServiceClient::new(channel)
            .get_history(GetHistoryRequest {
                session_id: "mtls-1".into(),
                ..Default::default()
            })
            .await
            .is_err(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn one_turn_over_mutual_tls_on_every_hop() {
    let pki = Pki::new();
    let (context_leaf, context_env) = pki.env("context");
    let context = ServiceProcess::start("moltbot-context", &context_env);
    let understanding = ServiceProcess::start("moltbot-understanding", &pki.env("understanding").1);
    let retrieval = ServiceProcess::start("moltbot-retrieval", &pki.env("retrieval").1);
    let auth = ServiceProcess::start("moltbot-auth-rotation", &pki.env("auth-rotation").1);
    let mut gen_env = pki.env("generation").1;
    gen_env.push(("MOLTBOT_AUTH_URL", https(&auth)));
    let generation = ServiceProcess::start("moltbot-generation", &gen_env);
    let mut gw_env = pki.env("gateway").1;
    gw_env.retain(|(k, _)| *k != "MOLTBOT_HEALTH_ADDR");
    gw_env.extend([
        ("MOLTBOT_CONTEXT_URL", https(&context)),
        ("MOLTBOT_GENERATION_URL", https(&generation)),
        ("MOLTBOT_UNDERSTANDING_URL", https(&understanding)),
        ("MOLTBOT_RETRIEVAL_URL", https(&retrieval)),
        ("MOLTBOT_AUTH_URL", https(&auth)),
    ]);
    let gateway = ServiceProcess::start("moltbot-gateway", &gw_env);

    // The kubelet's probes: plaintext gRPC health on the health listener.
    for p in [&context, &understanding, &retrieval, &auth, &generation] {
        let channel = grpc::connect(&health_url(p)).await;
        grpc::wait_serving(&channel, "", Duration::from_secs(120)).await;
    }

    // The operator fills the knowledge base over mutual TLS.
    let operator = pki.ca.component("operator");
    let mut kb = RetrievalServiceClient::new(
        client(&pki, &https(&retrieval), Some(&operator))
            .await
            .unwrap(),
    );
    kb.create_collection(CreateCollectionRequest {
        name: "docs".into(),
        chunking: None,
    })
    .await
    .unwrap();
    kb.upsert(UpsertRequest {
        collection: "docs".into(),
        documents: vec![Document {
            id: "tls".into(),
            text: "MoltBot encrypts every hop between its services with mutual TLS.".into(),
            metadata: Default::default(),
        }],
    })
    .await
    .unwrap();

    let http = reqwest::Client::new();
    let response = http
        .post(format!("{}/v1/chat/completions", gateway.http_url()))
        .json(&json!({
            "model": "default",
            "session_id": "mtls-1",
            "messages": [{"role": "user", "content": "How does MoltBot protect traffic between services?"}],
            "max_tokens": 8,
        }))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["moltbot"]["degraded"], json!([]), "{body}");
    assert!(body["moltbot"]["intent"]["name"].is_string(), "{body}");
    assert_eq!(body["moltbot"]["sources"][0]["id"], "docs:tls#0", "{body}");
    // The turn was stored through the TLS hop to context.
    let mut ctx = ContextServiceClient::new(
        client(&pki, &https(&context), Some(&operator))
            .await
            .unwrap(),
    );
    let history = ctx
        .get_history(GetHistoryRequest {
            // Anonymous loopback callers of the gateway are tenant `local`.
            tenant: "local".into(),
            session_id: "mtls-1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(history.turns.len(), 2, "{history:?}");

    // Refused: plaintext to the TLS port, and TLS without a client
    // certificate.
    let plain = Channel::from_shared(format!("http://{}", context.addrs.grpc_addr.unwrap()))
        .unwrap()
        .connect()
        .await;
    assert!(
        refused(plain).await,
        "a plaintext client reached a TLS-only server"
    );
    let anonymous = client(&pki, &https(&context), None).await;
    assert!(
        refused(anonymous).await,
        "a client without a certificate was served"
    );

    // Rotation: replace context's certificate on disk; the next connection
    // is shown the new one, no restart.
    let port = context.addrs.grpc_addr.unwrap().port();
    assert_eq!(presented(&pki, port, &operator).await, context_leaf.der());
    let renewed = pki.ca.component("context");
    let tmp = pki.dir.join("context-new");
    let (cert, key) = renewed.write(&tmp);
    std::fs::rename(key, pki.dir.join("context/key.pem")).unwrap();
    std::fs::rename(cert, pki.dir.join("context/cert.pem")).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let shown = presented(&pki, port, &operator).await;
        if shown == renewed.der() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the renewed certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    for p in [gateway, generation, auth, retrieval, understanding, context] {
        p.stop();
    }
    let _ = std::fs::remove_dir_all(&pki.dir);
}
