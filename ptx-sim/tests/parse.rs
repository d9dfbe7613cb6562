//! The parser: every construct the kernels use decodes to the expected IR, and everything it
//! does not implement is an error that names its line.

use ptx_sim::ir::*;
use ptx_sim::{SimError, parse};

const HEADER: &str = ".version 7.8\n.target sm_80\n.address_size 64\n";

/// A kernel exercising each construct once; line numbers matter for the assertions below.
const KERNEL: &str = r#".version 7.8
.target sm_80
.address_size 64
.extern .shared .align 16 .b8 dynamic[];
.visible .entry every_construct(
    .param .u64 data,
    .param .u32 count,
    .param .u64 out
) {
    .reg .pred %p<3>;
    .reg .b32 %r<8>;
    .reg .b64 %rd<5>;
    .reg .f32 %f<6>;
    .reg .b16 %h<2>;
    .shared .align 8 .f32 partial[33];
    ld.param.u64 %rd1, [data];
    ld.param.u32 %r1, [count];
    cvta.to.global.u64 %rd2, %rd1;
    mov.u32 %r2, %tid.x;
    mov.u32 %r3, %laneid;
    setp.ge.u32 %p1, %r2, %r1;
    @%p1 bra $L_done;
$L_loop:
    mul.wide.u32 %rd3, %r2, 16;
    add.s64 %rd4, %rd2, %rd3;
    ld.global.nc.v4.f32 {%f1, %f2, %f3, %f4}, [%rd4+16];
    fma.rn.f32 %f5, %f1, %f2, 0f3F800000;
    shfl.sync.bfly.b32 %r4|%p2, %r2, 16, 31, -1;
    shfl.sync.down.b32 %r5, %r2, 1, 0x1f, 0xffffffff;
    @!%p2 st.shared.f32 [partial+4], %f5;
    bar.sync 0;
    cvt.rn.bf16.f32 %h1, %f5;
    cvt.u64.u32 %rd3, %r2;
    selp.b32 %r6, 1, 0, !%p1;
    red.global.add.f32 [%rd2], %f5;
    atom.global.add.u32 %r7, [%rd2+8], 1;
    add.u32 %r2, %r2, 32;
    setp.lt.u32 %p1, %r2, %r1;
    @%p1 bra.uni $L_loop;
$L_done:
    mov.u64 %rd1, dynamic;
    st.shared.v2.f32 [%rd1], {%f1, %f2};
    ret;
}
"#;

#[test]
fn every_construct_decodes() {
    let module = parse(KERNEL).expect("kernel parses");
    assert_eq!(module.version, "7.8");
    assert_eq!(module.target, "sm_80");
    let kernel = module.kernel("every_construct").expect("kernel present");

    // Parameters are naturally aligned: u64 at 0, u32 at 8, u64 at 16.
    let offsets: Vec<(String, u32)> = kernel
        .params
        .iter()
        .map(|p| (p.name.clone(), p.offset))
        .collect();
    assert_eq!(
        offsets,
        vec![("data".into(), 0), ("count".into(), 8), ("out".into(), 16)]
    );
    assert_eq!(kernel.param_bytes, 24);

    // 3 + 8 + 5 + 6 + 2 registers, `%r<8>` meaning %r0..%r7.
    assert_eq!(kernel.registers.len(), 24);
    assert_eq!(kernel.registers[3].name, "%r0");
    assert_eq!(kernel.registers[3].ty, Type::B32);

    // Static shared first (33 f32 = 132 bytes), then the dynamic array, aligned to 16.
    assert_eq!(
        kernel.shared[0],
        SharedVar {
            name: "partial".into(),
            offset: 0,
            size: 132,
            align: 8
        }
    );
    assert_eq!(kernel.shared[1].name, "dynamic");
    assert_eq!(kernel.shared[1].offset, 144);
    assert_eq!(kernel.static_shared_bytes, 132);

    let ops: Vec<&Op> = kernel.instructions.iter().map(|i| &i.op).collect();
    assert_eq!(ops.len(), 26);
    let reg = |name: &str| {
        RegId(
            kernel
                .registers
                .iter()
                .position(|r| r.name == name)
                .unwrap() as u32,
        )
    };

    // The guarded forward branch resolves to `$L_done` (instruction 23) and the loop branch
    // to `$L_loop` (instruction 7).
    assert_eq!(
        kernel.instructions[6].guard,
        Some(Guard {
            reg: reg("%p1"),
            negated: false
        })
    );
    assert_eq!(*ops[6], Op::Bra { target: 23 });
    assert_eq!(*ops[22], Op::Bra { target: 7 });
    assert_eq!(kernel.instructions[22].line, 39);

    assert_eq!(
        *ops[9],
        Op::Ld {
            space: Space::Global,
            non_coherent: true,
            ty: Type::F32,
            dst: vec![reg("%f1"), reg("%f2"), reg("%f3"), reg("%f4")],
            addr: Address {
                base: AddressBase::Reg(reg("%rd4")),
                offset: 16
            },
        }
    );
    assert_eq!(
        *ops[10],
        Op::Fma {
            ty: Type::F32,
            dst: reg("%f5"),
            a: Operand::Reg(reg("%f1")),
            b: Operand::Reg(reg("%f2")),
            c: Operand::Imm(Immediate::F32Bits(0x3F80_0000)),
        }
    );
    assert_eq!(
        *ops[11],
        Op::Shfl {
            mode: ShuffleMode::Bfly,
            dst: reg("%r4"),
            pred_dst: Some(reg("%p2")),
            src: Operand::Reg(reg("%r2")),
            lane: Operand::Imm(Immediate::Int(16)),
            clamp: Operand::Imm(Immediate::Int(31)),
            member_mask: Operand::Imm(Immediate::Int(-1)),
        }
    );
    assert_eq!(
        kernel.instructions[13].guard,
        Some(Guard {
            reg: reg("%p2"),
            negated: true
        })
    );
    assert_eq!(
        *ops[13],
        Op::St {
            space: Space::Shared,
            ty: Type::F32,
            addr: Address {
                base: AddressBase::Shared(0),
                offset: 4
            },
            src: vec![Operand::Reg(reg("%f5"))],
        }
    );
    assert_eq!(
        *ops[14],
        Op::BarSync {
            barrier: Operand::Imm(Immediate::Int(0)),
            threads: None
        }
    );
    assert!(matches!(
        ops[15],
        Op::Cvt {
            rounding: Some(Rounding::Rn),
            to: Type::Bf16,
            from: Type::F32,
            ..
        }
    ));
    assert!(matches!(
        ops[16],
        Op::Cvt {
            rounding: None,
            to: Type::U64,
            from: Type::U32,
            ..
        }
    ));
    assert!(matches!(
        ops[17],
        Op::Selp {
            pred: Operand::NotReg(_),
            ..
        }
    ));
    assert!(matches!(
        ops[18],
        Op::AtomAdd {
            ty: Type::F32,
            dst: None,
            ..
        }
    ));
    assert!(matches!(
        ops[19],
        Op::AtomAdd {
            ty: Type::U32,
            dst: Some(_),
            addr: Address { offset: 8, .. },
            ..
        }
    ));
    assert!(matches!(
        ops[3],
        Op::Mov {
            src: Operand::Special(Special::Tid(Dim::X)),
            ..
        }
    ));
    assert!(matches!(
        ops[4],
        Op::Mov {
            src: Operand::Special(Special::LaneId),
            ..
        }
    ));
    assert!(matches!(
        ops[23],
        Op::Mov {
            src: Operand::Shared(144),
            ..
        }
    ));
    assert!(matches!(ops[24], Op::St { space: Space::Shared, src, .. } if src.len() == 2));
    assert_eq!(*ops[25], Op::Exit);
}

fn error_of(body: &str) -> (usize, String) {
    let text = format!(
        "{HEADER}.visible .entry k(.param .u64 p) {{\n.reg .b32 %r<4>;\n.reg .pred %p<2>;\n{body}\n}}\n"
    );
    match parse(&text) {
        Err(SimError::Parse { line, message }) => (line, message),
        other => panic!("expected a parse error for {body:?}, got {other:?}"),
    }
}

#[test]
fn unsupported_input_is_an_error_naming_its_line() {
    // The body starts on line 7 of the generated text.
    let cases = [
        ("frobnicate.u32 %r1, %r2;", "unknown opcode frobnicate.u32"),
        (
            "rsqrt.approx.ftz.f32 %r1, %r2;",
            "unsupported modifier .ftz",
        ),
        ("add.sat.s32 %r1, %r2, %r3;", "unsupported modifier .sat"),
        ("mul.u32 %r1, %r2, %r3;", "needs .lo, .hi or .wide"),
        ("div.approx.f32 %r1, %r2, %r3;", "needs .rn"),
        ("add.u32 %r1, %r9, 1;", "undeclared register %r9"),
        ("bra $nowhere;", "unknown label $nowhere"),
        ("@%r1 ret;", "%r1 is not a .pred register"),
        ("add.u32 %r1, %r2;", "takes 3 operands, found 2"),
        (
            "ld.global.v4.f32 {%r1, %r2}, [%r3];",
            "moves 4 values, found 2",
        ),
        ("ld.global.f32 %r1, [nowhere];", "unknown symbol nowhere"),
        ("cvt.f16.f32 %r1, %r2;", "unsupported conversion"),
        ("shfl.sync.bfly.b64 %r1, %r2, 1, 31, -1;", "needs .b32"),
        ("setp.lo.f32 %p1, %r1, %r2;", "not supported by setp.lo.f32"),
        (".local .b32 scratch[4];", "unsupported directive .local"),
        ("{ ret; }", "nested { } scopes are not supported"),
        (
            "ld.local.u32 %r1, [%r2];",
            "needs .param, .global or .shared",
        ),
        ("add.u32 %r1, %r2, #;", "unexpected character '#'"),
    ];
    for (body, expected) in cases {
        let (line, message) = error_of(body);
        assert_eq!(line, 7, "{body}: wrong line in {message:?}");
        assert!(
            message.contains(expected),
            "{body}: message {message:?} lacks {expected:?}"
        );
    }
}

#[test]
fn module_level_mistakes_are_errors() {
    let check = |text: &str, line: usize, expected: &str| match parse(text) {
        Err(SimError::Parse { line: got, message }) => {
            assert_eq!(got, line, "{text:?}: {message}");
            assert!(
                message.contains(expected),
                "{text:?}: {message:?} lacks {expected:?}"
            );
        }
        other => panic!("expected an error for {text:?}, got {other:?}"),
    };
    check(
        ".version 7.0\n.target sm_80\n.address_size 32\n",
        3,
        "only .address_size 64",
    );
    check(".target sm_80\n.address_size 64\n", 2, "missing .version");
    check(
        ".version 7.0\n.target sm_80\n.global .u32 x;\n",
        3,
        "unsupported directive .global",
    );
    check(
        &format!("{HEADER}.visible .entry k() .maxntid 256 {{ ret; }}\n"),
        4,
        "unsupported entry directive .maxntid",
    );
    check(
        &format!("{HEADER}/* never closed\n"),
        4,
        "unterminated /* comment",
    );
    check(
        &format!("{HEADER}.visible .entry k() {{\n$a:\n$a:\nret;\n}}\n"),
        6,
        "label $a defined twice",
    );
    check(
        &format!("{HEADER}.visible .entry k(.param .u32 a, .param .u32 a) {{ ret; }}\n"),
        4,
        "declared twice",
    );
}

#[test]
fn immediates_and_comments() {
    let text = format!(
        "{HEADER}// a comment\n.visible .entry k() {{ /* a\n block */\n.reg .f32 %f<2>;\n.reg .b32 %r<2>;\n\
         mov.f32 %f1, 0f40490FDB; // pi\nmov.f32 %f0, 1.5e-3;\nmov.u32 %r1, 0xFFFFFFFF;\nmov.u32 %r0, -7;\nret;\n}}\n"
    );
    let module = parse(&text).unwrap();
    let ops: Vec<&Op> = module.kernels[0]
        .instructions
        .iter()
        .map(|i| &i.op)
        .collect();
    assert!(matches!(
        ops[0],
        Op::Mov {
            src: Operand::Imm(Immediate::F32Bits(0x4049_0FDB)),
            ..
        }
    ));
    assert!(
        matches!(ops[1], Op::Mov { src: Operand::Imm(Immediate::Float(v)), .. } if *v == 1.5e-3)
    );
    assert!(matches!(
        ops[2],
        Op::Mov {
            src: Operand::Imm(Immediate::Int(0xFFFF_FFFF)),
            ..
        }
    ));
    assert!(matches!(
        ops[3],
        Op::Mov {
            src: Operand::Imm(Immediate::Int(-7)),
            ..
        }
    ));
    assert_eq!(module.kernels[0].instructions[0].line, 9);
}
