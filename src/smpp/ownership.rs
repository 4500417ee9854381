//! Who may run a bind. With several instances sharing one queue, each bind of a carrier (the
//! carrier agreed to that many sessions) runs in one instance at a time; the others wait and
//! take it over when its owner stops or dies.

use std::sync::Arc;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::session;

#[async_trait]
pub trait LinkOwnership: Send + Sync + 'static {
    /// Waits until this instance holds bind `index` of the `binds` of `carrier`; None once
    /// `stop` fires.
    async fn acquire(
        &self,
        carrier: &str,
        index: usize,
        binds: usize,
        stop: &CancellationToken,
    ) -> Option<LinkHold>;
}

/// A bind this instance holds: until `lost` fires (the hold could not be kept), `yielded`
/// fires (another instance should run it: this one holds more than its share) or this is
/// dropped (the bind is given up). The hold lasts until dropped, so that the session drains
/// its window before another instance may bind.
pub struct LinkHold {
    pub lost: CancellationToken,
    pub yielded: CancellationToken,
    /// Gives the bind up when dropped.
    pub release: Box<dyn Send + Sync>,
}

/// Runs bind `index` (of `binds`) of a carrier whenever this instance holds it: the session
/// stops (drains its window and unbinds) when the hold is lost or yielded, and waits to get it
/// back.
pub(super) async fn run_owned(
    owner: Arc<dyn LinkOwnership>,
    carrier: String,
    index: usize,
    binds: usize,
    shutdown: CancellationToken,
    bind: impl Fn(CancellationToken) -> session::Bind,
) {
    while let Some(hold) = owner.acquire(&carrier, index, binds, &shutdown).await {
        info!(carrier, bind = index, "this instance holds the bind");
        let stop = shutdown.child_token();
        let (lost, yielded) = (hold.lost.clone(), hold.yielded.clone());
        let watch = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = lost.cancelled() => watch.cancel(),
                () = yielded.cancelled() => watch.cancel(),
                () = watch.cancelled() => {}
            }
        });
        session::run(bind(stop.clone())).await;
        stop.cancel();
        let yielded = hold.yielded.is_cancelled() && !hold.lost.is_cancelled();
        // Only now, with the window drained and the session unbound, may another instance bind.
        drop(hold);
        if shutdown.is_cancelled() {
            return;
        }
        if yielded {
            info!(
                carrier,
                bind = index,
                "gave the bind up to another instance"
            );
            continue;
        }
        warn!(
            carrier,
            bind = index,
            "the hold on the bind was lost; waiting to get it back"
        );
    }
}
