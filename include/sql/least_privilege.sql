-- Least-privilege grants for the roles that use the audit and escrow tables on PostgreSQL.
-- Run as the role that owns the audit and escrow tables (the "audit owner"), after they exist: a
-- first run as the owner, or `pseudonymise audit verify --db ...`, creates them together with the
-- append function `pseudonymise_audit_append(jsonb)`, a SECURITY DEFINER function owned by the
-- audit owner. No other role appends to the audit, its head or its checkpoints except through
-- SECURITY DEFINER functions: the server sets seq, time, prev_hash, row_hash and the caller's
-- role, so no pipeline or API role can rewrite, delete, back-date or forge the chain's position.
-- docs/threat-model.md says what each role can and cannot do, and which test shows it.

-- The pipeline (Airflow workers): appends audit rows, writes escrow, never reads either.
-- Every use of a verified token starts through pseudonymise_audit_start, which also refuses a revoked or
-- used-up token (max_uses) under the audit lock, reading pseudonymise_revoked as its owner. The uses it lets
-- through are recorded and counted in pseudonymise_admitted, which no role but the owner may write: rows a
-- role appends to the audit (a forged 'denied' row for an earlier use) never give a token its uses back.
CREATE ROLE pseudonymise_pipeline LOGIN;
GRANT EXECUTE ON FUNCTION pseudonymise_audit_append(jsonb) TO pseudonymise_pipeline;
GRANT EXECUTE ON FUNCTION pseudonymise_audit_start(jsonb, integer, jsonb, jsonb) TO pseudonymise_pipeline;
GRANT INSERT ON pseudonymise_escrow_batch TO pseudonymise_pipeline;
GRANT INSERT ON pseudonymise_escrow TO pseudonymise_pipeline;
-- Leaving out pseudonyms escrow already holds, and the stored nonces RETURNING gives for the batch digests:
-- the key and the (public) counter nonce, never a ciphertext.
GRANT SELECT (project, pseudonym, batch_id, nonce) ON pseudonymise_escrow TO pseudonymise_pipeline;

-- The write modes' interval lock (replace, replace_partition): one row per open writer, removed
-- before it commits. A role that may create tables makes it on first use, this makes it otherwise.
CREATE TABLE IF NOT EXISTS pseudonymise_write_lock (holder text PRIMARY KEY, target text NOT NULL,
    span box NOT NULL, EXCLUDE USING gist (span WITH &&));
GRANT SELECT, INSERT, DELETE ON pseudonymise_write_lock TO pseudonymise_pipeline;
-- and on the data: SELECT on the sources, INSERT/DELETE on the targets.

-- The auditor (reversal, audit verification): reads escrow and the audit, appends only through the function.
CREATE ROLE pseudonymise_auditor LOGIN;
GRANT EXECUTE ON FUNCTION pseudonymise_audit_append(jsonb) TO pseudonymise_auditor;
GRANT EXECUTE ON FUNCTION pseudonymise_audit_start(jsonb, integer, jsonb, jsonb) TO pseudonymise_auditor;
-- Revoking a token (`pseudonymise token revoke`): the revocation row and its audit rows in one call. No role
-- but the owner may change or delete pseudonymise_revoked: a revocation is for ever.
GRANT EXECUTE ON FUNCTION pseudonymise_audit_revoke(jsonb, text, text) TO pseudonymise_auditor;
GRANT SELECT ON pseudonymise_revoked, pseudonymise_admitted TO pseudonymise_auditor;
GRANT SELECT ON pseudonymise_audit, pseudonymise_audit_head TO pseudonymise_auditor;
GRANT SELECT ON pseudonymise_escrow, pseudonymise_escrow_batch TO pseudonymise_auditor;
-- Reversal requests of the HTTP API (four eyes): the role of the API server that reverses keeps them.
-- The pipeline role gets nothing here: it may append audit rows, but never make or approve a request.
GRANT SELECT, INSERT, UPDATE ON pseudonymise_reverse_request TO pseudonymise_auditor;
-- The purge job additionally needs DELETE on the two escrow tables.

-- The viewer (the Airflow UI's audit pages, read-only API users): reads the audit, nothing else.
CREATE ROLE pseudonymise_viewer LOGIN;
GRANT SELECT ON pseudonymise_audit, pseudonymise_audit_head, pseudonymise_revoked, pseudonymise_admitted
    TO pseudonymise_viewer;
GRANT SELECT ON pseudonymise_reverse_request TO pseudonymise_viewer;

-- Signed audit checkpoints (docs/design.md §6.1): the audit owner's first run creates
-- pseudonymise_audit_checkpoint and its two SECURITY DEFINER functions (EXECUTE revoked from PUBLIC).
-- Checkpointing roles get EXECUTE only: nothing on the audit, its head or the checkpoint table.
GRANT EXECUTE ON FUNCTION pseudonymise_audit_checkpoint_head(bigint, text) TO pseudonymise_pipeline, pseudonymise_auditor;
GRANT EXECUTE ON FUNCTION pseudonymise_audit_checkpoint_add(bigint, text, timestamptz, text, text, text, text)
    TO pseudonymise_pipeline, pseudonymise_auditor;
-- The audit page and auditors read the checkpoints:
GRANT SELECT ON pseudonymise_audit_checkpoint TO pseudonymise_auditor, pseudonymise_viewer;
