-- Collections, documents and their chunks with embedding vectors (little-endian
-- f32 bytes). Chunk keys are never reused (AUTOINCREMENT): they are the keys
-- of the in-process HNSW index and of its snapshots.
CREATE TABLE collections (
    name           TEXT PRIMARY KEY,
    dimension      INTEGER NOT NULL,
    chunk_tokens   INTEGER NOT NULL,
    overlap_tokens INTEGER NOT NULL,
    created_at_ms  INTEGER NOT NULL
);

CREATE TABLE documents (
    collection TEXT NOT NULL REFERENCES collections (name) ON DELETE CASCADE,
    id         TEXT NOT NULL,
    metadata   TEXT NOT NULL,
    PRIMARY KEY (collection, id)
);

CREATE TABLE chunks (
    key         INTEGER PRIMARY KEY AUTOINCREMENT,
    collection  TEXT NOT NULL,
    document_id TEXT NOT NULL,
    ordinal     INTEGER NOT NULL,
    text        TEXT NOT NULL,
    vector      BLOB NOT NULL,
    FOREIGN KEY (collection, document_id) REFERENCES documents (collection, id) ON DELETE CASCADE
);

CREATE INDEX chunks_by_document ON chunks (collection, document_id);
