//! Requests each client address has open at the inbound concurrency limit, so one address
//! (a hostile local process, a caller sending slowly) can hold at most its share of the slots
//! (`inbound.max_client_share`); its further requests wait in the queue like any other, and
//! the other callers keep the rest. The address is looked up once per connection; a request
//! pays one atomic add.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use tokio::sync::Notify;

/// Every client address with a connection open, by address.
#[derive(Debug, Default)]
pub struct Clients {
    by_addr: Mutex<HashMap<IpAddr, Weak<Client>>>,
}

/// One client address's open requests; shared by its connections.
#[derive(Debug, Default)]
pub struct Client {
    open: AtomicU32,
    freed: Notify,
}

/// A request of `Client` holding a slot; dropping it gives the place back.
#[derive(Debug)]
pub struct ClientPermit(Arc<Client>);

// === impl Clients ===

impl Clients {
    /// The entry for `ip`, shared with its other connections. Called once per connection.
    pub fn get(&self, ip: IpAddr) -> Arc<Client> {
        let mut by_addr = self.by_addr.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(client) = by_addr.get(&ip).and_then(Weak::upgrade) {
            return client;
        }
        // Addresses whose connections have all closed leave as others arrive.
        if by_addr.len() >= 64 && by_addr.len().is_power_of_two() {
            by_addr.retain(|_, c| c.strong_count() > 0);
        }
        let client = Arc::new(Client::default());
        by_addr.insert(ip, Arc::downgrade(&client));
        client
    }
}

// === impl Client ===

impl Client {
    /// A place if the address has fewer than `max` requests holding slots.
    pub fn try_take(self: &Arc<Self>, max: u32) -> Option<ClientPermit> {
        if self.open.fetch_add(1, Ordering::AcqRel) < max {
            return Some(ClientPermit(self.clone()));
        }
        // Undoing this add frees nothing another request was waiting for.
        self.open.fetch_sub(1, Ordering::AcqRel);
        None
    }

    /// Waits until the address is below `max`.
    pub async fn take(self: &Arc<Self>, max: u32) -> ClientPermit {
        loop {
            let freed = self.freed.notified();
            if let Some(permit) = self.try_take(max) {
                return permit;
            }
            freed.await;
        }
    }
}

impl Drop for ClientPermit {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        // Lock-free while nobody waits.
        self.0.freed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Polls `fut` once: whether it is still waiting.
    async fn pending<F: std::future::Future>(mut fut: std::pin::Pin<&mut F>) -> bool {
        std::future::poll_fn(|cx| std::task::Poll::Ready(fut.as_mut().poll(cx).is_pending())).await
    }

    #[tokio::test]
    async fn an_address_gets_at_most_its_share_and_waits_for_its_own_requests() {
        let clients = Clients::default();
        let a = clients.get([127, 0, 0, 2].into());
        // Another connection from the same address shares the count.
        let a2 = clients.get([127, 0, 0, 2].into());
        let first = a.try_take(2).unwrap();
        let _second = a2.try_take(2).unwrap();
        assert!(a.try_take(2).is_none());
        // Another address is not affected.
        assert!(clients.get([127, 0, 0, 3].into()).try_take(2).is_some());
        let mut waiting = std::pin::pin!(a.take(2));
        assert!(pending(waiting.as_mut()).await);
        drop(first);
        waiting.await;
    }
}
