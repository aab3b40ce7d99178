//! etcd v3 as the cluster store. Reads and transactions share one client that is
//! rebuilt after a failure; the watch and the lease each run their own loop with
//! their own connection, so a stalled watch cannot starve the keep-alive. Short
//! gRPC keep-alives notice a cut underlay within about two seconds; every reconnect
//! starts with a fresh full read, so nothing missed while away is lost. TLS and
//! credentials come from `etcd_credentials`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare as EtcdCompare, CompareOp, ConnectOptions, DeleteOptions, GetOptions,
    PutOptions, Txn as EtcdTxn, TxnOp, WatchOptions,
};
use tokio::sync::{mpsc, watch, Mutex};
use tracing::{info, warn};

use super::etcd_credentials::{EtcdCredentials, Security};
use super::{Change, Compare, Loaded, Result, Store, StoreError, StoreEvent, StoreHealth, Txn};

/// Pause between reconnect attempts.
const RETRY: Duration = Duration::from_millis(250);
/// How long a TLS problem explains later failures that say less.
const TLS_PROBLEM_STANDS: Duration = Duration::from_secs(5);

pub struct EtcdStore {
    inner: Arc<Inner>,
}

struct Inner {
    endpoints: Vec<String>,
    prefix: String,
    security: Security,
    /// The last TLS problem seen and when: the reason given for the broken
    /// connections that follow it for a while (they say less).
    tls_problem: std::sync::Mutex<Option<(String, Instant)>>,
    client: Mutex<Option<Client>>,
    health: watch::Sender<StoreHealth>,
}

impl EtcdStore {
    /// Reads the credentials' files (an error names the bad one); connects later,
    /// on first use.
    pub async fn new(
        endpoints: Vec<String>,
        prefix: String,
        credentials: &EtcdCredentials,
    ) -> Result<Self> {
        let security = credentials.load().await?;
        let (health, _) = watch::channel(StoreHealth {
            kind: "etcd".into(),
            location: endpoints.join(","),
            connected: false,
            error: Some("not connected yet".into()),
            transport: Some(credentials.transport()),
            reconnects: 0,
            ever_connected: false,
        });
        Ok(EtcdStore {
            inner: Arc::new(Inner {
                endpoints,
                prefix,
                security,
                tls_problem: std::sync::Mutex::new(None),
                client: Mutex::new(None),
                health,
            }),
        })
    }
}

impl Inner {
    async fn connect(&self) -> std::result::Result<Client, etcd_client::Error> {
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_millis(500))
            .with_timeout(Duration::from_secs(1))
            .with_keep_alive(Duration::from_secs(1), Duration::from_secs(1))
            .with_keep_alive_while_idle(true);
        Client::connect(&self.endpoints, Some(self.security.apply(options))).await
    }

    fn explain(&self, e: &etcd_client::Error) -> String {
        let said = self.security.explain(e);
        let mut tls = self.tls_problem.lock().unwrap();
        if said.tls {
            *tls = Some((said.text.clone(), Instant::now()));
            return said.text;
        }
        match &*tls {
            Some((text, at)) if at.elapsed() < TLS_PROBLEM_STANDS => text.clone(),
            _ => said.text,
        }
    }

    fn unreachable(&self, e: &etcd_client::Error) -> StoreError {
        let reason = self.explain(e);
        self.set_health(false, Some(reason.clone()));
        StoreError::Unreachable {
            endpoint: self.endpoints.join(","),
            reason,
        }
    }

    fn set_health(&self, connected: bool, error: Option<String>) {
        if connected {
            *self.tls_problem.lock().unwrap() = None;
        }
        self.health.send_if_modified(|h| {
            let changed = h.connected != connected || (!connected && h.error != error);
            if connected && !h.connected {
                h.reconnects += u64::from(h.ever_connected);
                h.ever_connected = true;
            }
            h.connected = connected;
            h.error = if connected { None } else { error };
            changed
        });
    }

    /// Runs one call on the shared client; a failed call drops the client so the
    /// next one reconnects.
    async fn with_client<T, F>(&self, call: F) -> Result<T>
    where
        F: AsyncFnOnce(&mut Client) -> std::result::Result<T, etcd_client::Error>,
    {
        let mut slot = self.client.lock().await;
        if slot.is_none() {
            *slot = Some(self.connect().await.map_err(|e| self.unreachable(&e))?);
        }
        match call(slot.as_mut().expect("connected above")).await {
            Ok(v) => Ok(v),
            Err(e) => {
                *slot = None;
                Err(self.unreachable(&e))
            }
        }
    }

    fn key(&self, k: &str) -> String {
        format!("{}{k}", self.prefix)
    }

    fn strip(&self, k: &[u8]) -> Option<String> {
        std::str::from_utf8(k)
            .ok()?
            .strip_prefix(&self.prefix)
            .map(str::to_owned)
    }

    async fn load_with(
        &self,
        client: &mut Client,
    ) -> std::result::Result<Loaded, etcd_client::Error> {
        let resp = client
            .get(
                self.prefix.as_bytes(),
                Some(GetOptions::new().with_prefix()),
            )
            .await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let pairs = resp
            .kvs()
            .iter()
            .filter_map(|kv| Some((self.strip(kv.key())?, kv.value().to_vec())))
            .collect();
        Ok(Loaded { revision, pairs })
    }

    /// One watch session: full read, then changes until the stream fails.
    async fn watch_once(&self, tx: &mpsc::Sender<StoreEvent>) -> std::result::Result<(), String> {
        let e = |e: etcd_client::Error| self.explain(&e);
        let mut client = self.connect().await.map_err(e)?;
        let loaded = self.load_with(&mut client).await.map_err(e)?;
        let from = loaded.revision + 1;
        if tx.send(StoreEvent::Reset(loaded)).await.is_err() {
            return Ok(());
        }
        self.set_health(true, None);
        let options = WatchOptions::new().with_prefix().with_start_revision(from);
        let mut stream = client
            .watch(self.prefix.as_bytes(), Some(options))
            .await
            .map_err(e)?;
        loop {
            match stream.message().await {
                Ok(Some(resp)) => {
                    if resp.canceled() {
                        return Err(format!("watch canceled: {}", resp.cancel_reason()));
                    }
                    let changes: Vec<Change> = resp
                        .events()
                        .iter()
                        .filter_map(|ev| {
                            let kv = ev.kv()?;
                            let key = self.strip(kv.key())?;
                            let value = match ev.event_type() {
                                etcd_client::EventType::Put => Some(kv.value().to_vec()),
                                etcd_client::EventType::Delete => None,
                            };
                            Some(Change { key, value })
                        })
                        .collect();
                    if !changes.is_empty() && tx.send(StoreEvent::Changes(changes)).await.is_err() {
                        return Ok(());
                    }
                }
                Ok(None) => return Err("watch stream ended".into()),
                Err(err) => return Err(e(err)),
            }
        }
    }

    /// One lease session: grant, write the key under it, keep it alive until the
    /// lease is gone (outage longer than the TTL) or the connection fails.
    async fn lease_once(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
    ) -> std::result::Result<(), String> {
        let e = |e: etcd_client::Error| self.explain(&e);
        let mut client = self.connect().await.map_err(e)?;
        let secs = ttl.as_secs().max(1) as i64;
        let lease = client.lease_grant(secs, None).await.map_err(e)?;
        client
            .put(
                self.key(key),
                value.to_vec(),
                Some(PutOptions::new().with_lease(lease.id())),
            )
            .await
            .map_err(e)?;
        info!(
            key,
            lease = lease.id(),
            ttl_secs = secs,
            "registered in etcd"
        );
        self.set_health(true, None);
        let (mut keeper, mut stream) = client.lease_keep_alive(lease.id()).await.map_err(e)?;
        // Three keep-alives per TTL at least, and never less than one a second.
        let period = (ttl / 3).min(Duration::from_secs(1));
        loop {
            keeper.keep_alive().await.map_err(e)?;
            match tokio::time::timeout(period.max(Duration::from_millis(500)), stream.message())
                .await
            {
                Ok(Ok(Some(resp))) if resp.ttl() > 0 => {}
                Ok(Ok(Some(_))) => return Err("lease expired; registering again".into()),
                Ok(Ok(None)) => return Err("keep-alive stream ended".into()),
                Ok(Err(err)) => return Err(e(err)),
                Err(_) => return Err("keep-alive got no answer in time".into()),
            }
            tokio::time::sleep(period).await;
        }
    }
}

impl Store for EtcdStore {
    async fn load(&self) -> Result<Loaded> {
        let inner = &self.inner;
        inner.with_client(async |c| inner.load_with(c).await).await
    }

    async fn txn(&self, txn: Txn) -> Result<bool> {
        let inner = &self.inner;
        let when: Vec<EtcdCompare> = txn
            .when
            .iter()
            .map(|c| match c {
                Compare::Absent(k) => {
                    EtcdCompare::create_revision(inner.key(k), CompareOp::Equal, 0)
                }
                Compare::Value(k, v) => {
                    EtcdCompare::value(inner.key(k), CompareOp::Equal, v.clone())
                }
            })
            .collect();
        let mut ops: Vec<TxnOp> = Vec::new();
        for p in &txn.delete_prefix {
            ops.push(TxnOp::delete(
                inner.key(p),
                Some(DeleteOptions::new().with_prefix()),
            ));
        }
        for k in &txn.delete {
            ops.push(TxnOp::delete(inner.key(k), None));
        }
        for (k, v) in &txn.put {
            ops.push(TxnOp::put(inner.key(k), v.clone(), None));
        }
        let request = EtcdTxn::new().when(when).and_then(ops);
        inner
            .with_client(async |c| c.txn(request).await.map(|r| r.succeeded()))
            .await
    }

    fn watch(&self) -> mpsc::Receiver<StoreEvent> {
        let (tx, rx) = mpsc::channel(256);
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let mut said = Said::default();
            loop {
                if let Err(reason) = inner.watch_once(&tx).await {
                    if said.is_new(&reason) {
                        warn!(endpoint = %inner.endpoints.join(","), %reason, "etcd watch lost; reconnecting");
                    }
                    inner.set_health(false, Some(reason));
                }
                if tx.is_closed() {
                    return;
                }
                tokio::time::sleep(RETRY).await;
            }
        });
        rx
    }

    fn register(&self, key: String, value: Vec<u8>, ttl: Duration) {
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let mut said = Said::default();
            loop {
                if let Err(reason) = inner.lease_once(&key, &value, ttl).await {
                    if said.is_new(&reason) {
                        warn!(endpoint = %inner.endpoints.join(","), %reason, "etcd lease lost; registering again");
                    }
                    inner.set_health(false, Some(reason));
                }
                tokio::time::sleep(RETRY).await;
            }
        });
    }

    fn health(&self) -> watch::Receiver<StoreHealth> {
        self.inner.health.subscribe()
    }
}

/// A retry loop's memory of what it last logged: the same failure four times a
/// second is said again only every `SAY_AGAIN`.
#[derive(Default)]
struct Said {
    last: Option<(String, Instant)>,
}

const SAY_AGAIN: Duration = Duration::from_secs(30);

impl Said {
    fn is_new(&mut self, reason: &str) -> bool {
        let fresh = match &self.last {
            Some((r, at)) => r != reason || at.elapsed() >= SAY_AGAIN,
            None => true,
        };
        if fresh {
            self.last = Some((reason.to_owned(), Instant::now()));
        }
        fresh
    }
}
