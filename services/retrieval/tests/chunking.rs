//! Chunking with the real MiniLM tokenizer: sizes within the limit, overlap
//! between neighbours, sentence and paragraph boundaries respected.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failures are the assertions

mod common;

use moltbot_retrieval::chunk::{Chunking, chunk, load_tokenizer};

fn tokenizer() -> tokenizers::Tokenizer {
    load_tokenizer(&common::models_dir().join("all-minilm-l6-v2/tokenizer.json")).unwrap()
}

fn tokens(t: &tokenizers::Tokenizer, s: &str) -> usize {
    t.encode(s, false).unwrap().get_ids().len()
}

#[test]
fn short_text_is_one_chunk() {
    let t = tokenizer();
    let text = "Lisbon is the capital of Portugal. It lies on the Tagus estuary and is known for its trams.";
    let chunks = chunk(&t, text, Chunking::resolve(0, 0).unwrap()).unwrap();
    assert_eq!(chunks, vec![text.to_owned()]);
}

#[test]
fn long_text_is_cut_at_sentences_within_the_limit_with_overlap() {
    let t = tokenizer();
    let cfg = Chunking::resolve(64, 16).unwrap();
    let text: String = (0..60)
        .map(|i| format!("Sentence number {i} is about the weather today."))
        .collect::<Vec<_>>()
        .join(" ");
    let total = tokens(&t, &text);
    let chunks = chunk(&t, &text, cfg).unwrap();
    for c in &chunks {
        assert!(tokens(&t, c) <= 64 + 2, "{} tokens: {c}", tokens(&t, c));
        assert!(c.ends_with('.'), "cut inside a sentence: {c}");
    }
    // Each chunk advances by at least chunk - overlap tokens.
    assert!(
        chunks.len() <= total / (64 - 16) + 2,
        "{} chunks for {total} tokens",
        chunks.len()
    );
    assert!(chunks.len() >= total / 64, "{} chunks", chunks.len());
    // Neighbours share their boundary sentence(s).
    for pair in chunks.windows(2) {
        let last_sentence = pair[0].rsplit(". ").next().unwrap();
        assert!(
            pair[1].starts_with(last_sentence.trim_end_matches('.')),
            "no overlap:\n{}\n{}",
            pair[0],
            pair[1]
        );
    }
}

#[test]
fn paragraphs_are_kept_apart_when_chunks_are_full_enough() {
    let t = tokenizer();
    let cfg = Chunking::resolve(64, 8).unwrap();
    let para = |n: usize| {
        (0..5)
            .map(|i| format!("Paragraph {n} line {i} has words."))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let text = format!("{}\n\n{}\n\n{}", para(1), para(2), para(3));
    let chunks = chunk(&t, &text, cfg).unwrap();
    assert_eq!(chunks.len(), 3, "{chunks:#?}");
    assert!(chunks[1].starts_with("Paragraph 2"), "{chunks:#?}");
}

#[test]
fn a_sentence_longer_than_a_chunk_is_cut_at_tokens() {
    let t = tokenizer();
    let cfg = Chunking::resolve(32, 8).unwrap();
    let text = "word ".repeat(100);
    let chunks = chunk(&t, &text, cfg).unwrap();
    assert!(chunks.len() >= 4, "{}", chunks.len());
    for c in &chunks {
        assert!(tokens(&t, c) <= 32, "{}", tokens(&t, c));
    }
}
