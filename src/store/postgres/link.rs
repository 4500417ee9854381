//! Bind ownership through PostgreSQL: a session-level advisory lock per (carrier, bind index),
//! held on a connection of its own while the bind runs. When the instance dies its connection
//! closes and PostgreSQL releases the lock: another instance takes the bind over.

use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool};
use sqlx::{Connection, Executor};
use tokio_util::sync::CancellationToken;

use crate::smpp::ownership::{LinkHold, LinkOwnership};

/// The first key of smsgw's advisory locks ("SMSG"), so that they do not meet other users'.
const LOCK_SPACE: i32 = 0x534d_5347;
/// How often a bind held elsewhere is tried again.
const RETRY: Duration = Duration::from_secs(2);
/// How often the lock's connection is checked: a broken one means the lock is gone.
const CHECK: Duration = Duration::from_secs(5);

pub struct PgLinkOwnership {
    options: PgConnectOptions,
}

impl PgLinkOwnership {
    pub fn new(pool: PgPool) -> PgLinkOwnership {
        PgLinkOwnership {
            options: (*pool.connect_options()).clone(),
        }
    }

    async fn try_acquire(&self, key: &str) -> Result<Option<LinkHold>, sqlx::Error> {
        let mut conn = PgConnection::connect_with(&self.options).await?;
        let held: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext($2))")
            .bind(LOCK_SPACE)
            .bind(key)
            .fetch_one(&mut conn)
            .await?;
        if !held {
            let _ = conn.close().await;
            return Ok(None);
        }
        let lost = CancellationToken::new();
        let release = CancellationToken::new();
        tokio::spawn(keep(conn, lost.clone(), release.clone()));
        Ok(Some(LinkHold {
            lost,
            release: Box::new(release.drop_guard()),
        }))
    }
}

#[async_trait]
impl LinkOwnership for PgLinkOwnership {
    async fn acquire(
        &self,
        carrier: &str,
        index: usize,
        stop: &CancellationToken,
    ) -> Option<LinkHold> {
        let key = format!("smsgw bind {carrier}/{index}");
        loop {
            match self.try_acquire(&key).await {
                Ok(Some(hold)) => return Some(hold),
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(carrier, bind = index, %error, "cannot ask PostgreSQL for the bind");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(RETRY) => {}
                () = stop.cancelled() => return None,
            }
        }
    }
}

/// Keeps the lock's connection open until the hold is released, and says when it broke.
async fn keep(mut conn: PgConnection, lost: CancellationToken, release: CancellationToken) {
    loop {
        tokio::select! {
            () = release.cancelled() => {
                // Closing the session releases the lock.
                let _ = conn.close().await;
                return;
            }
            () = tokio::time::sleep(CHECK) => {
                if conn.execute("SELECT 1").await.is_err() {
                    lost.cancel();
                    return;
                }
            }
        }
    }
}
