//! Wires a sidecar together: state, listeners, stacks, admin and background tasks.

use crate::admin::Admin;
use crate::bootstrap::{Bootstrap, InboundMode};
use crate::drain::Drain;
use crate::health::{AppProbe, Health};
use crate::outbound::pool::Pools;
use crate::serve::{server_builder, Accept};
use crate::snapshot_file::SnapshotFile;
use crate::state::State;
use crate::{inbound, metrics, outbound};
use mesh_config::{LoadError, Snapshot};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Where the sidecar actually listens (ports may have been chosen by the OS).
#[derive(Clone, Copy, Debug)]
pub struct BoundAddrs {
    pub outbound: SocketAddr,
    pub inbound: Option<SocketAddr>,
    pub admin: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Snapshot(#[from] LoadError),
    #[error("{0}")]
    Trace(#[from] crate::trace::export::ExportError),
    #[error("{0}")]
    Consul(String),
    #[error("{0}")]
    ControlChannel(#[from] crate::control_channel::ChannelSetupError),
    #[error("cannot listen on {addr} ({listener}): {source}")]
    Bind {
        listener: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A started sidecar. Dropping it leaves the tasks running; call [`Running::shutdown`].
#[derive(Debug)]
pub struct Running {
    addrs: BoundAddrs,
    drain: Drain,
    grace: Duration,
    state: Arc<State>,
    stop: watch::Sender<bool>,
    registration: Option<Arc<crate::consul_register::Registration>>,
    upstreams: Vec<(String, SocketAddr)>,
    identity: Arc<crate::identity::Identity>,
}

/// Binds every listener, then serves in tasks on the current runtime.
pub async fn start(boot: Bootstrap) -> Result<Running, StartError> {
    let prometheus = metrics::install();
    let (initial, initial_text) = match &boot.snapshot.file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
                path: path.clone(),
                source,
            })?;
            (mesh_config::load::snapshot_str(path, &text)?, text)
        }
        None => (Snapshot::default(), String::new()),
    };
    // With a control process, its last snapshot (persisted) wins over the snapshot file.
    let persisted = boot
        .control
        .as_ref()
        .and_then(|c| c.persist.as_deref())
        .and_then(crate::control_client::load_persisted);
    let initial = persisted.unwrap_or(initial);
    let state = State::new(&boot.agent, boot.phase, initial);
    let tracer = match &boot.trace {
        Some(cfg) => Some(crate::trace::Tracer::start(&boot, cfg, &state)?),
        None => None,
    };

    let outbound_l = bind("outbound", boot.listen.outbound).await?;
    let inbound_l = match boot.listen.inbound {
        Some(addr) => Some(bind("inbound", addr).await?),
        None => None,
    };
    let admin_l = bind("admin", boot.listen.admin).await?;
    let mut upstream_ls = Vec::with_capacity(boot.upstreams.len());
    for up in &boot.upstreams {
        upstream_ls.push((up.service.clone(), bind("upstream", up.listen).await?));
    }
    let upstreams: Vec<(String, SocketAddr)> = upstream_ls
        .iter()
        .map(|(service, l)| (service.clone(), local_addr(l)))
        .collect();
    if let Some(port) = boot.listen.inbound.map(|a| a.port()) {
        // Agents' mesh ports are 10000-10599 by platform rule; 0 lets the OS pick (tests).
        if port != 0 && !(10000..=10599).contains(&port) {
            tracing::warn!(
                port,
                "inbound port is outside the agents' range 10000-10599"
            );
        }
    }
    let addrs = BoundAddrs {
        outbound: local_addr(&outbound_l),
        inbound: inbound_l.as_ref().map(local_addr),
        admin: local_addr(&admin_l),
    };
    // Checked before anything serves: a definition for another agent or port fails the start.
    let registration = match (&boot.consul, addrs.inbound) {
        (Some(cfg), Some(inbound)) => Some(Arc::new(
            crate::consul_register::Registration::new(
                cfg,
                &boot.agent,
                boot.phase,
                inbound,
                addrs.admin,
            )
            .map_err(StartError::Consul)?,
        )),
        (Some(_), None) => {
            tracing::warn!("[consul] is set but there is no inbound listener to register");
            None
        }
        _ => None,
    };

    let (drain, watch) = Drain::new();
    let (stop, stopped) = watch::channel(false);
    let trust_domain = boot
        .identity
        .as_ref()
        .map_or("mesh", |i| i.trust_domain.as_str());
    let identity = crate::identity::Identity::new(trust_domain);
    // Only a sidecar with `[identity]` answers or dials mutual TLS.
    let tls = boot.identity.is_some().then(|| identity.clone());
    // The control channel's trust anchor is read now: a bad `ca_file` stops the start.
    let channel = match &boot.control {
        Some(c) => Some(Arc::new(crate::control_channel::Channel::new(
            c,
            tls.clone(),
        )?)),
        None => None,
    };
    let pools = match &tls {
        Some(id) => Pools::new(&boot.upstream).with_identity(id.clone()),
        None => Pools::new(&boot.upstream),
    };
    let pools = Arc::new(pools);
    let builder = server_builder(&boot.limits);
    let detect_timeout = boot.limits.header_read_timeout;

    let outbound = Accept {
        name: "outbound",
        listener: outbound_l,
        builder: builder.clone(),
        service: outbound::stack(&boot, state.clone(), pools.clone(), tracer.clone()),
        detect_timeout,
        tls: None,
        close_idle_after: boot.drain.close_idle_after,
        max_connections: boot.limits.max_connections,
    };
    tokio::spawn(outbound.run(watch.clone()));
    for (service, listener) in upstream_ls {
        let upstream = Accept {
            name: "upstream",
            listener,
            builder: builder.clone(),
            service: outbound::upstream_stack(
                &boot,
                &service,
                state.clone(),
                pools.clone(),
                tracer.clone(),
            ),
            detect_timeout,
            tls: None,
            close_idle_after: boot.drain.close_idle_after,
            max_connections: boot.limits.max_connections,
        };
        tokio::spawn(upstream.run(watch.clone()));
    }

    let mut app = None;
    let limit = inbound::concurrency::ConcurrencyLayer::new(&boot.inbound);
    tokio::spawn(limit.resizer().follow_budget(
        state.clone(),
        boot.inbound.max_concurrency,
        stopped.clone(),
    ));
    if let Some(listener) = inbound_l {
        let inbound = Accept {
            name: "inbound",
            listener,
            builder: builder.clone(),
            service: inbound::caller::CallerIdentity::new(
                inbound::authz::Authorize::new(
                    inbound::stack_with(
                        &boot,
                        &state,
                        pools.clone(),
                        limit.clone(),
                        tracer.clone(),
                    ),
                    state.clone(),
                    &boot.agent,
                ),
                identity.clone(),
            ),
            detect_timeout,
            tls: tls.clone(),
            close_idle_after: boot.drain.close_idle_after,
            max_connections: boot.limits.max_connections,
        };
        tokio::spawn(inbound.run(watch.clone()));
        let probe = Arc::new(AppProbe::default());
        tokio::spawn(
            probe
                .clone()
                .run(boot.inbound.app, Duration::from_secs(2), stopped.clone()),
        );
        app = Some((boot.inbound.app, probe));
    }
    drop(watch);

    if tls.is_some() {
        tokio::spawn(identity.clone().follow_mode(state.clone(), stopped.clone()));
    }
    let link = boot
        .control
        .as_ref()
        .map(|c| crate::health::ControlLink::new(&c.address));
    if let (Some(control), Some(channel), Some(link)) = (&boot.control, channel, &link) {
        if let Some(id) = &boot.identity {
            let renewer = crate::identity::renew::Renewer::new(
                channel.clone(),
                &boot.agent,
                id.clone(),
                identity.clone(),
            );
            tokio::spawn(renewer.run(stopped.clone()));
        }
        let client = crate::control_client::ControlClient::new(
            control.clone(),
            channel,
            &boot.agent,
            boot.phase,
            state.clone(),
        )
        .with_admin(addrs.admin, boot.inbound.mode == InboundMode::Ollama)
        .with_link(link.clone());
        let client = match &boot.identity {
            Some(id) => client.with_identity(id.token_file.clone(), identity.clone()),
            None => client,
        };
        tokio::spawn(client.run(stopped.clone()));
    } else if let Some(path) = &boot.snapshot.file {
        let source = SnapshotFile {
            path: path.clone(),
            every: boot.snapshot.poll_interval,
            state: state.clone(),
            current: initial_text,
        };
        tokio::spawn(source.run(stopped.clone()));
    }

    let health = Arc::new(Health {
        agent: boot.agent.clone(),
        phase: boot.phase,
        started: Instant::now(),
        addrs,
        app,
        state: state.clone(),
        draining: drain.draining(),
        control: link,
    });
    let admin = Admin { health, prometheus };
    tokio::spawn(admin.serve(admin_l, stopped.clone()));
    if let Some(reg) = &registration {
        let task = reg.clone();
        let stop = stopped.clone();
        tokio::spawn(async move { task.register(stop).await });
    }
    tokio::spawn(upkeep(prometheus, stopped));

    tracing::info!(
        agent = %boot.agent,
        phase = %boot.phase,
        outbound = %addrs.outbound,
        inbound = addrs.inbound.map(|a| a.to_string()),
        admin = %addrs.admin,
        upstreams = ?upstreams,
        snapshot_version = state.load().version(),
        "proxy ready"
    );
    Ok(Running {
        addrs,
        drain,
        grace: boot.drain.grace,
        state,
        stop,
        registration,
        upstreams,
        identity,
    })
}

impl Running {
    pub fn addrs(&self) -> &BoundAddrs {
        &self.addrs
    }

    /// Version of the snapshot in force; changes each time one is applied.
    pub fn snapshot_version(&self) -> watch::Receiver<u64> {
        self.state.versions()
    }

    /// Count of snapshots rejected so far.
    pub fn snapshot_rejections(&self) -> watch::Receiver<u64> {
        self.state.rejections()
    }

    /// Where each upstream port listens: (service, address), in bootstrap order.
    pub fn upstreams(&self) -> &[(String, SocketAddr)] {
        &self.upstreams
    }

    /// This sidecar's certificate in force (none without `[identity]`, or until the first).
    pub fn identity(&self) -> &Arc<crate::identity::Identity> {
        &self.identity
    }

    pub fn state(&self) -> &Arc<State> {
        &self.state
    }

    /// Stops accepting, lets requests in flight finish for up to the grace period, then stops
    /// the admin listener and background tasks.
    pub async fn shutdown(self) {
        // Rule 17: leave discovery first, so peers stop choosing this agent while it drains.
        if let Some(reg) = &self.registration {
            reg.deregister().await;
        }
        tracing::info!(grace_ms = self.grace.as_millis() as u64, "draining");
        if tokio::time::timeout(self.grace, self.drain.drain())
            .await
            .is_err()
        {
            tracing::warn!("grace period over with connections still open; closing them");
        }
        self.stop.send_replace(true);
        tracing::info!("drained");
    }
}

async fn bind(listener: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind {
            listener,
            addr,
            source,
        })
}

fn local_addr(l: &TcpListener) -> SocketAddr {
    l.local_addr().expect("a bound listener has an address")
}

/// Drains histogram buckets and samples memory even when nobody scrapes.
async fn upkeep(
    prometheus: &'static metrics_exporter_prometheus::PrometheusHandle,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        prometheus.run_upkeep();
        metrics::record_rss();
        metrics::record_log_drops();
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = crate::drain::stopped(&mut stop) => return,
        }
    }
}
