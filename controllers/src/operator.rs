//! Runs the whole operator: waits for the leader Lease, then runs the
//! NodeVersion reconciler and the kubelet CSR approver until leadership is
//! lost (the caller then exits, and a restart competes again).

use std::sync::Arc;
use std::time::Duration;

use kube::Client;

use crate::leader::LeaderElector;
use crate::metrics::Metrics;
use crate::provider::Provider;
use crate::reconciler::{self, Settings};

/// Where the leader Lease lives.
#[derive(Clone, Debug)]
pub struct Leadership {
    pub namespace: String,
    pub lease: String,
    pub identity: String,
    pub duration: Duration,
}

/// Runs until leadership is lost (or forever without leader election).
pub async fn run(
    client: Client,
    provider: Arc<dyn Provider>,
    metrics: Arc<Metrics>,
    settings: Settings,
    leadership: Option<Leadership>,
) {
    let elector = leadership.map(|l| {
        LeaderElector::new(
            client.clone(),
            &l.namespace,
            &l.lease,
            &l.identity,
            l.duration,
        )
    });
    if let Some(elector) = &elector {
        elector.acquire().await;
        tracing::info!("acquired leadership");
    }
    let work = async {
        tokio::join!(
            reconciler::run(client.clone(), provider, metrics.clone(), settings),
            crate::csr::run(client, metrics)
        );
    };
    match &elector {
        Some(elector) => {
            tokio::select! {
                () = work => {}
                () = elector.hold() => tracing::warn!("lost leadership"),
            }
        }
        None => work.await,
    }
}
