-- Collections, documents and their chunks with embedding vectors (little-endian
-- f32 bytes). Chunk keys come from an identity column and are never reused:
-- they are the keys of the in-process HNSW index and of its snapshots.
CREATE TABLE collections (
    name           TEXT PRIMARY KEY,
    dimension      BIGINT NOT NULL,
    chunk_tokens   BIGINT NOT NULL,
    overlap_tokens BIGINT NOT NULL,
    created_at_ms  BIGINT NOT NULL
);

CREATE TABLE documents (
    collection TEXT NOT NULL REFERENCES collections (name) ON DELETE CASCADE,
    id         TEXT NOT NULL,
    metadata   TEXT NOT NULL,
    PRIMARY KEY (collection, id)
);

CREATE TABLE chunks (
    key         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    collection  TEXT NOT NULL,
    document_id TEXT NOT NULL,
    ordinal     BIGINT NOT NULL,
    text        TEXT NOT NULL,
    vector      BYTEA NOT NULL,
    FOREIGN KEY (collection, document_id) REFERENCES documents (collection, id) ON DELETE CASCADE
);

CREATE INDEX chunks_by_document ON chunks (collection, document_id);
