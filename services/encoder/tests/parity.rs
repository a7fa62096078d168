//! Encoder parity with Hugging Face transformers (run from the project's
//! virtualenv): the same 100 CLINC150 sentences, and one over the token
//! limit, embedded by both; every pair must have cosine ≥ 0.9999, in f32 and
//! in mixed bf16 precision (against transformers' f32).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::path::{Path, PathBuf};

use moltbot_encoder::{Encoder, Precision};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn model_dir() -> PathBuf {
    let dir = std::env::var_os("MOLTBOT_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("var/models"))
        .join("all-minilm-l6-v2");
    assert!(
        dir.join(".prepared").exists(),
        "{} missing: run `make models`",
        dir.display()
    );
    dir
}

fn python() -> PathBuf {
    std::env::var_os("MOLTBOT_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".venv/bin/python"))
}

/// The first 100 validation utterances of CLINC150 (the copy committed with
/// the understanding service, else `../shared`).
fn sentences() -> Vec<String> {
    let candidates = [
        root().join("services/understanding/data/clinc150/data_full_train_val.json"),
        root().join("../shared/data/clinc150/data_full_train_val.json"),
    ];
    let path = candidates
        .iter()
        .find(|p| p.exists())
        .expect("CLINC150 data");
    let data: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    data["val"].as_array().unwrap()[..100]
        .iter()
        .map(|pair| pair[0].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn embeddings_match_transformers() {
    let dir = model_dir();
    let mut texts = sentences();
    texts.push("the quick brown fox jumps over the lazy dog ".repeat(40));
    let tmp = std::env::temp_dir().join(format!("moltbot-enc-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let input = tmp.join("texts.json");
    let output = tmp.join("ref.f32");
    std::fs::write(&input, serde_json::to_string(&texts).unwrap()).unwrap();
    let status = std::process::Command::new(python())
        .arg(root().join("scripts/reference_embed.py"))
        .arg("--model")
        .arg(&dir)
        .arg("--texts")
        .arg(&input)
        .arg("--out")
        .arg(&output)
        .status()
        .expect("the virtualenv python (make ml-venv)");
    assert!(status.success());
    let reference: Vec<f32> = std::fs::read(&output)
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();

    for precision in [Precision::F32, Precision::Bf16] {
        let encoder = Encoder::load_with(&dir, tch::Device::Cpu, precision).unwrap();
        assert_eq!(encoder.dimension(), 384);
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        // Mixed batch sizes: padding must not change any embedding.
        let mut ours = encoder.embed(&refs[..7]).unwrap();
        ours.extend(encoder.embed(&refs[7..]).unwrap());
        let mut worst = 1.0f32;
        for (i, e) in ours.iter().enumerate() {
            let r = &reference[i * 384..(i + 1) * 384];
            let cos: f32 = e.vector.iter().zip(r).map(|(a, b)| a * b).sum();
            worst = worst.min(cos);
            assert!(cos >= 0.9999, "{precision}: text {i}: cosine {cos}");
        }
        println!("{precision}: worst cosine {worst}");
        let long = ours.last().unwrap();
        assert!(long.truncated);
        assert_eq!(long.tokens, encoder.max_tokens());
        assert!(!ours[0].truncated);
    }
    let _ = std::fs::remove_dir_all(tmp);
}
