//! Bind ownership through PostgreSQL: a session-level advisory lock per (carrier, bind index),
//! held on a connection of its own while the bind runs. When the instance dies its connection
//! closes and PostgreSQL releases the lock: another instance takes the bind over.
//!
//! Binds are spread: each instance running a carrier holds a shared advisory lock on it (its
//! presence), so every instance can count the live instances of the carrier. An instance holds
//! at most its fair share, ceil(binds / live instances): beyond that it asks for no more, and it
//! gives one bind up at a time (the session drains its window and unbinds first) so that
//! another instance takes it. An instance alone takes every bind.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool};
use sqlx::{Connection, Executor};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::smpp::ownership::{LinkHold, LinkOwnership};

/// The first key of smsgw's advisory locks ("SMSG"), so that they do not meet other users'.
const LOCK_SPACE: i32 = 0x534d_5347;
/// The first key of the presence locks ("SMSP"): one shared lock per carrier.
const PRESENCE_SPACE: i32 = 0x534d_5350;
/// How often a bind held elsewhere is tried again.
const RETRY: Duration = Duration::from_secs(2);
/// How often the lock's connection is checked (a broken one means the lock is gone), the live
/// instances counted, and the share of a bind held checked.
const CHECK: Duration = Duration::from_secs(5);
/// After giving a bind up, this instance neither asks for a bind of that carrier nor gives
/// another up for this long: the other instances take it, and the counts settle, meanwhile.
const PAUSE: Duration = Duration::from_secs(10);

/// The live instances holding a presence lock on a carrier, in this database (pg_locks shows
/// the whole cluster). The keys are int4 in the call and oid in pg_locks.
const COUNT_LIVE: &str = "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND granted \
     AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
     AND classid = ($1::int8 & 4294967295)::oid \
     AND objid = (hashtext($2)::int8 & 4294967295)::oid AND objsubid = 2";

pub struct PgLinkOwnership {
    options: PgConnectOptions,
    carriers: Mutex<HashMap<String, Arc<Share>>>,
}

/// This instance's part of one carrier's binds.
struct Share {
    binds: usize,
    state: Mutex<ShareState>,
}

#[derive(Default)]
struct ShareState {
    /// The instances running the carrier, this one included; 0 until first counted.
    live: usize,
    /// The binds this instance holds.
    held: usize,
    /// Until then, no bind is asked for or given up (one was just given up).
    paused_until: Option<Instant>,
}

impl Share {
    fn fair(&self, live: usize) -> usize {
        self.binds.div_ceil(live.max(1))
    }

    /// Whether this instance may ask for one more bind now.
    fn may_take(&self) -> bool {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.live > 0
            && state.paused_until.is_none_or(|t| t <= Instant::now())
            && state.held < self.fair(state.live)
    }

    /// Whether this instance should give one bind up now: it holds more than its share.
    /// Decided under the lock, so that of several binds held one at a time gives up.
    fn should_give_up(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if state.live == 0
            || state.paused_until.is_some_and(|t| t > now)
            || state.held <= self.fair(state.live)
        {
            return false;
        }
        state.paused_until = Some(now + PAUSE);
        true
    }

    fn update(&self, change: impl FnOnce(&mut ShareState)) {
        change(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner));
    }
}

impl PgLinkOwnership {
    pub fn new(pool: PgPool) -> PgLinkOwnership {
        PgLinkOwnership {
            options: (*pool.connect_options()).clone(),
            carriers: Mutex::new(HashMap::new()),
        }
    }

    /// The carrier's share; the first call starts announcing this instance's presence.
    fn share(&self, carrier: &str, binds: usize, stop: &CancellationToken) -> Arc<Share> {
        let mut carriers = self.carriers.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(share) = carriers.get(carrier) {
            return share.clone();
        }
        let share = Arc::new(Share {
            binds,
            state: Mutex::new(ShareState::default()),
        });
        carriers.insert(carrier.to_owned(), share.clone());
        tokio::spawn(presence(
            self.options.clone(),
            carrier.to_owned(),
            share.clone(),
            stop.clone(),
        ));
        share
    }

    async fn try_acquire(
        &self,
        key: &str,
        carrier: &str,
        index: usize,
        share: &Arc<Share>,
    ) -> Result<Option<LinkHold>, sqlx::Error> {
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
        share.update(|s| s.held += 1);
        let hold = LinkHold {
            lost: CancellationToken::new(),
            yielded: CancellationToken::new(),
            release: Box::new(()),
        };
        let release = CancellationToken::new();
        tokio::spawn(keep(
            conn,
            Kept {
                carrier: carrier.to_owned(),
                index,
                share: share.clone(),
                lost: hold.lost.clone(),
                yielded: hold.yielded.clone(),
                release: release.clone(),
            },
        ));
        Ok(Some(LinkHold {
            release: Box::new(release.drop_guard()),
            ..hold
        }))
    }
}

#[async_trait]
impl LinkOwnership for PgLinkOwnership {
    async fn acquire(
        &self,
        carrier: &str,
        index: usize,
        binds: usize,
        stop: &CancellationToken,
    ) -> Option<LinkHold> {
        let share = self.share(carrier, binds, stop);
        let key = format!("smsgw bind {carrier}/{index}");
        loop {
            if share.may_take() {
                match self.try_acquire(&key, carrier, index, &share).await {
                    Ok(Some(hold)) => return Some(hold),
                    Ok(None) => {}
                    Err(error) => {
                        warn!(carrier, bind = index, %error, "cannot ask PostgreSQL for the bind");
                    }
                }
            }
            tokio::select! {
                () = tokio::time::sleep(RETRY) => {}
                () = stop.cancelled() => return None,
            }
        }
    }
}

/// Holds this instance's presence lock on `carrier` until `stop`, and counts the live
/// instances into `share`. A broken connection is made again: meanwhile the others count
/// this instance out, and it keeps the last count.
async fn presence(
    options: PgConnectOptions,
    carrier: String,
    share: Arc<Share>,
    stop: CancellationToken,
) {
    let mut reported = false;
    loop {
        let error = match present(&options, &carrier, &share, &stop).await {
            Ok(()) => return,
            Err(error) => error,
        };
        if !reported {
            // Once per outage: the retries would say the same every few seconds.
            warn!(%carrier, %error, "cannot count the instances sharing the carrier's binds");
            reported = true;
        }
        tokio::select! {
            () = tokio::time::sleep(RETRY) => {}
            () = stop.cancelled() => return,
        }
    }
}

async fn present(
    options: &PgConnectOptions,
    carrier: &str,
    share: &Share,
    stop: &CancellationToken,
) -> Result<(), sqlx::Error> {
    let mut conn = PgConnection::connect_with(options).await?;
    sqlx::query("SELECT pg_advisory_lock_shared($1, hashtext($2))")
        .bind(PRESENCE_SPACE)
        .bind(carrier)
        .execute(&mut conn)
        .await?;
    let mut last = 0;
    loop {
        let live: i64 = sqlx::query_scalar(COUNT_LIVE)
            .bind(i64::from(PRESENCE_SPACE))
            .bind(carrier)
            .fetch_one(&mut conn)
            .await?;
        let live = usize::try_from(live).unwrap_or(1).max(1);
        if live != last {
            info!(carrier, live, "instances sharing the carrier's binds");
            last = live;
        }
        share.update(|s| s.live = live);
        tokio::select! {
            () = tokio::time::sleep(CHECK) => {}
            () = stop.cancelled() => {
                // Closing the session releases the presence lock.
                let _ = conn.close().await;
                return Ok(());
            }
        }
    }
}

/// What [`keep`] watches over.
struct Kept {
    carrier: String,
    index: usize,
    share: Arc<Share>,
    lost: CancellationToken,
    yielded: CancellationToken,
    release: CancellationToken,
}

/// Keeps the lock's connection open until the hold is released, says when it broke, and
/// when this instance holds more than its share of the carrier's binds, asks for this one to
/// be given up. The lock is kept until then: the session drains its window before the hold
/// is dropped, so no other instance runs the bind meanwhile.
async fn keep(mut conn: PgConnection, kept: Kept) {
    loop {
        tokio::select! {
            () = kept.release.cancelled() => {
                // Closing the session releases the lock.
                let _ = conn.close().await;
                break;
            }
            () = tokio::time::sleep(CHECK) => {
                if conn.execute("SELECT 1").await.is_err() {
                    kept.lost.cancel();
                    // The hold is still dropped by its owner; it counts until then.
                    kept.release.cancelled().await;
                    break;
                }
                if !kept.yielded.is_cancelled() && kept.share.should_give_up() {
                    info!(
                        carrier = %kept.carrier,
                        bind = kept.index,
                        "more than this instance's share of the carrier's binds; giving this one up"
                    );
                    kept.yielded.cancel();
                }
            }
        }
    }
    kept.share.update(|s| s.held = s.held.saturating_sub(1));
}
