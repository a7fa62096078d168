-- The spend ledger (gateway/src/spend/ledger.rs): one row per request that
-- reached a model. `row_id` makes a batch written twice (a commit whose
-- acknowledgement was lost, then retried) count once. Costs are nano-USD.
CREATE TABLE spend_ledger (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    row_id         TEXT NOT NULL UNIQUE,
    at_ms          BIGINT NOT NULL,
    request_id     TEXT NOT NULL,
    endpoint       TEXT NOT NULL,
    tenant         TEXT NOT NULL,
    api_key        TEXT NOT NULL,
    route          TEXT NOT NULL,
    model          TEXT NOT NULL,
    provider       TEXT NOT NULL,
    input_tokens   BIGINT NOT NULL,
    cached_tokens  BIGINT NOT NULL,
    output_tokens  BIGINT NOT NULL,
    cost_nanousd   BIGINT NOT NULL,
    priced         INTEGER NOT NULL,
    outcome        TEXT NOT NULL
);
CREATE INDEX spend_ledger_at ON spend_ledger (at_ms);
