//! `key_halves` and `half_challenges` in SQLite (a verifier's tables).

use rusqlite::{OptionalExtension, params};

use super::{SqliteTx, signed, unsigned};
use crate::store::{HalfStore, Result, WrappedKey};

impl HalfStore for SqliteTx<'_> {
    fn insert_half_challenge(&mut self, nonce: &str, host: &str, issued: i64) -> Result<()> {
        self.exec(
            "INSERT INTO half_challenges (nonce, host, issued) VALUES (?1, ?2, ?3)",
            params![nonce, host, issued],
        )
    }

    fn take_half_challenge(&mut self, nonce: &str, host: &str) -> Result<Option<i64>> {
        let issued: Option<i64> = self
            .conn
            .prepare_cached("SELECT issued FROM half_challenges WHERE nonce = ?1 AND host = ?2")?
            .query_row(params![nonce, host], |r| r.get(0))
            .optional()?;
        if issued.is_some() {
            self.exec(
                "DELETE FROM half_challenges WHERE nonce = ?1",
                params![nonce],
            )?;
        }
        Ok(issued)
    }

    fn prune_half_challenges(&mut self, host: &str, before: i64, keep: u32) -> Result<()> {
        self.exec(
            "DELETE FROM half_challenges WHERE host = ?1 AND (issued < ?2 OR nonce NOT IN
                (SELECT nonce FROM half_challenges WHERE host = ?1 ORDER BY issued DESC LIMIT ?3))",
            params![host, before, keep],
        )
    }

    fn key_half(&mut self, volume: &str, generation: u64) -> Result<Option<(String, WrappedKey)>> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT host, master_key_id, wrapped FROM key_halves WHERE volume_id = ?1 AND generation = ?2",
            )?
            .query_row(params![volume, signed(generation)], |r| {
                Ok((
                    r.get(0)?,
                    WrappedKey {
                        master_key_id: r.get(1)?,
                        wrapped: r.get(2)?,
                    },
                ))
            })
            .optional()?)
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
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
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
            .conn
            .prepare_cached(
                "DELETE FROM key_halves WHERE volume_id = ?1 AND host = ?2 AND (?3 = 0 OR generation < ?3)",
            )?
            .execute(params![volume, host, signed(below)])?;
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }

    fn all_key_halves(&mut self) -> Result<Vec<(String, u64, WrappedKey)>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT volume_id, generation, master_key_id, wrapped FROM key_halves",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get(0)?,
                unsigned(r, 1)?,
                WrappedKey {
                    master_key_id: r.get(2)?,
                    wrapped: r.get(3)?,
                },
            ))
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn rewrap_key_half(&mut self, volume: &str, generation: u64, key: &WrappedKey) -> Result<()> {
        self.exec(
            "UPDATE key_halves SET master_key_id = ?1, wrapped = ?2 WHERE volume_id = ?3 AND generation = ?4",
            params![key.master_key_id, key.wrapped, volume, signed(generation)],
        )
    }
}
