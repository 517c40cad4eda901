-- Submits write many task rows a second, nearly all for a few API keys. The foreign keys
-- from tasks and idempotency_keys to api_keys made PostgreSQL run a look-up per inserted
-- row and take a FOR KEY SHARE lock on the key's row, which concurrent transactions of the
-- same key share as a multixact: the largest single cost of a submit in the database.
-- The check protects nothing the API does not already ensure: every api_key_id it writes
-- is the id of the key that authenticated the request, and keys are revoked (revoked_at),
-- never deleted. The one way the reference could still break, deleting a key, is refused
-- below instead, at no cost to inserts.

ALTER TABLE tasks DROP CONSTRAINT IF EXISTS tasks_api_key_id_fkey;
ALTER TABLE idempotency_keys DROP CONSTRAINT IF EXISTS idempotency_keys_api_key_id_fkey;

CREATE FUNCTION api_keys_are_never_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'API key % cannot be deleted; revoke it instead', OLD.id
        USING ERRCODE = 'restrict_violation';
END
$$;

CREATE TRIGGER api_keys_are_never_deleted
    BEFORE DELETE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION api_keys_are_never_deleted();
