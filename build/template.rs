//! The kernel template language: plain-text expansion of `kernels/*.ptx` into one PTX module
//! per element type and variant. The rules are in `kernels/README.md`; the expanded text is
//! exactly what ptxas assembles, the simulator runs and the driver loads.
//!
//! This file is part of the build script and is also compiled into an integration test
//! (`tests/build_template.rs`), which runs the unit tests at its end.

use std::collections::HashMap;

/// How one element type of weights and gradients is loaded, stored and named.
pub struct ElementType {
    /// `f32`, `f16` or `bf16`: the `{{T}}` of a module name.
    pub name: &'static str,
    /// log2 of the element size in bytes.
    pub shift: u32,
    /// `None` for `f32`; the `cvt` type of a 16-bit float otherwise.
    pub half: Option<&'static str>,
}

/// The element types every typed template is expanded for.
pub const ELEMENT_TYPES: [ElementType; 3] = [
    ElementType {
        name: "f32",
        shift: 2,
        half: None,
    },
    ElementType {
        name: "f16",
        shift: 1,
        half: Some("f16"),
    },
    ElementType {
        name: "bf16",
        shift: 1,
        half: Some("bf16"),
    },
];

/// The element types of a module, by role: `T`, the one type of a template with one (the
/// matrix the power pass reads); `W` and `G`, the weights' and the gradients' types of the
/// update (the copy of `f32` master weights has `G`'s type).
#[derive(Clone, Copy, Default)]
pub struct Roles {
    /// `{{T}}`.
    pub t: Option<&'static ElementType>,
    /// `{{W}}`.
    pub w: Option<&'static ElementType>,
    /// `{{G}}`.
    pub g: Option<&'static ElementType>,
}

impl Roles {
    /// An untyped template.
    pub const NONE: Roles = Roles {
        t: None,
        w: None,
        g: None,
    };

    /// A template with one element type.
    pub const fn single(t: &'static ElementType) -> Self {
        Roles {
            t: Some(t),
            w: None,
            g: None,
        }
    }

    /// The update: weights of type `w`, gradients (and copy) of type `g`.
    pub const fn update(w: &'static ElementType, g: &'static ElementType) -> Self {
        Roles {
            t: None,
            w: Some(w),
            g: Some(g),
        }
    }

    fn find(&self, role: &str) -> Option<&'static ElementType> {
        match role {
            "T" => self.t,
            "W" => self.w,
            "G" => self.g,
            _ => None,
        }
    }

    fn get(&self, role: &str) -> Result<&'static ElementType, String> {
        self.find(role).ok_or_else(|| match role {
            "T" | "W" | "G" => format!("element role {role} in a template expanded without it"),
            _ => format!("unknown element role `{role}` (T, W or G)"),
        })
    }

    /// `f32` weights with 16-bit gradients.
    fn is_mixed(&self) -> bool {
        matches!((self.w, self.g), (Some(w), Some(g)) if w.name != g.name)
    }
}

/// A module the build produces: its template, element types and variant.
pub struct ModuleSpec {
    /// The template's file name in `kernels/`.
    pub file: &'static str,
    /// Its element types.
    pub roles: Roles,
    /// Its variant (`""` when the template has none).
    pub variant: &'static str,
}

/// The update's (weights, gradients) pairs, as indices into [`ELEMENT_TYPES`]: each type
/// with itself, and `f32` master weights with `f16` or `bf16` gradients (the pairs of the
/// crate's `StepTypes::ALL`).
const UPDATE_PAIRS: [(usize, usize); 5] = [(0, 0), (1, 1), (2, 2), (0, 1), (0, 2)];

/// Every module, in a fixed order: the power passes per type and variant, the finish, the
/// updates per variant and pair of types, then the orthogonalised rule's element-wise
/// kernels.
pub fn module_specs() -> Vec<ModuleSpec> {
    let mut specs = Vec::new();
    for element in &ELEMENT_TYPES {
        for variant in ["step", "plain"] {
            specs.push(ModuleSpec {
                file: "power_pass.ptx",
                roles: Roles::single(element),
                variant,
            });
        }
    }
    specs.push(ModuleSpec {
        file: "finish.ptx",
        roles: Roles::NONE,
        variant: "",
    });
    for variant in ["power", "orth"] {
        for (w, g) in UPDATE_PAIRS {
            specs.push(ModuleSpec {
                file: "update.ptx",
                roles: Roles::update(&ELEMENT_TYPES[w], &ELEMENT_TYPES[g]),
                variant,
            });
        }
    }
    for element in &ELEMENT_TYPES {
        for variant in ["norm", "start"] {
            specs.push(ModuleSpec {
                file: "orth_direction.ptx",
                roles: Roles::single(element),
                variant,
            });
        }
    }
    for file in ["orth_polynomial.ptx", "orth_check.ptx"] {
        specs.push(ModuleSpec {
            file,
            roles: Roles::NONE,
            variant: "",
        });
    }
    specs
}

/// The variant tags a line may start with (`@step `, `@plain ` in `power_pass.ptx`;
/// `@power `, `@orth ` in `update.ptx`; `@norm `, `@start ` in `orth_direction.ptx`).
const VARIANT_TAGS: [&str; 6] = ["step", "plain", "power", "orth", "norm", "start"];

/// Whether a line with this type tag is kept: `@half ` / `@half:R ` for a 16-bit type in
/// role `T` / `R`, `@mixed ` for `f32` weights with 16-bit gradients. `None`: no type tag.
fn type_tag<'a>(line: &'a str, roles: &Roles) -> Result<Option<(bool, &'a str)>, String> {
    if let Some(rest) = line.strip_prefix("@mixed ") {
        return Ok(Some((roles.is_mixed(), rest.trim_start())));
    }
    let Some(rest) = line.strip_prefix("@half") else {
        return Ok(None);
    };
    let (role, rest) = match rest.strip_prefix(':') {
        Some(rest) => rest
            .split_once(' ')
            .ok_or_else(|| "a tag `@half:R` must be followed by a space".to_string())?,
        None => match rest.strip_prefix(' ') {
            Some(rest) => ("T", rest),
            None => return Ok(None),
        },
    };
    if !matches!(role, "T" | "W" | "G") {
        return Err(format!("unknown element role `{role}` in `@half:{role}`"));
    }
    let typed = roles.t.is_some() || roles.w.is_some() || roles.g.is_some();
    let keep = match roles.find(role) {
        Some(element) => element.half.is_some(),
        // A tag for a role the module lacks is a mistake, not a line to drop quietly.
        None if typed => return Err(format!("`@half` for role {role}, which this module lacks")),
        None => false,
    };
    Ok(Some((keep, rest.trim_start())))
}

/// Expands `template` for the element types `roles` and `variant` (`""` when the template
/// has none). `values` are the named placeholders (`MatrixDescriptor.fan_in`,
/// `Status.NonFinite`, ...; see `src/kernels/records.rs`). Errors name the template line.
pub fn expand(
    template: &str,
    roles: &Roles,
    variant: &str,
    values: &HashMap<String, u64>,
) -> Result<String, String> {
    let mut out = String::with_capacity(template.len() * 2);
    for (number, line) in template.lines().enumerate() {
        let line_no = number + 1;
        let at_line = |message: String| format!("line {line_no}: {message}");
        if !line.is_ascii() {
            // ptxas refuses any non-ASCII byte, comments included.
            return Err(at_line(
                "a non-ASCII character (ptxas accepts ASCII only)".into(),
            ));
        }
        let trimmed = line.trim_start();
        let trimmed = match type_tag(trimmed, roles).map_err(at_line)? {
            Some((false, _)) => continue,
            Some((true, rest)) => rest,
            None => trimmed,
        };
        let body = match tagged(trimmed) {
            Some((tag, _)) if tag != variant => continue,
            Some((_, rest)) => rest,
            None => trimmed,
        };
        if !body.trim_start().starts_with("//") {
            check_no_literal_offsets(body).map_err(at_line)?;
        }
        let indent = &line[..line.len() - line.trim_start().len()];
        let body = substitute(body, roles, variant, values).map_err(at_line)?;
        let lines = match expand_macro(&body, roles, values) {
            Some(lines) => lines.map_err(at_line)?,
            None => vec![body],
        };
        for expanded in lines {
            out.push_str(indent);
            out.push_str(&expanded);
            out.push('\n');
        }
    }
    Ok(out)
}

/// `Some((tag, rest))` for a line kept only in one variant (`@step ...`). A `@%p` guard is
/// PTX and is not a tag.
fn tagged(line: &str) -> Option<(&str, &str)> {
    let rest = line.strip_prefix('@')?;
    let (tag, rest) = rest.split_once(' ')?;
    VARIANT_TAGS
        .contains(&tag)
        .then_some((tag, rest.trim_start()))
}

/// Offsets into records must be named (`[%desc+{{MatrixDescriptor.grads}}]`), so that the
/// record's one definition decides them: a literal `[reg+8]` is an error.
fn check_no_literal_offsets(line: &str) -> Result<(), String> {
    let mut rest = line;
    while let Some(open) = rest.find('[') {
        let after = &rest[open + 1..];
        let Some(close) = after.find(']') else { break };
        let address = &after[..close];
        if let Some((_, offset)) = address.split_once('+')
            && offset.trim().starts_with(|c: char| c.is_ascii_digit())
        {
            return Err(format!(
                "literal offset in `[{address}]`: name it (see src/kernels/records.rs)"
            ));
        }
        rest = &after[close + 1..];
    }
    Ok(())
}

/// Replaces every `{{NAME}}`: the element placeholders (`{{T}}`, `{{W}}`, `{{G}}`, and
/// `{{ELEM_SHIFT}}`, `{{ELEM_BYTES}}`, `{{QUAD_BYTES}}` of role `T`, or of role `R` as
/// `{{ELEM_BYTES:R}}`), `{{VARIANT}}`, then the named values.
fn substitute(
    line: &str,
    roles: &Roles,
    variant: &str,
    values: &HashMap<String, u64>,
) -> Result<String, String> {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        let after = &rest[open + 2..];
        let close = after
            .find("}}")
            .ok_or_else(|| format!("unclosed placeholder in `{line}`"))?;
        let name = &after[..close];
        let (base, role) = name.split_once(':').unwrap_or((name, "T"));
        let value = match base {
            "VARIANT" => variant.to_string(),
            "T" | "W" | "G" if base == name => roles.get(base)?.name.to_string(),
            "ELEM_SHIFT" => roles.get(role)?.shift.to_string(),
            "ELEM_BYTES" => (1u32 << roles.get(role)?.shift).to_string(),
            "QUAD_BYTES" => (4u32 << roles.get(role)?.shift).to_string(),
            _ => values
                .get(name)
                .ok_or_else(|| format!("unknown placeholder {{{{{name}}}}}"))?
                .to_string(),
        };
        out.push_str(&value);
        rest = &after[close + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The pseudo-instructions that load or store elements, and so take an element role
/// (`LOAD_ELEM4.nc:G`; role `T` when none is written).
const ELEMENT_MACROS: [&str; 6] = [
    "LOAD_ELEM",
    "LOAD_ELEM.nc",
    "LOAD_ELEM4",
    "LOAD_ELEM4.nc",
    "STORE_ELEM",
    "STORE_ELEM4",
];

/// The other pseudo-instructions.
const PLAIN_MACROS: [&str; 3] = ["MOMENTUM", "WARP_SUM", "PHILOX"];

/// `Some` when the line is one of the pseudo-instructions.
fn expand_macro(
    line: &str,
    roles: &Roles,
    values: &HashMap<String, u64>,
) -> Option<Result<Vec<String>, String>> {
    let (op, args) = line.split_once(char::is_whitespace)?;
    let (op, role) = match op.split_once(':') {
        Some((op, role)) => (op, Some(role)),
        None => (op, None),
    };
    let element_macro = ELEMENT_MACROS.contains(&op);
    if !element_macro && !PLAIN_MACROS.contains(&op) {
        return None;
    }
    let Some(args) = args.trim().strip_suffix(';') else {
        return Some(Err(format!("{op}: missing `;`")));
    };
    let element = match (element_macro, role) {
        (true, Some(role)) => roles.get(role).map(Some),
        (true, None) => Ok(roles.t),
        (false, Some(role)) => Err(format!("{op} takes no element role (`:{role}`)")),
        (false, None) => Ok(None),
    };
    Some(element.and_then(|element| expand_known(op, args.trim(), element, values)))
}

/// A named value of `src/kernels/records.rs`, for the pseudo-instructions that need one.
fn value(values: &HashMap<String, u64>, name: &str) -> Result<u64, String> {
    values
        .get(name)
        .copied()
        .ok_or_else(|| format!("no value named {name}"))
}

/// Philox4x32 on the counter `(group_lo, group_hi, %matrix, %step_lo)` with the key
/// `(%key0, %key1)` (math §5a, `src/rounding.rs::philox_lanes`), into `%rand0..3`.
fn philox(group: &str, values: &HashMap<String, u64>) -> Result<Vec<String>, String> {
    let [m0, m1, w0, w1] =
        ["PHILOX_M0", "PHILOX_M1", "PHILOX_W0", "PHILOX_W1"].map(|name| value(values, name));
    let (m0, m1, w0, w1) = (m0?, m1?, w0?, w1?);
    let rounds = value(values, "PHILOX_ROUNDS")?;
    let mut lines = vec![
        format!("cvt.u32.u64 %rand0, {group};"),
        format!("shr.u64 %philox_wide, {group}, 32;"),
        "cvt.u32.u64 %rand1, %philox_wide;".to_string(),
        "mov.b32 %rand2, %matrix;".to_string(),
        "mov.b32 %rand3, %step_lo;".to_string(),
        "mov.b32 %philox_k0, %key0;".to_string(),
        "mov.b32 %philox_k1, %key1;".to_string(),
    ];
    for round in 0..rounds {
        if round > 0 {
            lines.push(format!("add.u32 %philox_k0, %philox_k0, {w0};"));
            lines.push(format!("add.u32 %philox_k1, %philox_k1, {w1};"));
        }
        lines.extend([
            format!("mul.hi.u32 %philox_hi0, %rand0, {m0};"),
            format!("mul.lo.u32 %philox_lo0, %rand0, {m0};"),
            format!("mul.hi.u32 %philox_hi1, %rand2, {m1};"),
            format!("mul.lo.u32 %philox_lo1, %rand2, {m1};"),
            "xor.b32 %rand0, %philox_hi1, %rand1;".to_string(),
            "xor.b32 %rand0, %rand0, %philox_k0;".to_string(),
            "mov.b32 %rand1, %philox_lo1;".to_string(),
            "xor.b32 %rand2, %philox_hi0, %rand3;".to_string(),
            "xor.b32 %rand2, %rand2, %philox_k1;".to_string(),
            "mov.b32 %rand3, %philox_lo0;".to_string(),
        ]);
    }
    Ok(lines)
}

/// Stochastic rounding of the `f32` register `src` to the 16-bit type `half`, with the 16
/// random bits in `%sr_rand`, into the `.b16` register `dst` (math §5a, the steps of
/// `src/rounding.rs::{bf16_stochastic, f16_stochastic}`).
fn stochastic_round(
    half: &str,
    src: &str,
    dst: &str,
    values: &HashMap<String, u64>,
) -> Result<Vec<String>, String> {
    let mut lines = vec![
        format!("mov.b32 %sr_bits, {src};"),
        "and.b32 %sr_mag, %sr_bits, 0x7FFFFFFF;".to_string(),
        "shr.u32 %sr_sign, %sr_bits, 16;".to_string(),
        "and.b32 %sr_sign, %sr_sign, 0x8000;".to_string(),
    ];
    if half == "bf16" {
        let max = value(values, "BF16_MAX_BITS")?;
        lines.extend([
            // Add the random bits below the kept half, truncate.
            "add.u32 %sr_out, %sr_bits, %sr_rand;".to_string(),
            "shr.u32 %sr_out, %sr_out, 16;".to_string(),
            // A finite value that carried into the exponent of infinity saturates.
            "and.b32 %sr_tmp, %sr_out, 0x7FFF;".to_string(),
            "setp.eq.u32 %sr_p, %sr_tmp, 0x7F80;".to_string(),
            "setp.lt.u32 %sr_q, %sr_mag, 0x7F800000;".to_string(),
            "and.pred %sr_p, %sr_p, %sr_q;".to_string(),
            format!("or.b32 %sr_tmp, %sr_sign, {max};"),
            "selp.b32 %sr_out, %sr_tmp, %sr_out, %sr_p;".to_string(),
            // NaN: sign and upper payload, quiet bit set.
            "shr.u32 %sr_tmp, %sr_bits, 16;".to_string(),
            "or.b32 %sr_tmp, %sr_tmp, 0x0040;".to_string(),
            "setp.gt.u32 %sr_p, %sr_mag, 0x7F800000;".to_string(),
            "selp.b32 %sr_out, %sr_tmp, %sr_out, %sr_p;".to_string(),
        ]);
    } else {
        let min_normal = value(values, "F16_MIN_NORMAL_BITS")?;
        let max = value(values, "F16_MAX_BITS")?;
        lines.extend([
            // Normal range: the top 13 random bits below the kept 10 mantissa bits,
            // truncate, re-bias the exponent (127 - 15 = 112), saturate.
            "shr.u32 %sr_tmp, %sr_rand, 3;".to_string(),
            "add.u32 %sr_out, %sr_mag, %sr_tmp;".to_string(),
            "shr.u32 %sr_out, %sr_out, 13;".to_string(),
            "sub.u32 %sr_out, %sr_out, 0x1C000;".to_string(),
            format!("min.u32 %sr_out, %sr_out, {max};"),
            // Subnormal range: k = floor(x) + [random < 2^16 frac(x)], x = |value| 2^24.
            "mov.b32 %sr_units, %sr_mag;".to_string(),
            "mul.rn.f32 %sr_units, %sr_units, 0f4B800000;".to_string(),
            "cvt.rzi.u32.f32 %sr_sub, %sr_units;".to_string(),
            "cvt.rn.f32.u32 %sr_frac, %sr_sub;".to_string(),
            "sub.rn.f32 %sr_frac, %sr_units, %sr_frac;".to_string(),
            "mul.rn.f32 %sr_frac, %sr_frac, 0f47800000;".to_string(),
            "cvt.rn.f32.u32 %sr_randf, %sr_rand;".to_string(),
            "setp.lt.f32 %sr_p, %sr_randf, %sr_frac;".to_string(),
            "selp.u32 %sr_tmp, 1, 0, %sr_p;".to_string(),
            "add.u32 %sr_sub, %sr_sub, %sr_tmp;".to_string(),
            format!("setp.lt.u32 %sr_p, %sr_mag, {min_normal};"),
            "selp.b32 %sr_out, %sr_sub, %sr_out, %sr_p;".to_string(),
            // Infinity and NaN: as round-to-nearest (quiet bit for NaN, upper payload).
            "and.b32 %sr_tmp, %sr_mag, 0x007FFFFF;".to_string(),
            "shr.u32 %sr_tmp, %sr_tmp, 13;".to_string(),
            "or.b32 %sr_tmp, %sr_tmp, 0x7C00;".to_string(),
            "setp.gt.u32 %sr_p, %sr_mag, 0x7F800000;".to_string(),
            "selp.b32 %sr_sub, 0x0200, 0, %sr_p;".to_string(),
            "or.b32 %sr_tmp, %sr_tmp, %sr_sub;".to_string(),
            "setp.ge.u32 %sr_p, %sr_mag, 0x7F800000;".to_string(),
            "selp.b32 %sr_out, %sr_tmp, %sr_out, %sr_p;".to_string(),
        ]);
    }
    lines.push("or.b32 %sr_out, %sr_out, %sr_sign;".to_string());
    lines.push(format!("cvt.u16.u32 {dst}, %sr_out;"));
    Ok(lines)
}

/// `src` (an `f32` register) narrowed to the 16-bit type `half` into `dst`: round to nearest,
/// or stochastically after `load_random` has put 16 random bits into `%sr_rand`.
fn narrow(
    half: &str,
    src: &str,
    dst: &str,
    load_random: Option<String>,
    values: &HashMap<String, u64>,
) -> Result<Vec<String>, String> {
    Ok(match load_random {
        None => vec![format!("cvt.rn.{half}.f32 {dst}, {src};")],
        Some(load) => {
            let mut lines = vec![load];
            lines.extend(stochastic_round(half, src, dst, values)?);
            lines
        }
    })
}

/// The `{...}` register groups of `text`, in order.
fn register_groups(op: &str, text: &str) -> Result<Vec<Vec<String>>, String> {
    let mut groups = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let inner = rest
            .strip_prefix('{')
            .and_then(|r| r.split_once('}'))
            .ok_or_else(|| format!("{op}: expected `{{...}}` groups, got `{text}`"))?;
        let regs: Vec<String> = inner.0.split(',').map(|r| r.trim().to_string()).collect();
        if regs.iter().any(String::is_empty) {
            return Err(format!("{op}: an empty register in `{text}`"));
        }
        groups.push(regs);
        rest = inner.1.trim().strip_prefix(',').unwrap_or(inner.1).trim();
    }
    Ok(groups)
}

/// `%sr_rand = word >> (16 * odd) & 0xFFFF`: the random bits of one element of a word.
fn random_half(word: &str, odd: bool) -> String {
    if odd {
        format!("shr.u32 %sr_rand, {word}, 16;")
    } else {
        format!("and.b32 %sr_rand, {word}, 0xFFFF;")
    }
}

/// The one `{a, b, c, d}` group of `text`.
fn four_registers(op: &str, text: &str) -> Result<Vec<String>, String> {
    match register_groups(op, text)?.as_slice() {
        [regs] if regs.len() == 4 => Ok(regs.clone()),
        _ => Err(format!("{op}: expected 4 registers, got `{text}`")),
    }
}

fn expand_known(
    op: &str,
    args: &str,
    element: Option<&'static ElementType>,
    values: &HashMap<String, u64>,
) -> Result<Vec<String>, String> {
    let need_element = || {
        element.ok_or_else(|| {
            format!("{op} without an element type (an untyped template, or no role T)")
        })
    };
    let cache = if op.ends_with(".nc") { ".nc" } else { "" };
    Ok(match op {
        "LOAD_ELEM" | "LOAD_ELEM.nc" => {
            let element = need_element()?;
            let (dst, addr) = args
                .split_once(',')
                .ok_or_else(|| format!("{op}: expected `dst, [addr]`"))?;
            let (dst, addr) = (dst.trim(), addr.trim());
            match element.half {
                None => vec![format!("ld.global{cache}.f32 {dst}, {addr};")],
                Some(half) => vec![
                    format!("ld.global{cache}.b16 %half0, {addr};"),
                    format!("cvt.f32.{half} {dst}, %half0;"),
                ],
            }
        }
        "LOAD_ELEM4" | "LOAD_ELEM4.nc" => {
            let element = need_element()?;
            let (regs, addr) = args
                .rsplit_once(',')
                .ok_or_else(|| format!("{op}: expected `{{...}}, [addr]`"))?;
            let regs = four_registers(op, regs)?;
            let addr = addr.trim();
            match element.half {
                None => vec![format!(
                    "ld.global{cache}.v4.f32 {{{}}}, {addr};",
                    regs.join(", ")
                )],
                Some(half) => {
                    let mut lines = vec![format!(
                        "ld.global{cache}.v4.b16 {{%half0, %half1, %half2, %half3}}, {addr};"
                    )];
                    for (k, reg) in regs.iter().enumerate() {
                        lines.push(format!("cvt.f32.{half} {reg}, %half{k};"));
                    }
                    lines
                }
            }
        }
        "STORE_ELEM" => {
            // `[addr], src` rounds to nearest; `[addr], src, random` rounds stochastically
            // with the 16 random bits in `random`.
            let element = need_element()?;
            let parts: Vec<&str> = args.split(',').map(str::trim).collect();
            let (addr, src, random) = match parts[..] {
                [addr, src] => (addr, src, None),
                [addr, src, random] => (addr, src, Some(format!("mov.b32 %sr_rand, {random};"))),
                _ => return Err(format!("{op}: expected `[addr], src[, random]`")),
            };
            match element.half {
                None if random.is_none() => vec![format!("st.global.f32 {addr}, {src};")],
                None => return Err(format!("{op}: stochastic rounding of f32")),
                Some(half) => {
                    let mut lines = narrow(half, src, "%half0", random, values)?;
                    lines.push(format!("st.global.b16 {addr}, %half0;"));
                    lines
                }
            }
        }
        "STORE_ELEM4" => {
            // `[addr], {a, b, c, d}` rounds to nearest; `[addr], {a, b, c, d}, {word0, word1}`
            // rounds stochastically, element k with half k % 2 of word k / 2.
            let element = need_element()?;
            let (addr, rest) = args
                .split_once(',')
                .ok_or_else(|| format!("{op}: expected `[addr], {{...}}[, {{word0, word1}}]`"))?;
            let (addr, groups) = (addr.trim(), register_groups(op, rest)?);
            let (regs, words) = match &groups[..] {
                [regs] => (regs, None),
                [regs, words] if words.len() == 2 => (regs, Some(words)),
                _ => {
                    return Err(format!(
                        "{op}: expected `[addr], {{...}}[, {{word0, word1}}]`"
                    ));
                }
            };
            let [_, _, _, _] = regs[..] else {
                return Err(format!("{op}: expected 4 registers, got `{rest}`"));
            };
            match element.half {
                None if words.is_none() => {
                    vec![format!("st.global.v4.f32 {addr}, {{{}}};", regs.join(", "))]
                }
                None => return Err(format!("{op}: stochastic rounding of f32")),
                Some(half) => {
                    let mut lines = Vec::new();
                    for (k, reg) in regs.iter().enumerate() {
                        let random = words.map(|words| random_half(&words[k / 2], k % 2 == 1));
                        lines.extend(narrow(half, reg, &format!("%half{k}"), random, values)?);
                    }
                    lines.push(format!(
                        "st.global.v4.b16 {addr}, {{%half0, %half1, %half2, %half3}};"
                    ));
                    lines
                }
            }
        }
        "PHILOX" => {
            let group = args.trim();
            if group.is_empty() || group.contains(',') {
                return Err(format!("{op}: expected one 64-bit register, got `{args}`"));
            }
            philox(group, values)?
        }
        "MOMENTUM" => {
            // math §5.3: m_new = beta m + (grad_coef g); u = nesterov ? beta m_new + (grad_coef g) : m_new.
            let regs: Vec<&str> = args.split(',').map(str::trim).collect();
            let [new_momentum, direction, grad, momentum] = regs[..] else {
                return Err(format!("{op}: expected `m_new, u, g, m`"));
            };
            vec![
                format!("mul.rn.f32 %scaled_grad, %grad_coef, {grad};"),
                format!("fma.rn.f32 {new_momentum}, %beta, {momentum}, %scaled_grad;"),
                format!("fma.rn.f32 {direction}, %beta, {new_momentum}, %scaled_grad;"),
                format!("selp.f32 {direction}, {direction}, {new_momentum}, %is_nesterov;"),
            ]
        }
        "WARP_SUM" => {
            // Butterfly sum over the warp: every lane ends with the same total.
            let value = args.trim();
            if value.is_empty() || value.contains(',') {
                return Err(format!("{op}: expected one register, got `{args}`"));
            }
            let mut lines = Vec::new();
            for offset in [16, 8, 4, 2, 1] {
                lines.push(format!("mov.b32 %shuffled, {value};"));
                lines.push(format!(
                    "shfl.sync.bfly.b32 %shuffled, %shuffled, {offset}, 31, -1;"
                ));
                lines.push("mov.b32 %other, %shuffled;".to_string());
                lines.push(format!("add.rn.f32 {value}, {value}, %other;"));
            }
            lines
        }
        _ => unreachable!("expand_macro only passes the pseudo-instructions' names"),
    })
}

/// The name of the module's `.entry`.
pub fn entry_name(ptx: &str) -> Option<String> {
    let after = ptx.split(".entry").nth(1)?;
    let name: String = after
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    (!name.is_empty()).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The crate's named values (these tests run in `tests/build_template.rs`, beside the
    /// crate), plus two made-up ones for the substitution tests.
    fn values() -> HashMap<String, u64> {
        let mut values: HashMap<String, u64> = spectral_step::kernels::records::template_values()
            .into_iter()
            .collect();
        values.insert("Rec.field".to_string(), 24);
        values.insert("Status.Done".to_string(), 3);
        values
    }

    fn f32_type() -> &'static ElementType {
        &ELEMENT_TYPES[0]
    }

    fn bf16_type() -> &'static ElementType {
        &ELEMENT_TYPES[2]
    }

    #[test]
    fn named_values_and_element_placeholders_are_substituted() {
        let template = "    ld.global.u32 %r, [%desc+{{Rec.field}}]; // {{T}} {{ELEM_SHIFT}} {{ELEM_BYTES}} {{QUAD_BYTES}}\n\
                        setp.eq.u32 %p, %s, {{Status.Done}};\n";
        let out = expand(template, &Roles::single(bf16_type()), "", &values()).unwrap();
        assert_eq!(
            out,
            "    ld.global.u32 %r, [%desc+24]; // bf16 1 2 8\nsetp.eq.u32 %p, %s, 3;\n"
        );
    }

    #[test]
    fn unknown_unclosed_and_misplaced_placeholders_are_errors_naming_the_line() {
        let unknown =
            expand("ok;\nmov.u32 %r, {{Nope}};\n", &Roles::NONE, "", &values()).unwrap_err();
        assert!(
            unknown.starts_with("line 2:") && unknown.contains("{{Nope}}"),
            "{unknown}"
        );
        let unclosed =
            expand("mov.u32 %r, {{Rec.field;\n", &Roles::NONE, "", &values()).unwrap_err();
        assert!(unclosed.contains("unclosed"), "{unclosed}");
        let untyped = expand("// {{T}}\n", &Roles::NONE, "", &values()).unwrap_err();
        assert!(untyped.contains("without it"), "{untyped}");
    }

    #[test]
    fn literal_record_offsets_are_rejected_outside_comments() {
        let error = expand(
            "ld.global.u64 %a, [%desc+8];\n",
            &Roles::NONE,
            "",
            &values(),
        )
        .unwrap_err();
        assert!(error.contains("literal offset"), "{error}");
        // A register offset, a named one and a comment are fine.
        let ok =
            "ld.global.u64 %a, [%desc];\nld.global.u64 %a, [%desc+{{Rec.field}}];\n// [%x+8]\n";
        assert!(expand(ok, &Roles::NONE, "", &values()).is_ok());
    }

    #[test]
    fn variant_lines_are_kept_only_in_their_variant_and_guards_stay() {
        let template =
            "@step    add.s64 %a, %b, %c;\n@plain   mov.f32 %u0, %g0;\n    @%p bra $x;\n";
        let step = expand(template, &Roles::single(f32_type()), "step", &values()).unwrap();
        assert_eq!(step, "add.s64 %a, %b, %c;\n    @%p bra $x;\n");
        let plain = expand(template, &Roles::single(f32_type()), "plain", &values()).unwrap();
        assert_eq!(plain, "mov.f32 %u0, %g0;\n    @%p bra $x;\n");
    }

    #[test]
    fn element_macros_expand_per_type() {
        let template =
            "  LOAD_ELEM4.nc {%g0, %g1, %g2, %g3}, [%addr];\n  STORE_ELEM [%addr], %w0;\n";
        let f32_out = expand(template, &Roles::single(f32_type()), "", &values()).unwrap();
        assert_eq!(
            f32_out,
            "  ld.global.nc.v4.f32 {%g0, %g1, %g2, %g3}, [%addr];\n  st.global.f32 [%addr], %w0;\n"
        );
        let bf16_out = expand(template, &Roles::single(bf16_type()), "", &values()).unwrap();
        assert_eq!(
            bf16_out,
            "  ld.global.nc.v4.b16 {%half0, %half1, %half2, %half3}, [%addr];\n\
             \x20 cvt.f32.bf16 %g0, %half0;\n  cvt.f32.bf16 %g1, %half1;\n\
             \x20 cvt.f32.bf16 %g2, %half2;\n  cvt.f32.bf16 %g3, %half3;\n\
             \x20 cvt.rn.bf16.f32 %half0, %w0;\n  st.global.b16 [%addr], %half0;\n"
        );
        let error = expand("LOAD_ELEM %g0, [%a];\n", &Roles::NONE, "", &values()).unwrap_err();
        assert!(error.contains("without an element type"), "{error}");
        let error = expand(
            "STORE_ELEM4 [%a], {%w0, %w1};\n",
            &Roles::single(f32_type()),
            "",
            &values(),
        )
        .unwrap_err();
        assert!(error.contains("4 registers"), "{error}");
    }

    #[test]
    fn momentum_and_warp_sum_expand_to_the_documented_sequences() {
        let out = expand(
            "MOMENTUM %mn0, %u0, %g0, %m0;\n",
            &Roles::NONE,
            "",
            &values(),
        )
        .unwrap();
        assert_eq!(
            out,
            "mul.rn.f32 %scaled_grad, %grad_coef, %g0;\n\
             fma.rn.f32 %mn0, %beta, %m0, %scaled_grad;\n\
             fma.rn.f32 %u0, %beta, %mn0, %scaled_grad;\n\
             selp.f32 %u0, %u0, %mn0, %is_nesterov;\n"
        );
        let out = expand("WARP_SUM %dot;\n", &Roles::NONE, "", &values()).unwrap();
        let offsets: Vec<&str> = out
            .lines()
            .filter(|l| l.starts_with("shfl"))
            .map(|l| l.split(", ").nth(2).unwrap())
            .collect();
        assert_eq!(offsets, ["16", "8", "4", "2", "1"]);
        assert_eq!(out.lines().count(), 20);
        assert!(expand("MOMENTUM %a, %b;\n", &Roles::NONE, "", &values()).is_err());
        assert!(expand("WARP_SUM %a\n", &Roles::NONE, "", &values()).is_err());
    }

    #[test]
    fn non_ascii_text_is_rejected_even_in_comments() {
        let error = expand("// see math \u{a7}4\n", &Roles::NONE, "", &values()).unwrap_err();
        assert!(
            error.starts_with("line 1:") && error.contains("ASCII"),
            "{error}"
        );
    }

    #[test]
    fn entry_names_are_read_from_the_expanded_text() {
        assert_eq!(
            entry_name(".visible .entry power_step_f32(\n.param .u64 a\n)").as_deref(),
            Some("power_step_f32")
        );
        assert_eq!(entry_name("// no entry here"), None);
    }

    #[test]
    fn half_lines_are_kept_for_16_bit_types_only() {
        let template = "a;\n    @half b;\n";
        assert_eq!(
            expand(template, &Roles::single(f32_type()), "", &values()).unwrap(),
            "a;\n"
        );
        assert_eq!(
            expand(template, &Roles::single(bf16_type()), "", &values()).unwrap(),
            "a;\n    b;\n"
        );
        assert_eq!(
            expand(template, &Roles::NONE, "", &values()).unwrap(),
            "a;\n"
        );
    }

    #[test]
    fn philox_is_ten_rounds_with_nine_key_bumps() {
        let out = expand("PHILOX %group;\n", &Roles::NONE, "", &values()).unwrap();
        assert_eq!(out.matches("mul.hi.u32").count(), 20, "{out}");
        assert_eq!(out.matches("add.u32 %philox_k0").count(), 9, "{out}");
        let multiplier = spectral_step::kernels::records::PHILOX_M0;
        assert!(out.contains(&format!("{multiplier}")), "{out}");
        assert!(expand("PHILOX %a, %b;\n", &Roles::NONE, "", &values()).is_err());
    }

    #[test]
    fn stochastic_stores_round_16_bit_types_and_refuse_f32() {
        let quad = "STORE_ELEM4 [%addr], {%w0, %w1, %w2, %w3}, {%word0, %word1};\n";
        assert!(expand(quad, &Roles::single(f32_type()), "", &values()).is_err());
        let bf16_out = expand(quad, &Roles::single(bf16_type()), "", &values()).unwrap();
        // Elements 0 and 1 take the halves of word0, 2 and 3 those of word1.
        for line in [
            "and.b32 %sr_rand, %word0, 0xFFFF;",
            "shr.u32 %sr_rand, %word0, 16;",
            "and.b32 %sr_rand, %word1, 0xFFFF;",
            "shr.u32 %sr_rand, %word1, 16;",
            "cvt.u16.u32 %half3, %sr_out;",
            "st.global.v4.b16 [%addr], {%half0, %half1, %half2, %half3};",
        ] {
            assert!(bf16_out.contains(line), "missing `{line}` in\n{bf16_out}");
        }
        let f16_out = expand(
            "STORE_ELEM [%addr], %w0, %word0;\n",
            &Roles::single(&ELEMENT_TYPES[1]),
            "",
            &values(),
        )
        .unwrap();
        let saturate = format!(
            "min.u32 %sr_out, %sr_out, {};",
            spectral_step::kernels::records::F16_MAX_BITS
        );
        assert!(f16_out.contains(&saturate), "{f16_out}");
        assert!(
            f16_out.contains("st.global.b16 [%addr], %half0;"),
            "{f16_out}"
        );
        for malformed in [
            "STORE_ELEM [%a], %w0, %r, %x;\n",
            "STORE_ELEM4 [%a], {%w0, %w1, %w2, %w3}, {%r};\n",
            "STORE_ELEM4 [%a], {%w0, %w1, %w2};\n",
        ] {
            assert!(
                expand(malformed, &Roles::single(bf16_type()), "", &values()).is_err(),
                "{malformed}"
            );
        }
        assert!(
            expand(
                "STORE_ELEM [%a], %w0, %r;\n",
                &Roles::single(f32_type()),
                "",
                &values()
            )
            .is_err()
        );
    }

    #[test]
    fn update_roles_type_each_buffer_and_mixed_lines_follow_the_pair() {
        let (f32_type, bf16_type) = (f32_type(), bf16_type());
        let template = "  LOAD_ELEM.nc:G %g0, [%a];\n\
                        \x20 STORE_ELEM:W [%b], %w0;\n\
                        @mixed STORE_ELEM:G [%c], %w0;\n\
                        @half:W mov.b32 %r, 1;\n\
                        // {{W}} {{G}} {{ELEM_BYTES:W}} {{QUAD_BYTES:G}}\n";
        let mixed = expand(template, &Roles::update(f32_type, bf16_type), "", &values()).unwrap();
        assert_eq!(
            mixed,
            "  ld.global.nc.b16 %half0, [%a];\n  cvt.f32.bf16 %g0, %half0;\n\
             \x20 st.global.f32 [%b], %w0;\n\
             cvt.rn.bf16.f32 %half0, %w0;\nst.global.b16 [%c], %half0;\n\
             // f32 bf16 4 8\n"
        );
        let same = expand(
            template,
            &Roles::update(bf16_type, bf16_type),
            "",
            &values(),
        )
        .unwrap();
        assert!(!same.contains("[%c]"), "not mixed: {same}");
        assert!(same.contains("mov.b32 %r, 1;"), "16-bit W: {same}");
        let f32_same = expand(template, &Roles::update(f32_type, f32_type), "", &values()).unwrap();
        assert!(
            !f32_same.contains("[%c]") && !f32_same.contains("%r"),
            "{f32_same}"
        );
        // A role the module lacks, or one that does not exist, is an error.
        for bad in [
            "LOAD_ELEM:W %g0, [%a];\n",
            "// {{G}}\n",
            "@half:X a;\n",
            "STORE_ELEM:Q [%a], %w;\n",
        ] {
            assert!(
                expand(bad, &Roles::single(f32_type), "", &values()).is_err(),
                "{bad}"
            );
        }
        assert!(expand("MOMENTUM:W %a, %b, %c, %d;\n", &Roles::NONE, "", &values()).is_err());
        // A role-less `@half` in the update (no role T), or `@half:W` in a power pass (no W),
        // is an error, not a line dropped.
        let update = Roles::update(f32_type, bf16_type);
        assert!(expand("@half a;\n", &update, "", &values()).is_err());
        assert!(expand("@half:W a;\n", &Roles::single(bf16_type), "", &values()).is_err());
    }

    #[test]
    fn the_module_specs_name_each_pair_once() {
        let specs = module_specs();
        for variant in ["power", "orth"] {
            let updates: Vec<(&str, &str)> = specs
                .iter()
                .filter(|spec| spec.file == "update.ptx" && spec.variant == variant)
                .map(|spec| (spec.roles.w.unwrap().name, spec.roles.g.unwrap().name))
                .collect();
            assert_eq!(
                updates,
                [
                    ("f32", "f32"),
                    ("f16", "f16"),
                    ("bf16", "bf16"),
                    ("f32", "f16"),
                    ("f32", "bf16")
                ],
                "{variant}"
            );
        }
        // Power passes, finish, both updates, the orthogonalised rule's direction kernels,
        // polynomial and check.
        assert_eq!(specs.len(), 6 + 1 + 2 * 5 + 6 + 2);
    }
}
