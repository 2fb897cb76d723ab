//! Secure by default and ephemeral containers, on the real API server: what a
//! new user types (`kubectl run x --image=busybox`, `kubectl create
//! deployment web --image=nginx:1.27`) where no ImagePolicy covers the
//! namespace, and `kubectl debug` adding an ephemeral container through the
//! `pods/ephemeralcontainers` subresource.

use k8s_openapi::api::core::v1::ServiceAccount;

use super::*;

fn pod(name: &str, image: &str) -> Result<Pod> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"containers": [{"name": name, "image": image}]}
    }))?)
}

/// A namespace no ImagePolicy covers, once its default ServiceAccount exists
/// (otherwise the ServiceAccount admission plugin, not the gate, refuses Pods).
async fn plain_namespace(env: &Env) -> Result<String> {
    let ns = unique_name("fresh");
    let mut namespace = Namespace::default();
    namespace.metadata.name = Some(ns.clone());
    Api::<Namespace>::all(env.client.clone())
        .create(&PostParams::default(), &namespace)
        .await?;
    let accounts: Api<ServiceAccount> = Api::namespaced(env.client.clone(), &ns);
    eventually(
        "the namespace's default ServiceAccount",
        Duration::from_secs(60),
        || {
            let accounts = accounts.clone();
            async move { Ok(accounts.get_opt("default").await?.map(|_| ())) }
        },
    )
    .await?;
    Ok(ns)
}

/// Sets the mode of the ImagePolicy named `name` and waits until the
/// webhook's cache has the change.
async fn set_mode(env: &Env, name: &str, mode: PolicyMode) -> Result<()> {
    let policies: Api<ImagePolicy> = Api::all(env.client.clone());
    let patched = policies
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"mode": mode}})),
        )
        .await?;
    let rv = patched.meta().resource_version.clone();
    env.wait_cached("ImagePolicy change cached", |w| {
        w.stores
            .image_policies
            .state()
            .iter()
            .any(|p| p.meta().resource_version == rv)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmeasured_images_are_refused_where_no_image_policy_covers_the_namespace() -> Result<()> {
    let env = Env::start().await?;
    let ns = plain_namespace(&env).await?;
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &ns);
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &ns);

    // `kubectl run x --image=busybox`
    let message = denial(
        pods.create(&PostParams::default(), &pod("x", "busybox")?)
            .await,
    );
    for needle in [
        &format!("no ImagePolicy covers namespace {ns:?}"),
        "image \"busybox\" is not pinned by digest",
        "Add an ImagePolicy",
        "spec.mode: Warn",
    ] {
        assert!(message.contains(needle), "{needle}: {message}");
    }
    assert_absent(&pods, "x").await?;
    // `kubectl create deployment web --image=nginx:1.27`
    let message = denial(
        deployments
            .create(&PostParams::default(), &deployment("web", "nginx:1.27")?)
            .await,
    );
    assert!(
        message.contains("image \"nginx:1.27\" is not pinned by digest")
            && message.contains("Add an ImagePolicy"),
        "{message}"
    );
    assert_absent(&deployments, "web").await?;
    // A digest alone measures nothing while no policy allows it.
    let pinned = format!("nginx@{NGINX_DIGEST}");
    let message = denial(
        pods.create(&PostParams::default(), &pod("pinned", &pinned)?)
            .await,
    );
    assert!(message.contains("no ImagePolicy allows it"), "{message}");
    assert_absent(&pods, "pinned").await?;

    // Exempt namespaces (configured) stay open: kube-public is not cut by
    // the webhook configuration's namespaceSelector, so the gate decides.
    let public: Api<Pod> = Api::namespaced(env.client.clone(), "kube-public");
    public
        .create(&PostParams::default(), &pod("exempt", "busybox")?)
        .await
        .context("a tag-only image in an exempt namespace")?;

    // An ImagePolicy covering the namespace admits the allowed digest.
    let mut spec = ImagePolicySpec {
        mode: PolicyMode::Enforce,
        allowed_digests: vec![NGINX_DIGEST.to_owned()],
        namespaces: vec![ns.clone()],
        ..Default::default()
    };
    spec.tag_digests
        .insert("nginx:1.27".to_owned(), NGINX_DIGEST.to_owned());
    let created = Api::<ImagePolicy>::all(env.client.clone())
        .create(&PostParams::default(), &ImagePolicy::new(&ns, spec))
        .await?;
    let rv = created.meta().resource_version.clone();
    env.wait_cached("ImagePolicy cached", |w| {
        w.stores
            .image_policies
            .state()
            .iter()
            .any(|p| p.meta().resource_version == rv)
    })
    .await?;
    pods.create(&PostParams::default(), &pod("pinned", &pinned)?)
        .await
        .context("a digest the ImagePolicy allows")?;
    let message = denial(
        pods.create(&PostParams::default(), &pod("x", "busybox")?)
            .await,
    );
    assert!(message.contains("not pinned by digest"), "{message}");
    assert_absent(&pods, "x").await?;

    // Warn mode admits the tag-only images, with a warning the client sees.
    set_mode(&env, &ns, PolicyMode::Warn).await?;
    let (status, warnings) =
        create_with_warnings(&env.client, &ns, &deployment("web", "nginx:1.27")?).await?;
    assert_eq!(status, 201, "warnings: {warnings:?}");
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("not pinned by digest") && w.contains(NGINX_DIGEST)),
        "{warnings:?}"
    );
    assert!(deployments.get_opt("web").await?.is_some());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ephemeral_container_cannot_reuse_a_tag_only_image_the_pod_ran() -> Result<()> {
    let env = Env::start().await?;
    // The Pod was admitted with a tag-only image while the policy only warned.
    let ns = namespace_with_policy(&env, PolicyMode::Warn).await?;
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &ns);
    pods.create(&PostParams::default(), &pod("app", "busybox:1.36")?)
        .await?;
    set_mode(&env, &ns, PolicyMode::Enforce).await?;

    // `kubectl debug app --image=busybox:1.36`: a strategic merge patch of
    // the ephemeralcontainers subresource.
    let debug = |name: &str, image: &str| {
        Patch::Strategic(json!({
            "spec": {"ephemeralContainers": [{
                "name": name, "image": image, "stdin": true, "tty": true,
                "terminationMessagePolicy": "File"
            }]}
        }))
    };
    let message = denial(
        pods.patch_subresource(
            "ephemeralcontainers",
            "app",
            &PatchParams::default(),
            &debug("debugger", "busybox:1.36"),
        )
        .await,
    );
    assert!(
        message.contains("ephemeral container \"debugger\"")
            && message.contains("not pinned by digest"),
        "{message}"
    );
    let unchanged = pods.get("app").await?;
    assert!(
        unchanged
            .spec
            .as_ref()
            .and_then(|s| s.ephemeral_containers.as_ref())
            .is_none_or(Vec::is_empty),
        "the refused ephemeral container was added: {unchanged:?}"
    );

    // A measured debug image is admitted, and the Pod's own (tag-only)
    // container does not block it or later metadata updates.
    let measured = format!("nginx@{NGINX_DIGEST}");
    let debugged = pods
        .patch_subresource(
            "ephemeralcontainers",
            "app",
            &PatchParams::default(),
            &debug("measured", &measured),
        )
        .await
        .context("a measured ephemeral container")?;
    let added: Vec<String> = debugged
        .spec
        .and_then(|s| s.ephemeral_containers)
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(added, vec!["measured".to_owned()]);
    pods.patch(
        "app",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"debugged": "yes"}}})),
    )
    .await
    .context("a metadata update of the running Pod")?;
    Ok(())
}
