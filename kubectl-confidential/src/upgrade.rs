//! `kubectl confidential upgrade`: the day-2 entry point. It changes the
//! desired image and/or Kubernetes version of a node pool (`NodeVersion`) and,
//! with `--wait`, follows the rollout the node operator performs, printing
//! progress until every node is up to date or the rollout is blocked.
//!
//! Before changing anything it checks that the `AttestationPolicy` holds
//! measurements for the new image, so the admin gets the refusal here, with
//! what to do next, instead of a denied admission request.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use confidential_api::conditions::types::{ROLLOUT_BLOCKED, ROLLOUT_PROGRESSING};
use confidential_api::{AttestationPolicy, NodeVersion};
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

#[derive(clap::Args, Debug)]
pub struct UpgradeArgs {
    /// Node pool (NodeVersion name) to upgrade.
    #[arg(long, default_value = "default")]
    pool: String,
    /// New node image.
    #[arg(long)]
    image: Option<String>,
    /// New Kubernetes version of the kubelets (e.g. v1.36.0).
    #[arg(long)]
    kubernetes_version: Option<String>,
    /// AttestationPolicy that must hold the image's measurements.
    #[arg(long, default_value = "default")]
    policy: String,
    /// Follow the rollout until it finishes or is blocked.
    #[arg(long)]
    wait: bool,
    /// Give up waiting after this many seconds.
    #[arg(long, default_value_t = 3600)]
    timeout_seconds: u64,
}

pub async fn run(client: &Client, args: &UpgradeArgs) -> Result<()> {
    if args.image.is_none() && args.kubernetes_version.is_none() {
        bail!("nothing to upgrade: pass --image and/or --kubernetes-version");
    }
    let pools: Api<NodeVersion> = Api::all(client.clone());
    let pool = pools.get_opt(&args.pool).await?.with_context(|| {
        format!(
            "node pool {:?} not found; list pools with `kubectl get nodeversions` and pass --pool",
            args.pool
        )
    })?;
    if let Some(image) = &args.image {
        let policy = Api::<AttestationPolicy>::all(client.clone())
            .get_opt(&args.policy)
            .await?
            .with_context(|| {
                format!(
                    "AttestationPolicy {:?} not found; pass --policy",
                    args.policy
                )
            })?;
        if !policy.spec.images.iter().any(|m| &m.image == image) {
            bail!(
                "image {image} has no measurements in AttestationPolicy {:?}; add its signed measurement file \
                 (`kubectl confidential measurements compute`/`sign`) to spec.images first",
                args.policy
            );
        }
    }
    let mut spec = serde_json::Map::new();
    if let Some(image) = &args.image {
        spec.insert("image".into(), json!(image));
    }
    if let Some(version) = &args.kubernetes_version {
        spec.insert("kubernetesVersion".into(), json!(version));
    }
    let patched = pools
        .patch(
            &args.pool,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": spec })),
        )
        .await
        .with_context(|| format!("updating NodeVersion {:?}", args.pool))?;
    eprintln!(
        "node pool {} → image {}, Kubernetes {} (was {}, {})",
        args.pool,
        patched.spec.image,
        patched.spec.kubernetes_version,
        pool.spec.image,
        pool.spec.kubernetes_version
    );
    if !args.wait {
        eprintln!(
            "the node operator rolls the pool now; follow it with `kubectl confidential status`"
        );
        return Ok(());
    }
    let generation = patched.metadata.generation;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_seconds);
    let mut last = String::new();
    loop {
        let current = pools.get(&args.pool).await?;
        let status = current.status.clone().unwrap_or_default();
        let observed = status.observed_generation >= generation;
        let condition = |t: &str| status.conditions.iter().find(|c| c.type_ == t).cloned();
        // Counts from before the operator saw this change describe the old
        // target: not shown as progress.
        let line = match observed {
            true => format!(
                "{}/{} up to date, {} outdated, {} heirs, {} pending",
                status.up_to_date_count,
                current.spec.replicas,
                status.outdated_count,
                status.heirs.len(),
                status.pending.len()
            ),
            false => "waiting for the node operator to take up the change".to_owned(),
        };
        if line != last {
            eprintln!("{line}");
            last = line;
        }
        if observed {
            if let Some(blocked) = condition(ROLLOUT_BLOCKED).filter(|c| c.status == "True") {
                bail!(
                    "rollout blocked: {} ({}); see `kubectl describe nodeversion {}`",
                    blocked.message,
                    blocked.reason,
                    args.pool
                );
            }
            let progressing = condition(ROLLOUT_PROGRESSING).is_some_and(|c| c.status == "True");
            if !progressing
                && status.outdated_count == 0
                && status.up_to_date_count >= current.spec.replicas
            {
                eprintln!("rollout of {} finished", args.pool);
                return Ok(());
            }
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "rollout still running after {}s; it continues in the cluster (`kubectl confidential status`)",
                args.timeout_seconds
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
