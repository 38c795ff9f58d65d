//! `key_halves` and `half_challenges` in SQLite (a verifier's tables).

use super::{SqlTx, signed, unsigned};
use crate::store::{HalfStore, Result, WrappedKey};

impl HalfStore for SqlTx<'_> {
    fn insert_half_challenge(&mut self, nonce: &str, host: &str, issued: i64) -> Result<()> {
        self.exec(
            "INSERT INTO half_challenges (nonce, host, issued) VALUES ($1, $2, $3)",
            params![nonce, host, issued],
        )
    }

    fn take_half_challenge(&mut self, nonce: &str, host: &str) -> Result<Option<i64>> {
        let issued: Option<i64> = self.db.query_opt(
            "SELECT issued FROM half_challenges WHERE nonce = $1 AND host = $2",
            params![nonce, host],
            |r| r.get(0),
        )?;
        if issued.is_some() {
            self.exec(
                "DELETE FROM half_challenges WHERE nonce = $1",
                params![nonce],
            )?;
        }
        Ok(issued)
    }

    fn prune_half_challenges(&mut self, host: &str, before: i64, keep: u32) -> Result<()> {
        self.exec(
            "DELETE FROM half_challenges WHERE host = $1 AND (issued < $2 OR nonce NOT IN
                (SELECT nonce FROM half_challenges WHERE host = $1 ORDER BY issued DESC LIMIT $3))",
            params![host, before, keep],
        )
    }

    fn key_half(&mut self, volume: &str, generation: u64) -> Result<Option<(String, WrappedKey)>> {
        self
            .db
            .query_opt(
                "SELECT host, master_key_id, wrapped FROM key_halves WHERE volume_id = $1 AND generation = $2",
            params![volume, signed(generation)], |r| {
                Ok((
                    r.get(0)?,
                    WrappedKey {
                        master_key_id: r.get(1)?,
                        wrapped: r.get(2)?,
                    },
                ))
            })
    }

    fn insert_key_half(
        &mut self,
        volume: &str,
        generation: u64,
        host: &str,
        key: &WrappedKey,
        created: i64,
    ) -> Result<()> {
        self.exec(
            "INSERT INTO key_halves (volume_id, generation, host, master_key_id, wrapped, created)
             VALUES ($1, $2, $3, $4, $5, $6)",
            params![
                volume,
                signed(generation),
                host,
                key.master_key_id,
                key.wrapped,
                created
            ],
        )
    }

    fn delete_key_halves(&mut self, volume: &str, host: &str, below: u64) -> Result<u32> {
        let n = self
            .db
            .execute(
                "DELETE FROM key_halves WHERE volume_id = $1 AND host = $2 AND ($3 = 0 OR generation < $3)",
            params![volume, host, signed(below)])?;
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }

    fn all_key_halves(&mut self) -> Result<Vec<(String, u64, WrappedKey)>> {
        let stmt = "SELECT volume_id, generation, master_key_id, wrapped FROM key_halves";
        let rows = self.db.query_all(stmt, (), |r| {
            Ok((
                r.get(0)?,
                unsigned(r, 1)?,
                WrappedKey {
                    master_key_id: r.get(2)?,
                    wrapped: r.get(3)?,
                },
            ))
        })?;
        Ok(rows)
    }

    fn rewrap_key_half(&mut self, volume: &str, generation: u64, key: &WrappedKey) -> Result<()> {
        self.exec(
            "UPDATE key_halves SET master_key_id = $1, wrapped = $2 WHERE volume_id = $3 AND generation = $4",
            params![key.master_key_id, key.wrapped, volume, signed(generation)],
        )
    }
}
