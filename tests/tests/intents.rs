//! `moltbot intents train|eval|reload` as an operator runs them, on data
//! in the formats operators have: a CSV with a `domain` column, a Rasa NLU
//! YAML file with `domain/intent` labels and entity annotations, and a flat
//! JSONL file. Each is trained by the real CLI on the real MiniLM encoder,
//! served by a real understanding process through ReloadModel (over a
//! socket), and classified over gRPC; the labels served are the data's.
//! Bad rows fail with the file and line.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use moltbot_e2e::{grpc::connect, process::ServiceProcess};
use moltbot_proto::understanding::v1::{
    ClassifyRequest, understanding_service_client::UnderstandingServiceClient,
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs `moltbot ARGS` from the repository root, as a user would.
fn moltbot(args: &[&str]) -> Output {
    let out = Command::new(moltbot_e2e::process::binary("moltbot"))
        .args(args)
        .current_dir(root())
        .output()
        .unwrap();
    eprintln!(
        "$ moltbot {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Utterances of four intents in two domains: (domain, intent, texts).
fn examples() -> Vec<(&'static str, &'static str, Vec<String>)> {
    let lead = ["", "please ", "can you ", "i want to ", "help me "];
    let of = |cores: [&str; 3]| -> Vec<String> {
        lead.iter()
            .flat_map(|l| cores.iter().map(move |c| format!("{l}{c}")))
            .collect()
    };
    vec![
        (
            "banking",
            "check_balance",
            of([
                "check my account balance",
                "see how much money is in my account",
                "know my current balance",
            ]),
        ),
        (
            "banking",
            "transfer_money",
            of([
                "send money to my brother",
                "transfer funds to another account",
                "wire cash to a friend",
            ]),
        ),
        (
            "travel",
            "book_flight",
            of([
                "book a flight to paris",
                "buy plane tickets for next week",
                "reserve a seat on a flight",
            ]),
        ),
        (
            "travel",
            "cancel_hotel",
            of([
                "cancel my hotel reservation",
                "call off the hotel booking",
                "drop my room reservation",
            ]),
        ),
    ]
}

/// Unseen phrasings and what they are: (text, domain, intent).
const PROBES: [(&str, &str, &str); 4] = [
    (
        "how much do i have in my bank account",
        "banking",
        "check_balance",
    ),
    (
        "move 200 dollars to my savings",
        "banking",
        "transfer_money",
    ),
    ("get me a plane ticket to rome", "travel", "book_flight"),
    ("i no longer need my hotel room", "travel", "cancel_hotel"),
];

fn dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("moltbot-intents-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn metrics(head: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(head.join("metrics.json")).unwrap()).unwrap()
}

/// Trains `data` with `extra` flags into `<dir>/<name>-head`; returns the
/// head directory.
fn train(data: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let head = dir().join(format!("{name}-head"));
    let mut args = vec![
        "intents",
        "train",
        data.to_str().unwrap(),
        "--out",
        head.to_str().unwrap(),
        "--progress",
        "lines",
    ];
    args.extend_from_slice(extra);
    let out = moltbot(&args);
    assert!(out.status.success(), "training {name} failed");
    head
}

struct Served {
    process: ServiceProcess,
    client: UnderstandingServiceClient<tonic::transport::Channel>,
}

impl Served {
    /// `moltbot intents reload HEAD`; returns the model id it reports.
    fn reload(&self, head: &Path) -> String {
        let out = moltbot(&[
            "intents",
            "reload",
            head.to_str().unwrap(),
            "--url",
            &self.process.grpc_url(),
        ]);
        assert!(out.status.success());
        let line = String::from_utf8_lossy(&out.stdout).to_string();
        line.trim()
            .strip_prefix("serving ")
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .to_owned()
    }

    /// (domain, intent, out of scope) of `text`.
    async fn classify(&mut self, text: &str) -> (String, String, bool) {
        let c = self
            .client
            .classify(ClassifyRequest {
                text: text.into(),
                top_k: 2,
            })
            .await
            .unwrap()
            .into_inner()
            .classification
            .unwrap();
        (
            c.domain.unwrap().name,
            c.intent.unwrap().name,
            c.out_of_scope,
        )
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn three_formats_train_and_serve_through_reload() {
    let d = dir();
    // 1. CSV with a domain column (and a column the importer ignores).
    let mut csv = String::from("id,text,category,domain\n");
    for (domain, intent, texts) in examples() {
        for (i, t) in texts.iter().enumerate() {
            csv += &format!("{i},\"{t}\",{intent},{domain}\n");
        }
    }
    std::fs::write(d.join("bank-travel.csv"), &csv).unwrap();
    // 2. Rasa NLU YAML: domain/intent labels, entity annotations, a synonym.
    let mut rasa = String::from("version: \"3.1\"\nnlu:\n");
    for (domain, intent, texts) in examples() {
        rasa += &format!("- intent: {domain}/{intent}\n  examples: |\n");
        for t in texts {
            let t = t
                .replace("paris", "[paris](city)")
                .replace("brother", "[brother]{\"entity\": \"person\"}");
            rasa += &format!("    - {t}\n");
        }
    }
    rasa += "- synonym: savings\n  examples: |\n    - piggy bank\n";
    std::fs::write(d.join("assistant.yml"), &rasa).unwrap();
    // 3. Flat JSONL: no domains at all.
    let mut jsonl = String::new();
    for (_, intent, texts) in examples() {
        for t in texts {
            jsonl += &serde_json::json!({"text": t, "intent": intent}).to_string();
            jsonl.push('\n');
        }
    }
    std::fs::write(d.join("support.jsonl"), &jsonl).unwrap();

    // The CSV head is fine-tuned (the default) with outlier exposure (the
    // committed synthetic out-of-scope texts, the default); the others
    // train the head alone, without synthetic texts (`""`: none).
    let csv_head = train(
        &d.join("bank-travel.csv"),
        "csv",
        &["--fine-tune-epochs", "3"],
    );
    let quick = [
        "--fine-tune-epochs",
        "0",
        "--synthetic-oos",
        "",
        "--probes",
        "",
    ];
    let rasa_head = train(&d.join("assistant.yml"), "rasa", &quick);
    let jsonl_head = train(&d.join("support.jsonl"), "jsonl", &quick);

    let m = metrics(&csv_head);
    assert_eq!(
        (m["intents"].as_u64(), m["domains"].as_u64()),
        (Some(4), Some(2))
    );
    // 15 examples per intent, 10 % held out: 2 each.
    assert_eq!(m["val_source"]["kind"], "made");
    assert_eq!(m["train_texts"].as_u64(), Some(52));
    assert!(m["held_out"]["out_of_scope_recall"].is_f64(), "{m}");
    assert!(csv_head.join("encoder/model.safetensors").exists());
    let id = m["model_id"].as_str().unwrap();
    assert!(
        id.starts_with("bank-travel-") && id.len() == "bank-travel-".len() + 12,
        "{id}"
    );
    assert_eq!(metrics(&jsonl_head)["domains"].as_u64(), Some(1));

    // A service with no head yet; each head is brought in by reload.
    let empty = d.join("no-head");
    std::fs::create_dir_all(&empty).unwrap();
    let process = ServiceProcess::start(
        "moltbot-understanding",
        &[("MOLTBOT_INTENT_HEAD_DIR", empty.display().to_string())],
    );
    let client = UnderstandingServiceClient::new(connect(&process.grpc_url()).await);
    let mut served = Served { process, client };

    assert_eq!(served.reload(&csv_head), id);
    for (text, domain, intent) in PROBES {
        assert_eq!(
            served.classify(text).await,
            (domain.to_owned(), intent.to_owned(), false),
            "{text}"
        );
    }
    // Outlier exposure: a request outside every intent is flagged.
    let (_, _, oos) = served
        .classify("write a short poem about autumn leaves")
        .await;
    assert!(oos, "the CSV head did not flag a poem request");

    let rasa_id = served.reload(&rasa_head);
    assert!(rasa_id.starts_with("assistant-"), "{rasa_id}");
    for (text, domain, intent) in PROBES {
        let (d_, i_, _) = served.classify(text).await;
        assert_eq!(
            (d_, i_),
            (domain.to_owned(), format!("{domain}/{intent}")),
            "{text}"
        );
    }

    let jsonl_id = served.reload(&jsonl_head);
    assert!(jsonl_id.starts_with("support-"), "{jsonl_id}");
    for (text, _, intent) in PROBES {
        let (d_, i_, _) = served.classify(text).await;
        assert_eq!(
            (d_, i_),
            ("support".to_owned(), intent.to_owned()),
            "{text}"
        );
    }
    served.process.assert_no_panic();

    // eval: the CSV head on the unseen phrasings plus one poem, as CSV
    // with an `oos` row; the JSON report and the table agree.
    let mut test = String::from("text,label\n");
    for (text, _, intent) in PROBES {
        test += &format!("{text},{intent}\n");
    }
    test += "write a short poem about autumn leaves,oos\n";
    std::fs::write(d.join("probe.csv"), test).unwrap();
    let report = d.join("report.json");
    let out = moltbot(&[
        "intents",
        "eval",
        csv_head.to_str().unwrap(),
        d.join("probe.csv").to_str().unwrap(),
        "--json",
        report.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["model_id"], id);
    assert_eq!(
        (r["texts"].as_u64(), r["in_scope_texts"].as_u64()),
        (Some(5), Some(4))
    );
    assert_eq!(r["accuracy"].as_f64(), Some(1.0), "{r}");
    assert_eq!(r["out_of_scope_recall"].as_f64(), Some(1.0), "{r}");
    assert_eq!(r["domain_accuracy"].as_f64(), Some(1.0), "{r}");
    assert_eq!(r["per_intent"].as_array().unwrap().len(), 5);
    assert!(String::from_utf8_lossy(&out.stdout).contains("in-scope accuracy            1.0000"));
}

#[test]
fn bad_rows_name_the_file_and_line_and_write_nothing() {
    let d = dir();
    let cases = [
        (
            "short-row.csv",
            "text,label\nhello,greet\nbye\n",
            "short-row.csv: line 3",
        ),
        (
            "no-intent.jsonl",
            "{\"text\": \"hi\", \"intent\": \"greet\"}\n{\"text\": \"bye\"}\n",
            "no-intent.jsonl: line 2: no \"intent\"",
        ),
        (
            "plain.yml",
            "nlu:\n- intent: greet\n  examples: |\n    - hi\n- intent: bye\n  examples: |\n    goodbye\n",
            "plain.yml: line 5:",
        ),
        (
            "one-intent.tsv",
            "text\tintent\nhi\tgreet\nhello\tgreet\n",
            "at least 2",
        ),
    ];
    for (name, text, expected) in cases {
        let path = d.join(name);
        std::fs::write(&path, text).unwrap();
        let head = d.join(format!("{name}-head"));
        let out = moltbot(&[
            "intents",
            "train",
            path.to_str().unwrap(),
            "--out",
            head.to_str().unwrap(),
        ]);
        assert!(!out.status.success(), "{name} trained");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expected), "{name}: {err}");
        assert!(!head.exists(), "{name}: a head directory was written");
    }
}
