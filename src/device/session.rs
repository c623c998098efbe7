//! One connection's loop, the same for every transport: tell the core the link is up, then
//! alternate between what is due (the core's timers, token renewal) and what arrives (the link's
//! `next`), writing what the core queued in between. It ends at renewal (after draining
//! acknowledgements), when the identity is told to stop (the same), when a command reboots the
//! device, or when the link fails.

use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::core::{Core, Ctx, End, Inbound};
use super::link::Link;

/// When a session must end on its own: at token renewal, or when the identity is told to stop.
pub struct Until<'a> {
    pub renew_at: Instant,
    pub cancel: &'a CancellationToken,
    /// How long a renewal or a stop waits for outstanding acknowledgements.
    pub grace: Duration,
}

/// Runs the connection until something ends it; what must outlive it stays in `core`.
pub async fn run<L: Link>(mut link: L, core: &mut Core, ctx: Ctx<'_>, until: Until<'_>) -> End {
    let Until { renew_at, cancel, grace } = until;
    let caps = link.caps();
    if let Some(end) = core.connected(ctx, &mut link, caps, Instant::now()) {
        core.connection_closed();
        return end;
    }
    let (end, polite) = 'session: loop {
        let now = Instant::now();
        if let Some(end) = core.tick(ctx, &mut link, now) {
            let _ = link.flush().await;
            break (end, true);
        }
        if now >= renew_at {
            drain(&mut link, core, ctx, grace).await;
            break (End::Renew, true);
        }
        // A module the fleet routes for also waits for what its siblings deliver (`device::edge`):
        // armed before the inbox is read, so a delivery in between still wakes the wait.
        let wake = core.arm_inbox(cancel);
        if wake.is_some()
            && let Some(end) = core.take_inputs(ctx, &mut link, now)
        {
            let _ = link.flush().await;
            break (end, true);
        }
        if let Err(c) = link.flush().await {
            break (c.into(), false);
        }
        let deadline = core.next_deadline().map_or(renew_at, |d| d.min(renew_at));
        let mut next = link.next(deadline, wake.as_ref().unwrap_or(cancel)).await;
        // Everything already read is handled before the next write, so one wake-up that brings
        // many acknowledgements costs one write.
        loop {
            match next {
                Err(c) => break 'session (c.into(), false),
                Ok(Some(ev)) => {
                    if let Some(end) = core.inbound(ctx, &mut link, ev, Instant::now()) {
                        let _ = link.flush().await;
                        break 'session (end, true);
                    }
                    next = link.try_next();
                }
                Ok(None) => break,
            }
        }
        if cancel.is_cancelled() {
            drain(&mut link, core, ctx, grace).await;
            break (End::Shutdown, true);
        }
    };
    core.connection_closed();
    if polite {
        link.close().await;
    }
    end
}

/// Sends what is queued, then waits up to `grace` for outstanding acknowledgements. Only
/// acknowledgements are handled meanwhile: the device is on its way out.
async fn drain<L: Link>(link: &mut L, core: &mut Core, ctx: Ctx<'_>, grace: Duration) {
    let deadline = Instant::now() + grace;
    // Nobody cancels a drain: it ends by itself at the deadline.
    let never = CancellationToken::new();
    while !core.drained() {
        core.pump(ctx, link);
        if tokio::time::timeout_at(deadline, link.flush()).await.map_or(true, |r| r.is_err()) {
            return;
        }
        match link.next(deadline, &never).await {
            Ok(Some(ev @ (Inbound::Acked(_) | Inbound::Rejected(_)))) => {
                core.inbound(ctx, link, ev, Instant::now());
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return,
        }
    }
}
