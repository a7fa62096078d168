//! HNSW recall against exact search on real MiniLM embeddings: CLINC150
//! training utterances as the corpus, validation utterances as the queries.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failures are the assertions

mod common;

use std::{collections::BTreeMap, collections::HashSet, sync::Arc};

use moltbot_encoder::Encoder;
use moltbot_retrieval::index::{CollectionIndex, Entry, HnswParams};

fn utterances(split: &str, n: usize) -> Vec<String> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../understanding/data/clinc150/data_full_train_val.json");
    let data: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    data[split]
        .as_array()
        .unwrap()
        .iter()
        .map(|pair| pair[0].as_str().unwrap().to_owned())
        .take(n)
        .collect()
}

fn embed(encoder: &Encoder, texts: &[String]) -> Vec<Vec<f32>> {
    texts
        .chunks(64)
        .flat_map(|batch| {
            let refs: Vec<&str> = batch.iter().map(String::as_str).collect();
            encoder.embed(&refs).unwrap().into_iter().map(|e| e.vector)
        })
        .collect()
}

#[test]
fn hnsw_recall_at_10_against_exact_is_at_least_0_95() {
    let encoder = Encoder::load(
        &common::models_dir().join("all-minilm-l6-v2"),
        tch::Device::Cpu,
    )
    .unwrap();
    let corpus = utterances("train", 6000);
    let queries = utterances("val", 500);
    let vectors = embed(&encoder, &corpus);
    let query_vectors = embed(&encoder, &queries);

    let mut index = CollectionIndex::new(384, HnswParams::default()).unwrap();
    for (i, (v, text)) in vectors.iter().zip(&corpus).enumerate() {
        index
            .add(
                i as u64,
                v,
                Entry {
                    document_id: Arc::from(format!("u{i}").as_str()),
                    ordinal: 0,
                    text: Arc::from(text.as_str()),
                    metadata: Arc::new(BTreeMap::new()),
                },
            )
            .unwrap();
    }
    let none = BTreeMap::new();
    let mut found = 0usize;
    for q in &query_vectors {
        let exact: HashSet<u64> = index
            .exact(q, 10, &none)
            .unwrap()
            .iter()
            .map(|s| s.key)
            .collect();
        let approx = index.search(q, 10, &none).unwrap();
        assert_eq!(approx.len(), 10);
        found += approx.iter().filter(|s| exact.contains(&s.key)).count();
    }
    let recall = found as f64 / (10 * query_vectors.len()) as f64;
    println!(
        "recall@10 = {recall:.4} over {} queries, {} vectors",
        queries.len(),
        corpus.len()
    );
    assert!(recall >= 0.95, "recall@10 = {recall}");
}
