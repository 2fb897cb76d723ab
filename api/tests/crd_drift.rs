//! The committed CRD manifests must be exactly what the types generate.

#[test]
fn committed_crds_match_the_types() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/crds");
    let mut expected_files = Vec::new();
    for crd in confidential_api::crds() {
        let name = confidential_api::crd_file_name(&crd);
        let generated = confidential_api::crd_yaml(&crd).expect("render CRD");
        let committed = std::fs::read_to_string(dir.join(&name)).unwrap_or_else(|e| {
            panic!("manifests/crds/{name} is missing ({e}); run `cargo xtask gen-crds`")
        });
        assert!(
            committed == generated,
            "manifests/crds/{name} differs from the types in api/; run `cargo xtask gen-crds` and commit the result"
        );
        expected_files.push(name);
    }
    let mut present: Vec<String> = std::fs::read_dir(&dir)
        .expect("read manifests/crds")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    present.sort();
    expected_files.sort();
    assert_eq!(
        present, expected_files,
        "manifests/crds/ holds files no type generates"
    );
}
