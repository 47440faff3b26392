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

/// Every place in `schema` (at `path`) that admits unbounded data: strings without
/// `maxLength` (or an enum), arrays without `maxItems`, 32-bit integers without `maximum`.
fn unbounded(path: &str, schema: &serde_json::Value, out: &mut Vec<String>) {
    let bounded = |key: &str| schema.get(key).is_some();
    match schema.get("type").and_then(|t| t.as_str()) {
        Some("string") if !bounded("maxLength") && !bounded("enum") => out.push(path.into()),
        Some("array") if !bounded("maxItems") => out.push(path.into()),
        Some("integer")
            if schema.get("format").and_then(|f| f.as_str()) == Some("uint32")
                && !bounded("maximum") =>
        {
            out.push(path.into())
        }
        _ => {}
    }
    if let Some(properties) = schema.get("properties").and_then(|p| p.as_object()) {
        for (name, property) in properties {
            unbounded(&format!("{path}.{name}"), property, out);
        }
    }
    if let Some(items) = schema.get("items") {
        unbounded(&format!("{path}[]"), items, out);
    }
}

#[test]
fn the_crash_report_schema_bounds_every_string_list_and_small_integer() {
    use kube::CustomResourceExt;
    let crd = serde_json::to_value(crds::CrashReport::crd()).unwrap();
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    let mut found = Vec::new();
    unbounded("", &schema["properties"]["spec"], &mut found);
    unbounded("", &schema["properties"]["status"], &mut found);
    assert_eq!(
        found,
        Vec::<String>::new(),
        "unbounded fields of a CrashReport"
    );
    // Spot checks against the kernel's own limits, written out here.
    let spec = &schema["properties"]["spec"]["properties"];
    assert_eq!(spec["faultAddress"]["pattern"], "^0x[0-9a-f]{1,16}$");
    assert_eq!(spec["pid"]["maximum"].as_f64(), Some(4_194_304.0));
    assert!(spec["raw"]["maxItems"].as_u64().is_some_and(|n| n <= 1000));
    // The walk does find unbounded fields where there are some.
    let policy = serde_json::to_value(crds::RemediationPolicy::crd()).unwrap();
    let mut policy_found = Vec::new();
    unbounded(
        "",
        &policy["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"],
        &mut policy_found,
    );
    assert!(
        policy_found.contains(&".threshold.window".to_owned()),
        "{policy_found:?}"
    );
}
