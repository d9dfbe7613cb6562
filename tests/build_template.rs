//! The kernel template language of the build script (`build/template.rs`): build scripts have
//! no test harness, so the file is compiled in here and its unit tests run with the suite.

#[path = "../build/template.rs"]
#[allow(dead_code)]
mod template;

use std::collections::HashMap;

/// Every real template expands with the crate's record offsets for every element type and
/// variant (what the build does), and no record offset is left as a literal.
#[test]
fn the_kernel_templates_expand_with_the_records_offsets() {
    let values: HashMap<String, u64> = spectral_step::kernels::records::template_values()
        .into_iter()
        .collect();
    for (file, variants) in [
        ("power_pass.ptx", &["step", "plain"][..]),
        ("update.ptx", &[""][..]),
    ] {
        let text = std::fs::read_to_string(format!("kernels/{file}")).unwrap();
        for element in &template::ELEMENT_TYPES {
            for &variant in variants {
                let expanded = template::expand(&text, Some(element), variant, &values)
                    .unwrap_or_else(|e| panic!("{file}: {e}"));
                assert!(!expanded.contains("{{"), "{file}: placeholder left");
                let name = template::entry_name(&expanded).unwrap();
                assert!(name.ends_with(element.name), "{name}");
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
    }
    let finish = std::fs::read_to_string("kernels/finish.ptx").unwrap();
    let expanded = template::expand(&finish, None, "", &values).unwrap();
    assert!(expanded.contains(".entry power_finish("));
}
