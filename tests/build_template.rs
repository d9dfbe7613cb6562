//! The kernel template language of the build script (`build/template.rs`): build scripts have
//! no test harness, so the file is compiled in here and its unit tests run with the suite.

#[path = "../build/template.rs"]
#[allow(dead_code)]
mod template;

use std::collections::HashMap;

/// Every module the build produces is the expansion of its template for its element types
/// and variant with the crate's record offsets, no placeholder is left, and its entry is
/// named for its types.
#[test]
fn the_kernel_templates_expand_with_the_records_offsets() {
    let values: HashMap<String, u64> = spectral_step::kernels::records::template_values()
        .into_iter()
        .collect();
    let specs = template::module_specs();
    assert_eq!(specs.len(), spectral_step::kernels::modules().len());
    // The build's update pairs are the crate's StepTypes, in order.
    let step_types: Vec<(&str, &str)> = spectral_step::StepTypes::ALL
        .iter()
        .map(|types| (types.weights().name(), types.grads().name()))
        .collect();
    for variant in ["power", "orth"] {
        let update_pairs: Vec<(&str, &str)> = specs
            .iter()
            .filter(|spec| spec.file == "update.ptx" && spec.variant == variant)
            .filter_map(|spec| Some((spec.roles.w?.name, spec.roles.g?.name)))
            .collect();
        assert_eq!(update_pairs, step_types, "{variant}");
    }
    for spec in specs {
        let file = spec.file;
        let text = std::fs::read_to_string(format!("kernels/{file}")).unwrap();
        let expanded = template::expand(&text, &spec.roles, spec.variant, &values)
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(!expanded.contains("{{"), "{file}: placeholder left");
        let name = template::entry_name(&expanded).unwrap();
        let expected = match (file, spec.roles.t, spec.roles.w, spec.roles.g) {
            ("power_pass.ptx", Some(t), None, None) => format!("power_{}_{}", spec.variant, t.name),
            ("orth_direction.ptx", Some(t), None, None) => {
                format!("orth_{}_{}", spec.variant, t.name)
            }
            ("update.ptx", None, Some(w), Some(g)) if spec.variant == "power" => {
                format!("update_{}_{}", w.name, g.name)
            }
            ("update.ptx", None, Some(w), Some(g)) if spec.variant == "orth" => {
                format!("orth_update_{}_{}", w.name, g.name)
            }
            ("finish.ptx", None, None, None) => "power_finish".to_string(),
            ("orth_polynomial.ptx", None, None, None) => "orth_polynomial".to_string(),
            ("orth_check.ptx", None, None, None) => "orth_check".to_string(),
            _ => panic!("{file}: a module the test does not know"),
        };
        assert_eq!(name, expected, "{file}");
        let module = spectral_step::kernels::modules()
            .iter()
            .find(|m| m.name == name)
            .unwrap();
        assert_eq!(
            module.ptx, expanded,
            "the embedded module is this expansion"
        );
    }
}
