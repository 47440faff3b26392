//! The committed CRD YAML must be exactly what the code generates.

use std::path::Path;

#[test]
fn committed_crds_equal_the_generated_ones() {
    let generated = crds::crd_yaml();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for committed in [
        "crds/crashwatch-crds.yaml",
        "charts/crashwatch/crds/crashwatch-crds.yaml",
    ] {
        let text = std::fs::read_to_string(root.join(committed))
            .unwrap_or_else(|e| panic!("{committed}: {e}"));
        assert!(
            text == generated,
            "{committed} differs from the generated CRDs; regenerate it with\n  cargo run -p operator -- crds > {committed}"
        );
    }
}
