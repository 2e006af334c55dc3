//! edgehose: an IoT edge gateway. MQTT in, a durable SQLite buffer, Firehose-style batches out.
//!
//! The data flow, in module order:
//!
//! 1. [`ingress`]: MQTT messages arrive (embedded rumqttd, or a client of an external broker)
//!    and are checked and routed ([`routing`]) into [`message::Envelope`]s.
//! 2. [`buffer`]: one writer thread group-commits envelopes to SQLite (WAL) and only then
//!    completes their acks. This commit is the one durability point.
//!    [`windows`]: windowed rules aggregate their committed input rows and commit each closed
//!    window's rows back into the buffer, with their position, in one transaction.
//! 3. [`batching`]: one task per destination applies Firehose's buffering hints over the
//!    committed records and assembles each batch, with Firehose's object keys.
//! 4. [`sinks`]: a batch is put under its key (`file`: a local S3-layout directory; `s3`), or its
//!    records are put to a stream (`kinesis`); then the destination's position moves and fully
//!    delivered records are deleted.
//!
//! Around them: [`config`] (TOML -> validated `Config`), [`clock`] (wall and monotonic time),
//! [`admin`] (`/healthz` from [`health`], `/metrics`),
//! [`shutdown`] (one signal, stages finish in flow order), [`service`] (systemd notify,
//! watchdog, journal format), [`reload`] (SIGHUP).

pub mod clock;
pub mod config;
pub mod message;
pub mod templates;

pub mod ingress;
pub mod routing;
pub mod rules;

pub mod buffer;

pub mod windows;

pub mod batching;

pub mod sinks;

pub mod admin;
pub mod certs;
pub mod failpoint;
pub mod fuzz;
pub mod health;
pub mod memory;
pub mod metrics;
pub mod ratelimit;
pub mod reload;
pub mod service;
pub mod shutdown;

use std::sync::Arc;

use anyhow::Context;
use tokio::task::JoinSet;
use tracing::{error, info, warn};

pub use crate::reload::Reload;

use crate::batching::Destination;
use crate::config::{Config, IngressMode};
use crate::reload::Hints;
use crate::routing::Router;
use crate::sinks::Sink;

/// Loads what the config names beyond itself (TLS certificates and keys, the password file,
/// the policies), as start-up would: `edgehose check-config`.
pub fn check_files(config: &Config) -> anyhow::Result<()> {
    if let IngressMode::FrontDoor(door) = &config.ingress.mode {
        ingress::auth::Auth::load(door.auth.clone())?;
        if let Some(tls) = &door.tls {
            ingress::frontdoor::tls::Tls::load(tls)?;
        }
    }
    Ok(())
}

/// Runs the gateway until SIGTERM or SIGINT, then shuts down in flow order within
/// `shutdown.timeout`. With `reload`, SIGHUP reloads the config file.
pub async fn run(mut config: Config, reload: Option<Reload>) -> anyhow::Result<()> {
    let metrics_handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("cannot install the metrics recorder")?;
    metrics::describe();

    let (trigger, shutdown) = shutdown::channel();

    // The buffer first: nothing is accepted before it can be stored.
    let buffer = buffer::open(&config)
        .with_context(|| format!("cannot open the buffer at {}", config.buffer.path.display()))?;
    let health = buffer.health.clone();

    let staging = config
        .buffer
        .path
        .parent()
        .unwrap_or(std::path::Path::new("."))
        .join("staging");
    let mut destinations = JoinSet::new();
    let mut hints = Vec::new();
    for (index, dest) in config.destinations.iter().enumerate() {
        let (hints_tx, hints_rx) = tokio::sync::watch::channel(Hints {
            size: dest.batching.size,
            interval: dest.batching.interval,
        });
        hints.push(hints_tx);
        let streams: Vec<usize> = config
            .streams
            .iter()
            .enumerate()
            .filter(|(_, s)| s.destinations.contains(&dest.name))
            .map(|(i, _)| i)
            .collect();
        let stream_ids = streams.iter().map(|&i| buffer.stream_ids[i]).collect();
        destinations.spawn(
            Destination {
                index,
                config: dest.clone(),
                streams,
                stream_ids,
                state: buffer.destinations[index].clone(),
                sink: Sink::new(dest, &staging).await?,
                buffer_path: buffer.path.clone(),
                control: buffer.control.clone(),
                committed: buffer.committed.clone(),
                hints: hints_rx,
                shutdown: shutdown.clone(),
                health: health.clone(),
            }
            .run(),
        );
    }
    // One window stage per windowed rule, between the buffer and the destinations.
    let mut window_stages = JoinSet::new();
    for w in &buffer.windows {
        let stream = &config.streams[w.stream];
        let input = stream
            .window_input
            .expect("a windowed stream has an input stream");
        window_stages.spawn(
            windows::WindowStage {
                state: w.clone(),
                stream_name: stream.name.clone(),
                rule: stream.rule.clone().expect("a windowed stream has a rule"),
                input_stream_id: buffer.stream_ids[input],
                allowed_lateness: stream.allowed_lateness,
                buffer_path: buffer.path.clone(),
                ingest: buffer.window_ingest.clone(),
                committed: buffer.committed.clone(),
                shutdown: shutdown.clone(),
            }
            .run(),
        );
    }
    // Only the window stages send on this channel; the writer ends when it closes too.
    drop(buffer.window_ingest);
    // The watchdog holds the control channel weakly: its pings must not keep the writer alive.
    // The front door holds it until it has saved its sessions at shutdown.
    let watchdog_control = buffer.control.downgrade();
    let mut sessions_control = Some(buffer.control);

    let admin = match config.admin.listen {
        Some(addr) => Some(tokio::spawn(
            admin::serve(
                addr,
                config.admin.token_file.as_deref(),
                metrics_handle,
                health.clone(),
                shutdown.clone(),
            )
            .await?,
        )),
        None => None,
    };

    let router = Arc::new(Router::new(config.streams.clone(), config.ingress.limits));
    // What SIGHUP reloads in the front door (TLS files, passwords, policies).
    let mut door_reload = None;
    let ingress = match &config.ingress.mode {
        IngressMode::FrontDoor(f) => {
            let door = ingress::frontdoor::FrontDoor::bind(
                f,
                &config.ingress.limits,
                router,
                buffer.ingest,
                buffer.sessions,
                sessions_control.take().expect("taken once"),
            )
            .await?;
            door_reload = Some(door.reloadable());
            tokio::spawn(door.run(shutdown.clone()))
        }
        #[cfg(feature = "broker")]
        IngressMode::Broker(b) => {
            let broker = ingress::broker::start(b, &config.ingress.limits)?;
            tokio::spawn(broker.run(router, buffer.ingest, shutdown.clone()))
        }
        #[cfg(not(feature = "broker"))]
        IngressMode::Broker(_) => {
            anyhow::bail!("ingress.mode = \"broker\" needs a build with the `broker` feature")
        }
        IngressMode::Client(c) => tokio::spawn(ingress::client::run(
            c.clone(),
            config.ingress.limits,
            router,
            buffer.ingest,
            shutdown.clone(),
        )),
    };
    // Only the front door saves sessions; otherwise the writer must not wait for this sender.
    drop(sessions_control);
    let clock = tokio::spawn(clock::watch_steps(shutdown.clone()));
    health.set_ready();
    info!("edgehose ready");
    service::ready();
    // systemd arms the watchdog once start-up is complete (READY=1): the pings start now.
    let watchdog = service::watchdog_interval().map(|interval| {
        info!(?interval, "systemd watchdog enabled");
        tokio::spawn(service::watchdog(
            interval,
            watchdog_control,
            shutdown.clone(),
        ))
    });

    wait_for_signal(|| {
        if let Some(r) = &reload {
            service::reloading();
            reload::apply(r, &mut config, &hints);
            if let Some(d) = &door_reload {
                d.reload();
            }
            service::reloaded();
        } else {
            info!("SIGHUP ignored: no config file to reload");
        }
    })
    .await;
    service::stopping();
    info!(timeout = ?config.shutdown_timeout, "shutting down: stopping ingress, committing, flushing open batches");
    trigger.begin();

    let finish = async {
        let _ = ingress.await;
        // Window stages stop at once (their open windows are rebuilt from the buffer at the
        // next start); then the writer's ingest closes and destinations flush.
        while window_stages.join_next().await.is_some() {}
        while destinations.join_next().await.is_some() {}
        let writer = buffer.writer;
        let _ = tokio::task::spawn_blocking(move || writer.join()).await;
    };
    match tokio::time::timeout(config.shutdown_timeout, finish).await {
        Ok(()) => info!("shutdown complete"),
        Err(_) => warn!(
            "shutdown timed out; undelivered records stay in the buffer and are delivered after restart"
        ),
    }
    if let Some(admin) = admin {
        admin.abort();
    }
    if let Some(w) = watchdog {
        w.abort();
    }
    clock.abort();
    Ok(())
}

/// Waits for SIGTERM or SIGINT, calling `on_hup` for every SIGHUP meanwhile.
async fn wait_for_signal(mut on_hup: impl FnMut()) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "cannot listen for SIGTERM; stopping on SIGINT only");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    let mut hup = signal(SignalKind::hangup())
        .map_err(|e| warn!(error = %e, "cannot listen for SIGHUP; reload needs a restart"))
        .ok();
    loop {
        tokio::select! {
            _ = term.recv() => return,
            _ = tokio::signal::ctrl_c() => return,
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => on_hup(),
        }
    }
}
