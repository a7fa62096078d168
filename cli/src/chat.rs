//! `moltbot chat`: a terminal chat client. Each line you type is one turn of
//! one session on the gateway, answered as a token stream (SSE); `/new`
//! starts a new session, `/quit` (or end of input) leaves.

use std::io::{BufRead, Write};

use futures::StreamExt;

use crate::CliError;

/// Flags of `moltbot chat`.
#[derive(Debug, clap::Args)]
pub struct ChatArgs {
    /// The gateway.
    #[arg(
        long,
        env = "MOLTBOT_GATEWAY_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    gateway_url: String,
    /// Model or route alias.
    #[arg(long, default_value = "default")]
    model: String,
    /// Session to continue [default: a new one].
    #[arg(long)]
    session: Option<String>,
    /// Client API key (`Authorization: Bearer`), when the gateway needs one.
    #[arg(long, env = "MOLTBOT_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
}

fn new_session() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("chat-{:x}-{}", nanos, std::process::id())
}

/// One streamed turn; prints text as it arrives and the `moltbot` summary.
async fn turn(
    http: &reqwest::Client,
    args: &ChatArgs,
    session: &str,
    text: &str,
) -> Result<(), CliError> {
    let mut request = http
        .post(format!(
            "{}/v1/chat/completions",
            args.gateway_url.trim_end_matches('/')
        ))
        .json(&serde_json::json!({
            "model": args.model,
            "session_id": session,
            "stream": true,
            "messages": [{"role": "user", "content": text}],
        }));
    if let Some(key) = &args.api_key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.map_err(|e| {
        CliError::Setup(format!(
            "cannot reach the gateway at {}: {e}; is it up (`make up`)?",
            args.gateway_url
        ))
    })?;
    if !response.status().is_success() {
        let status = response.status();
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        let message = body["error"]["message"].as_str().unwrap_or("no details");
        eprintln!("error {status}: {message}");
        return Ok(());
    }
    let mut body = response.bytes_stream();
    let mut buffer = String::new();
    let mut stdout = std::io::stdout();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| CliError::Setup(format!("stream broke: {e}")))?;
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            for data in event.lines().filter_map(|l| l.strip_prefix("data: ")) {
                if data == "[DONE]" {
                    continue;
                }
                let Ok(v) = serde_json::from_str::<serde_json::Value>(data) else {
                    continue;
                };
                if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
                    print!("{t}");
                    let _ = stdout.flush();
                }
                if let Some(message) = v["error"]["message"].as_str() {
                    eprintln!("\nerror: {message}");
                }
                if v["moltbot"].is_object() {
                    let m = &v["moltbot"];
                    let intent = m["intent"]["domain"].as_str().map_or(String::new(), |d| {
                        format!(
                            " · intent {d}/{}",
                            m["intent"]["name"].as_str().unwrap_or("")
                        )
                    });
                    let sources = m["sources"].as_array().map_or(0, Vec::len);
                    let degraded = m["degraded"].as_array().filter(|d| !d.is_empty()).map_or(
                        String::new(),
                        |d| {
                            format!(
                                " · degraded {}",
                                d.iter()
                                    .filter_map(|x| x.as_str())
                                    .collect::<Vec<_>>()
                                    .join(",")
                            )
                        },
                    );
                    println!(
                        "\n  [{} tokens{intent} · {sources} sources{degraded}]",
                        v["usage"]["completion_tokens"]
                    );
                }
            }
        }
    }
    Ok(())
}

/// Runs the loop until `/quit` or end of input.
pub async fn run(args: ChatArgs) -> Result<(), CliError> {
    let http = reqwest::Client::new();
    let mut session = args.session.clone().unwrap_or_else(new_session);
    eprintln!("session {session} · /new starts another, /quit leaves");
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            return Ok(());
        }
        match line.trim() {
            "" => continue,
            "/quit" | "/exit" => return Ok(()),
            "/new" => {
                session = new_session();
                eprintln!("session {session}");
            }
            text => turn(&http, &args, &session, text).await?,
        }
    }
}
