//! etcd v3 as the cluster store. Reads and transactions share one client that is
//! rebuilt after a failure; the watch and the lease each run their own loop with
//! their own connection, so a stalled watch cannot starve the keep-alive. Short
//! gRPC keep-alives notice a cut underlay within about four seconds. A reconnecting
//! watch resumes after the last revision it delivered (etcd replays what was missed),
//! and reads everything again only when that history was compacted away; a
//! reconnecting lease keeps its lease while etcd still has it. So an etcd restart
//! costs each agent a watch and a keep-alive, not a full read and a node-key write
//! seen by every other agent. TLS and credentials come from `etcd_credentials`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare as EtcdCompare, CompareOp, ConnectOptions, DeleteOptions, GetOptions,
    LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn as EtcdTxn, TxnOp, WatchOptions,
};
use tokio::sync::{mpsc, watch, Mutex};
use tracing::{info, warn};

use super::backoff::Backoff;
use super::etcd_credentials::{EtcdCredentials, Security};
use super::{Change, Compare, Loaded, Result, Store, StoreError, StoreEvent, StoreHealth, Txn};

/// The longest a request may take.
const REQUEST_LIMIT: Duration = Duration::from_secs(5);
/// Keys per page of a full read: 200 of the largest records a check lets through
/// (16 KiB) stay under gRPC's 4 MiB message limit.
const PAGE_KEYS: i64 = 200;
/// A session that lasted this long worked: the next reconnect starts with a short pause.
const SESSION_WORKED: Duration = Duration::from_secs(5);
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
            // A busy etcd answers a write in over a second at times (seen with a
            // hundred agents); a dead connection is noticed by the keep-alives, so a
            // long request limit costs nothing when etcd is gone.
            .with_timeout(REQUEST_LIMIT)
            // A cut underlay is noticed within some four seconds; a shorter answer
            // limit dropped healthy connections of a busy etcd (a hundred agents).
            .with_keep_alive(Duration::from_secs(1), Duration::from_secs(3))
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

    /// Everything under the prefix at one revision, read in pages: one response
    /// holding a large cluster would pass gRPC's 4 MiB message limit (100,000
    /// endpoints are some 30 MB), and the pages, pinned to the first page's
    /// revision, read one consistent picture.
    async fn load_with(
        &self,
        client: &mut Client,
    ) -> std::result::Result<Loaded, etcd_client::Error> {
        let end = prefix_end(self.prefix.as_bytes());
        let mut from = self.prefix.as_bytes().to_vec();
        if from.is_empty() {
            from.push(0);
        }
        let mut revision = 0;
        let mut pairs = Vec::new();
        loop {
            let mut options = GetOptions::new()
                .with_range(end.clone())
                .with_limit(PAGE_KEYS);
            if revision > 0 {
                options = options.with_revision(revision);
            }
            let resp = client.get(from.clone(), Some(options)).await?;
            if revision == 0 {
                revision = resp.header().map_or(0, |h| h.revision());
            }
            pairs.extend(
                resp.kvs()
                    .iter()
                    .filter_map(|kv| Some((self.strip(kv.key())?, kv.value().to_vec()))),
            );
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
        Ok(Loaded { revision, pairs })
    }

    /// One watch session: a full read unless `resumed` names the last revision
    /// delivered, then changes until the stream fails. `resumed` follows what was
    /// delivered, for the next session.
    async fn watch_once(
        &self,
        tx: &mpsc::Sender<StoreEvent>,
        resumed: &mut Option<i64>,
    ) -> std::result::Result<(), String> {
        let e = |e: etcd_client::Error| self.explain(&e);
        let mut client = self.connect().await.map_err(e)?;
        // etcd restored from a snapshot may be behind what was delivered: a watch
        // from there would wait for revisions that mean other writes now.
        if let Some(last) = *resumed {
            let probe = GetOptions::new().with_count_only();
            let now = client
                .get(self.prefix.as_bytes(), Some(probe))
                .await
                .map_err(e)?;
            if now.header().map_or(0, |h| h.revision()) < last {
                *resumed = None;
            }
        }
        let from = match *resumed {
            Some(last) => last + 1,
            None => {
                let loaded = self.load_with(&mut client).await.map_err(e)?;
                let last = loaded.revision;
                if tx.send(StoreEvent::Reset(loaded)).await.is_err() {
                    return Ok(());
                }
                *resumed = Some(last);
                last + 1
            }
        };
        let options = WatchOptions::new().with_prefix().with_start_revision(from);
        let mut stream = client
            .watch(self.prefix.as_bytes(), Some(options))
            .await
            .map_err(e)?;
        self.set_health(true, None);
        loop {
            match stream.message().await {
                Ok(Some(resp)) => {
                    if resp.compact_revision() > 0 {
                        // The history since `from` is gone: only a full read is whole.
                        *resumed = None;
                        return Err(format!(
                            "etcd compacted its history past revision {from}; reading the store again"
                        ));
                    }
                    if resp.canceled() {
                        return Err(format!("watch canceled: {}", resp.cancel_reason()));
                    }
                    let mut last = None;
                    let changes: Vec<Change> = resp
                        .events()
                        .iter()
                        .filter_map(|ev| {
                            let kv = ev.kv()?;
                            last = last.max(Some(kv.mod_revision()));
                            let key = self.strip(kv.key())?;
                            let value = match ev.event_type() {
                                etcd_client::EventType::Put => Some(kv.value().to_vec()),
                                etcd_client::EventType::Delete => None,
                            };
                            Some(Change { key, value })
                        })
                        .collect();
                    if let (false, Some(revision)) = (changes.is_empty(), last) {
                        let event = StoreEvent::Changes { revision, changes };
                        if tx.send(event).await.is_err() {
                            return Ok(());
                        }
                    }
                    if last.is_some() {
                        *resumed = last.max(*resumed);
                    }
                }
                Ok(None) => return Err("watch stream ended".into()),
                Err(err) => return Err(e(err)),
            }
        }
    }

    /// The lease `id` kept alive again, if etcd still has it (None: it has not).
    async fn keep_lease(
        &self,
        client: &mut Client,
        id: i64,
        ttl: Duration,
    ) -> std::result::Result<Option<(LeaseKeeper, LeaseKeepAliveStream)>, etcd_client::Error> {
        // How etcd-client says etcd answered TTL 0: the lease is not there.
        let gone = |err: &etcd_client::Error| matches!(err, etcd_client::Error::LeaseKeepAliveError(m) if m == "lease not found");
        let (mut keeper, mut stream) = match client.lease_keep_alive(id).await {
            Ok(pair) => pair,
            Err(err) if gone(&err) => return Ok(None),
            Err(err) => return Err(err),
        };
        let answer = async {
            keeper.keep_alive().await?;
            stream.message().await
        };
        match tokio::time::timeout(ttl / 2, answer).await {
            Ok(Ok(Some(resp))) if resp.ttl() > 0 => Ok(Some((keeper, stream))),
            Ok(Ok(Some(_))) => Ok(None),
            Ok(Ok(None)) => Err(etcd_client::Error::LeaseKeepAliveError(
                "keep-alive stream ended".into(),
            )),
            Ok(Err(err)) if gone(&err) => Ok(None),
            Ok(Err(err)) => Err(err),
            Err(_) => Err(etcd_client::Error::LeaseKeepAliveError(
                "keep-alive got no answer in time".into(),
            )),
        }
    }

    /// One lease session: keep the lease of the last session if etcd still has it
    /// (an etcd restart keeps leases), or grant one and write the key under it; then
    /// keep it alive until the lease is gone (outage longer than the TTL) or the
    /// connection fails. `lease` follows the lease in use, for the next session.
    async fn lease_once(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
        lease: &mut Option<i64>,
    ) -> std::result::Result<(), String> {
        let e = |e: etcd_client::Error| self.explain(&e);
        let mut client = self.connect().await.map_err(e)?;
        let secs = ttl.as_secs().max(1) as i64;
        let kept = match *lease {
            Some(id) => match self.keep_lease(&mut client, id, ttl).await {
                Ok(Some(kept)) => Some((id, kept.0, kept.1)),
                // etcd no longer has it: a new lease, and the key written under it.
                Ok(None) => {
                    *lease = None;
                    None
                }
                // etcd not answering yet (still starting, say): the lease may well
                // live on, so it is tried again next time rather than replaced.
                Err(err) => return Err(e(err)),
            },
            None => None,
        };
        let (id, mut keeper, mut stream) = match kept {
            Some(kept) => {
                // The key may have been deleted meanwhile (by hand, say): it is
                // written again under the kept lease, as a new lease would have it.
                let held = client.get(self.key(key), None).await.map_err(e)?;
                if held.kvs().first().is_none_or(|kv| kv.lease() != kept.0) {
                    client
                        .put(
                            self.key(key),
                            value.to_vec(),
                            Some(PutOptions::new().with_lease(kept.0)),
                        )
                        .await
                        .map_err(e)?;
                }
                *lease = Some(kept.0);
                kept
            }
            None => {
                let granted = client.lease_grant(secs, None).await.map_err(e)?;
                client
                    .put(
                        self.key(key),
                        value.to_vec(),
                        Some(PutOptions::new().with_lease(granted.id())),
                    )
                    .await
                    .map_err(e)?;
                info!(
                    key,
                    lease = granted.id(),
                    ttl_secs = secs,
                    "registered in etcd"
                );
                *lease = Some(granted.id());
                let (keeper, stream) = client.lease_keep_alive(granted.id()).await.map_err(e)?;
                (granted.id(), keeper, stream)
            }
        };
        self.set_health(true, None);
        // Three keep-alives per TTL at least, and never less than one a second.
        let period = (ttl / 3).min(Duration::from_secs(1));
        loop {
            keeper.keep_alive().await.map_err(e)?;
            // Half the TTL for an answer: a slow answer is not a lost lease, and
            // giving up early means a new connection, which a busy etcd can afford least.
            match tokio::time::timeout((ttl / 2).max(period), stream.message()).await {
                Ok(Ok(Some(resp))) if resp.ttl() > 0 => {}
                Ok(Ok(Some(_))) => {
                    *lease = None;
                    return Err(format!("lease {id} expired; registering again"));
                }
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

    async fn txn(&self, txn: Txn) -> Result<Option<i64>> {
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
            .with_client(async |c| {
                c.txn(request).await.map(|r| {
                    r.succeeded()
                        .then(|| r.header().map_or(0, |h| h.revision()))
                })
            })
            .await
    }

    fn watch(&self) -> mpsc::Receiver<StoreEvent> {
        let (tx, rx) = mpsc::channel(256);
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let mut said = Said::default();
            let mut backoff = Backoff::default();
            let mut resumed = None;
            loop {
                let started = Instant::now();
                if let Err(reason) = inner.watch_once(&tx, &mut resumed).await {
                    if said.is_new(&reason) {
                        warn!(endpoint = %inner.endpoints.join(","), %reason, "etcd watch lost; reconnecting");
                    }
                    inner.set_health(false, Some(reason));
                }
                if tx.is_closed() {
                    return;
                }
                if started.elapsed() > SESSION_WORKED {
                    backoff.succeeded();
                }
                tokio::time::sleep(backoff.next_pause()).await;
            }
        });
        rx
    }

    fn register(&self, key: String, value: Vec<u8>, ttl: Duration) {
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let mut said = Said::default();
            let mut backoff = Backoff::default();
            let mut lease = None;
            loop {
                let started = Instant::now();
                if let Err(reason) = inner.lease_once(&key, &value, ttl, &mut lease).await {
                    if said.is_new(&reason) {
                        warn!(endpoint = %inner.endpoints.join(","), %reason, "etcd lease lost; registering again");
                    }
                    inner.set_health(false, Some(reason));
                }
                if started.elapsed() > SESSION_WORKED {
                    backoff.succeeded();
                }
                tokio::time::sleep(backoff.next_pause()).await;
            }
        });
    }

    fn health(&self) -> watch::Receiver<StoreHealth> {
        self.inner.health.subscribe()
    }
}

/// The end of the key range holding every key that starts with `prefix`, as etcd
/// defines it: the prefix with its last byte below 0xff incremented; `\0` (no end)
/// when there is none.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
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

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn the_range_of_a_prefix_ends_where_etcd_says() {
        assert_eq!(prefix_end(b"/netagent/"), b"/netagent0".to_vec());
        assert_eq!(prefix_end(b"a\xff\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
        assert_eq!(prefix_end(b""), vec![0]);
    }
}
