//! The retrieval service's behaviour over gRPC on both stores (SQLite and a
//! real PostgreSQL), with the real MiniLM encoder: collections, upsert and
//! replace, search by text and vector, metadata filters, error codes,
//! durability across a restart (with and without an index snapshot), and
//! atomic document replacement under concurrent searches.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failures are the assertions

mod common;

use std::collections::HashMap;

use common::{BACKENDS, Harness, args, unique};
use moltbot_proto::retrieval::v1::{
    CreateCollectionRequest, DeleteRequest, ListCollectionsRequest, SearchRequest, StatsRequest,
    Vector, search_request::Query,
};
use tonic::Code;

fn facts() -> Vec<common::Doc> {
    vec![
        (
            "lisbon".into(),
            "Lisbon is the capital of Portugal. It lies on the Tagus estuary and is known for its trams.".into(),
            vec![("lang", "en"), ("topic", "city")],
        ),
        (
            "redis".into(),
            "Redis is an in-memory key-value store. The context service keeps conversation turns in Redis lists.".into(),
            vec![("lang", "en"), ("topic", "tech")],
        ),
        (
            "bread".into(),
            "To bake bread, mix flour, water, salt and yeast, let the dough rise, then bake it in a hot oven.".into(),
            vec![("lang", "en"), ("topic", "food")],
        ),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn collections_upsert_search_and_errors_on_both_stores() {
    for backend in BACKENDS {
        let dir = tempdir(backend);
        let a = args(backend, &dir);
        let mut h = Harness::start(&a).await;
        let name = unique("facts");
        h.create(&name).await;

        // Errors of collection management.
        let dup = h
            .client
            .create_collection(CreateCollectionRequest {
                name: name.clone(),
                chunking: None,
            })
            .await
            .unwrap_err();
        assert_eq!(dup.code(), Code::AlreadyExists, "{backend}");
        let bad = h
            .client
            .create_collection(CreateCollectionRequest {
                name: "Bad Name!".into(),
                chunking: None,
            })
            .await
            .unwrap_err();
        assert_eq!(bad.code(), Code::InvalidArgument, "{backend}");

        let (docs, chunks) = h.upsert(&name, facts()).await;
        assert_eq!((docs, chunks), (3, 3), "{backend}");
        let r = h
            .search_text(&name, "how do I make bread at home?", 2)
            .await;
        assert_eq!(r.hits[0].document_id, "bread", "{backend}: {r:?}");
        assert_eq!(r.hits[0].chunk_id, "bread#0");
        assert_eq!(r.hits[0].metadata["topic"], "food");
        assert!(r.hits[0].score > r.hits[1].score);
        assert!(!r.exact);

        // Filter: only matching chunks.
        let filtered = h
            .client
            .search(SearchRequest {
                collection: name.clone(),
                query: Some(Query::Text("how do I make bread at home?".into())),
                top_k: 3,
                filter: HashMap::from([("topic".to_owned(), "tech".to_owned())]),
                min_score: None,
                exact: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(filtered.hits.len(), 1, "{backend}");
        assert_eq!(filtered.hits[0].document_id, "redis");

        // Re-upserting replaces the document's chunks.
        h.upsert(
            &name,
            vec![(
                "bread".into(),
                "Sourdough uses a starter culture instead of yeast.".into(),
                vec![("topic", "food")],
            )],
        )
        .await;
        let r = h.search_text(&name, "sourdough starter", 3).await;
        let bread: Vec<_> = r.hits.iter().filter(|h| h.document_id == "bread").collect();
        assert_eq!(bread.len(), 1, "{backend}: {r:?}");
        assert!(bread[0].text.contains("Sourdough"));

        // Errors of search.
        for (req, what) in [
            (
                SearchRequest {
                    collection: name.clone(),
                    query: Some(Query::Text("  ".into())),
                    top_k: 3,
                    ..Default::default()
                },
                "empty",
            ),
            (
                SearchRequest {
                    collection: name.clone(),
                    query: None,
                    top_k: 3,
                    ..Default::default()
                },
                "empty",
            ),
            (
                SearchRequest {
                    collection: name.clone(),
                    query: Some(Query::Text("x".into())),
                    top_k: 0,
                    ..Default::default()
                },
                "top_k",
            ),
            (
                SearchRequest {
                    collection: name.clone(),
                    query: Some(Query::Text("x".into())),
                    top_k: 1001,
                    ..Default::default()
                },
                "top_k",
            ),
            (
                SearchRequest {
                    collection: name.clone(),
                    query: Some(Query::Vector(Vector {
                        values: vec![0.1; 10],
                    })),
                    top_k: 3,
                    ..Default::default()
                },
                "dimension",
            ),
        ] {
            let e = h.client.search(req).await.unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{backend}: {e:?}");
            assert!(e.message().contains(what), "{backend}: {}", e.message());
        }
        let e = h
            .client
            .search(SearchRequest {
                collection: "nope".into(),
                query: Some(Query::Text("x".into())),
                top_k: 3,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);

        // Search by vector: the stored chunk's own embedding finds it first.
        let lisbon = h
            .state
            .batcher
            .embed(vec![facts()[0].1.clone()])
            .await
            .unwrap();
        let r = h
            .client
            .search(SearchRequest {
                collection: name.clone(),
                query: Some(Query::Vector(Vector {
                    values: lisbon[0].vector.clone(),
                })),
                top_k: 1,
                min_score: Some(0.99),
                exact: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.exact);
        assert_eq!(r.hits.len(), 1);
        assert_eq!(r.hits[0].document_id, "lisbon");

        // Delete documents; stats follow.
        let d = h
            .client
            .delete(DeleteRequest {
                collection: name.clone(),
                document_ids: vec!["redis".into(), "unknown".into()],
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!((d.deleted_documents, d.deleted_chunks), (1, 1));
        let stats = h
            .client
            .stats(StatsRequest {
                collection: name.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(stats.indexed_vectors, 2, "{backend}");
        assert_eq!(stats.collection.as_ref().unwrap().document_count, 2);
        assert_eq!(stats.collection.as_ref().unwrap().dimension, 384);
        assert!(stats.index_memory_bytes > 2 * 384 * 4);
        let listed = h
            .client
            .list_collections(ListCollectionsRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(listed.collections.iter().any(|c| c.name == name));

        h.drop_collection(&name).await;
        let e = h
            .client
            .stats(StatsRequest {
                collection: name.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        h.shutdown().await;
        common::cleanup(&a).await;
    }
}

fn tempdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(unique(&format!("moltbot-retrieval-{tag}")));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[tokio::test(flavor = "multi_thread")]
async fn filtered_search_still_returns_k_when_k_match() {
    for backend in BACKENDS {
        let dir = tempdir(backend);
        let a = args(backend, &dir);
        let mut h = Harness::start(&a).await;
        let name = unique("filter");
        h.create(&name).await;
        // 300 short documents; only 12 are tagged "rare".
        let docs: Vec<_> = (0..300)
            .map(|i| {
                let tag = if i % 25 == 0 { "rare" } else { "common" };
                (
                    format!("doc-{i}"),
                    format!("Note number {i} about topic {}.", i % 7),
                    vec![("tag", tag)],
                )
            })
            .collect();
        for batch in docs.chunks(100) {
            h.upsert(&name, batch.to_vec()).await;
        }
        let r = h
            .client
            .search(SearchRequest {
                collection: name.clone(),
                query: Some(Query::Text("note about topic 3".into())),
                top_k: 10,
                filter: HashMap::from([("tag".to_owned(), "rare".to_owned())]),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.hits.len(), 10, "{backend}: {r:?}");
        assert!(
            r.hits.iter().all(|h| h.metadata["tag"] == "rare"),
            "{backend}"
        );
        h.drop_collection(&name).await;
        h.shutdown().await;
        common::cleanup(&a).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_keeps_hits_with_and_without_a_snapshot() {
    for backend in BACKENDS {
        let dir = tempdir(backend);
        let name = unique("durable");
        let a = args(backend, &dir);
        let mut h = Harness::start(&a).await;
        h.create(&name).await;
        h.upsert(&name, facts()).await;
        let before = h.search_text(&name, "capital of Portugal", 3).await;
        // Shut down: the index snapshot is written.
        h.shutdown().await;
        assert!(
            dir.join(format!("retrieval-index-{backend}/{name}.keys"))
                .exists()
        );

        let mut h = Harness::start(&a).await;
        let after = h.search_text(&name, "capital of Portugal", 3).await;
        assert_eq!(before, after, "{backend}: hits changed across a restart");
        let stats = h
            .client
            .stats(StatsRequest {
                collection: name.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(
            stats.snapshot_at.is_some(),
            "{backend}: not loaded from the snapshot"
        );
        // A write after the snapshot, then a crash (no snapshot): the store
        // has it, and the next start adds it to the snapshot's graph.
        h.upsert(
            &name,
            vec![(
                "oslo".into(),
                "Oslo is the capital of Norway.".into(),
                vec![],
            )],
        )
        .await;
        drop(h);
        let mut h = Harness::start(&a).await;
        let r = h.search_text(&name, "capital of Norway", 1).await;
        assert_eq!(r.hits[0].document_id, "oslo", "{backend}: {r:?}");
        // And deletions made after the snapshot are not resurrected.
        h.client
            .delete(DeleteRequest {
                collection: name.clone(),
                document_ids: vec!["lisbon".into()],
            })
            .await
            .unwrap();
        drop(h);
        let mut h = Harness::start(&a).await;
        let r = h.search_text(&name, "capital of Portugal", 4).await;
        assert!(
            r.hits.iter().all(|x| x.document_id != "lisbon"),
            "{backend}: {r:?}"
        );
        h.drop_collection(&name).await;
        h.shutdown().await;
        common::cleanup(&a).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_upserts_never_show_a_partial_document() {
    for backend in BACKENDS {
        let dir = tempdir(backend);
        let a = args(backend, &dir);
        let mut h = Harness::start(&a).await;
        let name = unique("atomic");
        h.create(&name).await;
        // A document of several chunks (paragraphs far apart in tokens), in
        // two versions whose every chunk names its version.
        let version = |v: &str| {
            (0..6)
                .map(|i| {
                    format!(
                        "Version {v} paragraph {i}. {}",
                        format!("Filler words of version {v}. ").repeat(40)
                    )
                })
                .collect::<Vec<_>>()
                .join("\n\n")
        };
        let (_, chunks) = h
            .upsert(
                &name,
                vec![("doc".into(), version("alpha"), vec![("d", "1")])],
            )
            .await;
        assert!(chunks >= 6, "{chunks}");
        let writer = {
            let mut client = h.client.clone();
            let name = name.clone();
            tokio::spawn(async move {
                for round in 0..6 {
                    let v = if round % 2 == 0 { "beta" } else { "alpha" };
                    client
                        .upsert(moltbot_proto::retrieval::v1::UpsertRequest {
                            collection: name.clone(),
                            documents: vec![moltbot_proto::retrieval::v1::Document {
                                id: "doc".into(),
                                text: version(v),
                                metadata: HashMap::from([("d".to_owned(), "1".to_owned())]),
                            }],
                        })
                        .await
                        .unwrap();
                }
            })
        };
        let mut searches = 0;
        while !writer.is_finished() {
            let r = h
                .client
                .search(SearchRequest {
                    collection: name.clone(),
                    query: Some(Query::Text("paragraph".into())),
                    top_k: 100,
                    filter: HashMap::from([("d".to_owned(), "1".to_owned())]),
                    exact: true,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(
                r.hits.len() as u32,
                chunks,
                "{backend}: a partial document: {}",
                r.hits.len()
            );
            let alpha = r.hits.iter().filter(|h| h.text.contains("alpha")).count();
            assert!(
                alpha == 0 || alpha == r.hits.len(),
                "{backend}: versions mixed"
            );
            searches += 1;
        }
        writer.await.unwrap();
        assert!(searches > 0);
        h.drop_collection(&name).await;
        h.shutdown().await;
        common::cleanup(&a).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn long_documents_are_chunked_within_the_encoder_limit() {
    let dir = tempdir("long");
    let a = args("sqlite", &dir);
    let mut h = Harness::start(&a).await;
    let name = unique("long");
    h.create(&name).await;
    // ~30k words, one paragraph of very long sentences and many short ones.
    let mut text = String::new();
    text.push_str(&"word ".repeat(3000));
    text.push_str("\n\n");
    for i in 0..3000 {
        text.push_str(&format!("Sentence {i} says something short. "));
        if i % 50 == 0 {
            text.push_str("\n\n");
        }
    }
    let (_, chunks) = h.upsert(&name, vec![("long".into(), text, vec![])]).await;
    assert!(chunks > 100, "{chunks}");
    let r = h.search_text(&name, "sentence 1234", 5).await;
    for hit in &r.hits {
        let tokens = h
            .state
            .tokenizer
            .encode(hit.text.as_str(), false)
            .unwrap()
            .get_ids()
            .len();
        assert!(tokens <= 254, "chunk of {tokens} tokens");
    }
    h.drop_collection(&name).await;
    h.shutdown().await;
    common::cleanup(&a).await;
}
