-- Providers and their credentials. Secrets are AES-256-GCM ciphertext
-- (nonce || ciphertext || tag); nothing here is plaintext key material.
CREATE TABLE providers (
    name                 TEXT PRIMARY KEY,
    kind                 BIGINT NOT NULL,
    base_url             TEXT NOT NULL,
    models               TEXT NOT NULL,
    health_interval_s    BIGINT NOT NULL
);

CREATE TABLE credentials (
    id           TEXT PRIMARY KEY,
    provider     TEXT NOT NULL REFERENCES providers (name) ON DELETE CASCADE,
    slot         BIGINT NOT NULL,
    secret       BYTEA NOT NULL,
    state        BIGINT NOT NULL,
    token_url    TEXT,
    client_id    TEXT,
    scopes       TEXT,
    updated_at_ms BIGINT NOT NULL,
    UNIQUE (provider, slot)
);
