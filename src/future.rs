//! Small future helpers for the agent's and the uplink's `select!` loops.
//!
//! A leaf: imports nothing from the crate.

use std::future::Future;

/// Awaits the future in `slot` if there is one; pending forever while it is `None`,
/// which disables a `select!` arm on it without an `if` guard.
///
/// The future stays in `slot`: a `select!` that picks another arm cancels only this
/// wrapper, and the next turn resumes the same future. Once it has completed, the
/// caller sets `slot` to `None` (or to the next future) before calling this again.
pub async fn maybe<F: Future + Unpin>(slot: &mut Option<F>) -> F::Output {
    match slot {
        Some(future) => future.await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn some_resolves_to_its_output() {
        let mut slot = Some(Box::pin(async { 7 }));
        assert_eq!(maybe(&mut slot).await, 7);
    }

    #[tokio::test(start_paused = true)]
    async fn none_stays_pending() {
        let mut slot: Option<std::future::Ready<u8>> = None;
        let waited = tokio::time::timeout(Duration::from_secs(3600), maybe(&mut slot)).await;
        assert!(waited.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_wait_leaves_the_future_to_resume() {
        let mut slot = Some(Box::pin(async {
            tokio::time::sleep(Duration::from_secs(2)).await;
            "done"
        }));
        let first = tokio::time::timeout(Duration::from_secs(1), maybe(&mut slot)).await;
        assert!(first.is_err());
        assert!(slot.is_some());
        assert_eq!(maybe(&mut slot).await, "done");
    }
}
