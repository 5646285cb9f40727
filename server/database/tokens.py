"""What enrolment proves with and against: enrolment tokens (their uses taken with the machine's record,
server/database/machines.py), passphrases retired by a rotation and still valid for a while, single-use nonces
(shared by every instance), and the failed proofs the rate limit counts."""

from __future__ import annotations

from sqlalchemy import and_, delete, func, insert, select

from server.database.schema import enrol_failures, retired_passphrases, tokens, used_nonces
from server.database.transactions import Access, T, db_errors

FAILURE_SECONDS = 3600.0  # failed proofs are kept this long (the rate limit looks at the last minute)


class Tokens(Access[T]):
    """Enrolment secrets, nonces and the rate limit (``Storage``'s part of them)."""

    @db_errors
    def add_token(self, token_id: str, secret: str, expires_at: float | None, uses: int | None, now: float) -> None:
        with self.transaction() as tx:
            tx.conn.execute(
                insert(tokens).values(
                    token_id=token_id, secret=secret, expires_at=expires_at, uses_left=uses, created_at=now
                )
            )

    def token(self, token_id: str) -> tuple[str, float | None, int | None] | None:
        with self.reading() as tx:
            row = tx.conn.execute(
                select(tokens.c.secret, tokens.c.expires_at, tokens.c.uses_left).where(tokens.c.token_id == token_id)
            ).first()
            return (row[0], row[1], row[2]) if row else None

    @db_errors
    def remove_token(self, token_id: str) -> None:
        with self.transaction() as tx:
            tx.conn.execute(delete(tokens).where(tokens.c.token_id == token_id))

    @db_errors
    def retire_passphrase(self, secret: str, valid_until: float) -> None:
        with self.transaction() as tx:
            tx.conn.execute(insert(retired_passphrases).values(secret=secret, valid_until=valid_until))

    def retired_passphrases(self, now: float) -> list[str]:
        with self.reading() as tx:
            rows = tx.conn.execute(select(retired_passphrases.c.secret).where(retired_passphrases.c.valid_until > now))
            return [r[0] for r in rows]

    @db_errors
    def use_nonce(self, nonce_id: str, expires_at: float) -> bool:
        """Mark a nonce used; False when it already was (by any instance)."""
        with self.transaction() as tx:
            return tx.insert_ignore(used_nonces, {"nonce_id": nonce_id, "expires_at": expires_at})

    @db_errors
    def record_failure(self, address: str, now: float) -> None:
        with self.transaction() as tx:
            tx.conn.execute(insert(enrol_failures).values(address=address, at=now))

    def failures(self, address: str, since: float) -> tuple[int, float | None]:
        """How many failed proofs came from ``address`` after ``since``, and when the oldest of them did."""
        with self.reading() as tx:
            count, oldest = tx.conn.execute(
                select(func.count(), func.min(enrol_failures.c.at)).where(
                    and_(enrol_failures.c.address == address, enrol_failures.c.at > since)
                )
            ).one()
            return int(count), oldest
