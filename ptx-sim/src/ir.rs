//! The decoded form of a PTX module: what the parser produces once and the executor runs.
//!
//! Registers, labels, parameters and shared variables are resolved to indices and offsets
//! here, so nothing is looked up by name while a kernel runs.

use std::fmt;

/// A PTX fundamental type (`.b32`, `.u64`, `.f32`, `.pred`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Type {
    /// Untyped bits.
    B8,
    /// Untyped bits.
    B16,
    /// Untyped bits.
    B32,
    /// Untyped bits.
    B64,
    /// Unsigned integer.
    U8,
    /// Unsigned integer.
    U16,
    /// Unsigned integer.
    U32,
    /// Unsigned integer.
    U64,
    /// Signed integer.
    S8,
    /// Signed integer.
    S16,
    /// Signed integer.
    S32,
    /// Signed integer.
    S64,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    Bf16,
    /// IEEE binary32.
    F32,
    /// IEEE binary64.
    F64,
    /// Predicate (one bit).
    Pred,
}

impl Type {
    /// Parses a type modifier without its dot (`"u32"`).
    pub fn from_name(name: &str) -> Option<Type> {
        Some(match name {
            "b8" => Type::B8,
            "b16" => Type::B16,
            "b32" => Type::B32,
            "b64" => Type::B64,
            "u8" => Type::U8,
            "u16" => Type::U16,
            "u32" => Type::U32,
            "u64" => Type::U64,
            "s8" => Type::S8,
            "s16" => Type::S16,
            "s32" => Type::S32,
            "s64" => Type::S64,
            "f16" => Type::F16,
            "bf16" => Type::Bf16,
            "f32" => Type::F32,
            "f64" => Type::F64,
            "pred" => Type::Pred,
            _ => return None,
        })
    }

    /// Size in bits (1 for a predicate).
    pub fn bits(self) -> u32 {
        match self {
            Type::Pred => 1,
            Type::B8 | Type::U8 | Type::S8 => 8,
            Type::B16 | Type::U16 | Type::S16 | Type::F16 | Type::Bf16 => 16,
            Type::B32 | Type::U32 | Type::S32 | Type::F32 => 32,
            Type::B64 | Type::U64 | Type::S64 | Type::F64 => 64,
        }
    }

    /// Size in bytes in memory (predicates cannot be stored).
    pub fn bytes(self) -> u32 {
        self.bits().div_ceil(8)
    }

    /// Floating point (`f16`, `bf16`, `f32`, `f64`).
    pub fn is_float(self) -> bool {
        matches!(self, Type::F16 | Type::Bf16 | Type::F32 | Type::F64)
    }

    /// Signed integer.
    pub fn is_signed(self) -> bool {
        matches!(self, Type::S8 | Type::S16 | Type::S32 | Type::S64)
    }

    /// Integer or untyped bits (not float, not predicate).
    pub fn is_integer(self) -> bool {
        !self.is_float() && self != Type::Pred
    }
}

impl fmt::Display for Type {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = format!("{self:?}").to_lowercase();
        write!(f, ".{name}")
    }
}

/// A register, as an index into each thread's register file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RegId(pub u32);

/// `.x`, `.y` or `.z` of a special register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dim {
    /// `.x`
    X,
    /// `.y`
    Y,
    /// `.z`
    Z,
}

/// A read-only special register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Special {
    /// `%tid`: thread index in the CTA.
    Tid(Dim),
    /// `%ntid`: CTA shape.
    Ntid(Dim),
    /// `%ctaid`: CTA index in the grid.
    Ctaid(Dim),
    /// `%nctaid`: grid shape.
    Nctaid(Dim),
    /// `%laneid`: lane in the warp.
    LaneId,
}

/// An immediate as written; the instruction's type says how to read it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Immediate {
    /// A decimal or hexadecimal integer (a leading minus already applied).
    Int(i128),
    /// `0fXXXXXXXX`: the bits of an `f32`.
    F32Bits(u32),
    /// `0dXXXXXXXXXXXXXXXX`: the bits of an `f64`.
    F64Bits(u64),
    /// A decimal float such as `1.5`.
    Float(f64),
}

/// A source operand.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Operand {
    /// A register.
    Reg(RegId),
    /// A predicate register read negated (`!%p`), in `selp`-like positions.
    NotReg(RegId),
    /// An immediate.
    Imm(Immediate),
    /// A special register.
    Special(Special),
    /// The address of a kernel parameter (byte offset in the parameter block).
    Param(u32),
    /// The address of a shared variable (byte offset in the CTA's shared memory).
    Shared(u32),
}

/// What an address is relative to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressBase {
    /// A register holding a byte address.
    Reg(RegId),
    /// A kernel parameter (for `ld.param`).
    Param(u32),
    /// A shared variable.
    Shared(u32),
}

/// `[base + offset]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Address {
    /// The base.
    pub base: AddressBase,
    /// A constant byte offset.
    pub offset: i64,
}

/// A state space of a memory access.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Space {
    /// Kernel parameters.
    Param,
    /// Device memory.
    Global,
    /// CTA-shared memory.
    Shared,
}

/// Two-operand arithmetic and logic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BinaryOp {
    /// `add`
    Add,
    /// `sub`
    Sub,
    /// `mul.lo` (integers) or `mul` (floats)
    Mul,
    /// `mul.hi`
    MulHi,
    /// `mul.wide`: the full product, twice the width of the inputs.
    MulWide,
    /// `div`
    Div,
    /// `rem`
    Rem,
    /// `shl` (shift amounts clamp at the width)
    Shl,
    /// `shr` (arithmetic for signed types; amounts clamp at the width)
    Shr,
    /// `and`
    And,
    /// `or`
    Or,
    /// `xor`
    Xor,
    /// `min`
    Min,
    /// `max`
    Max,
}

/// One-operand operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnaryOp {
    /// `neg`
    Neg,
    /// `abs`
    Abs,
    /// `not`
    Not,
    /// `sqrt.rn`
    SqrtRn,
    /// `sqrt.approx`
    SqrtApprox,
    /// `rsqrt.approx`
    RsqrtApprox,
    /// `rcp.rn`
    RcpRn,
    /// `rcp.approx`
    RcpApprox,
}

/// `setp` comparisons.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Compare {
    /// `eq`
    Eq,
    /// `ne`
    Ne,
    /// `lt`
    Lt,
    /// `le`
    Le,
    /// `gt`
    Gt,
    /// `ge`
    Ge,
    /// `lo` (unsigned <)
    Lo,
    /// `ls` (unsigned <=)
    Ls,
    /// `hi` (unsigned >)
    Hi,
    /// `hs` (unsigned >=)
    Hs,
    /// `equ` (float: equal or unordered)
    Equ,
    /// `neu` (float: not equal or unordered)
    Neu,
    /// `ltu`
    Ltu,
    /// `leu`
    Leu,
    /// `gtu`
    Gtu,
    /// `geu`
    Geu,
    /// `num` (float: both ordered)
    Num,
    /// `nan` (float: either NaN)
    Nan,
}

/// Rounding of a `cvt`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rounding {
    /// `.rn`: to nearest, ties to even (float results).
    Rn,
    /// `.rni`: to nearest integer, ties to even (integer results).
    Rni,
    /// `.rzi`: toward zero (integer results).
    Rzi,
}

/// `shfl.sync` modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ShuffleMode {
    /// `.up`
    Up,
    /// `.down`
    Down,
    /// `.bfly`
    Bfly,
    /// `.idx`
    Idx,
}

/// A decoded operation.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// `ld.space[.nc][.vN].type dst, [addr]`
    Ld {
        /// State space.
        space: Space,
        /// `.nc` (read-only path).
        non_coherent: bool,
        /// Element type.
        ty: Type,
        /// One register per vector element.
        dst: Vec<RegId>,
        /// Address of the first element.
        addr: Address,
    },
    /// `st.space[.vN].type [addr], src`
    St {
        /// State space.
        space: Space,
        /// Element type.
        ty: Type,
        /// Address of the first element.
        addr: Address,
        /// One operand per vector element.
        src: Vec<Operand>,
    },
    /// `mov.type dst, src`
    Mov {
        /// Type.
        ty: Type,
        /// Destination.
        dst: RegId,
        /// Source.
        src: Operand,
    },
    /// `cvta.to.global.u64 dst, src`: generic to global address (the identity here).
    CvtaToGlobal {
        /// Destination.
        dst: RegId,
        /// Source.
        src: Operand,
    },
    /// Two-operand arithmetic.
    Binary {
        /// Operation.
        op: BinaryOp,
        /// Type of the inputs.
        ty: Type,
        /// Destination.
        dst: RegId,
        /// First input.
        a: Operand,
        /// Second input.
        b: Operand,
    },
    /// `mad.lo` / `mad.wide` (integers): `a * b + c`.
    Mad {
        /// `.wide`: inputs of `ty`, product and `c` twice as wide.
        wide: bool,
        /// Type of `a` and `b`.
        ty: Type,
        /// Destination.
        dst: RegId,
        /// Factor.
        a: Operand,
        /// Factor.
        b: Operand,
        /// Addend.
        c: Operand,
    },
    /// `fma.rn.f32` (and `mad.rn.f32`): `a * b + c`, one rounding.
    Fma {
        /// Type.
        ty: Type,
        /// Destination.
        dst: RegId,
        /// Factor.
        a: Operand,
        /// Factor.
        b: Operand,
        /// Addend.
        c: Operand,
    },
    /// One-operand operations.
    Unary {
        /// Operation.
        op: UnaryOp,
        /// Type.
        ty: Type,
        /// Destination.
        dst: RegId,
        /// Input.
        a: Operand,
    },
    /// `setp.cmp.type p, a, b`
    Setp {
        /// Comparison.
        cmp: Compare,
        /// Type of the inputs.
        ty: Type,
        /// Predicate destination.
        dst: RegId,
        /// Left side.
        a: Operand,
        /// Right side.
        b: Operand,
    },
    /// `selp.type d, a, b, p`: `p ? a : b`.
    Selp {
        /// Type.
        ty: Type,
        /// Destination.
        dst: RegId,
        /// Chosen when `p` holds.
        a: Operand,
        /// Chosen otherwise.
        b: Operand,
        /// The predicate.
        pred: Operand,
    },
    /// `cvt[.rnd].dtype.stype d, a`
    Cvt {
        /// Rounding, where the conversion needs one.
        rounding: Option<Rounding>,
        /// Destination type.
        to: Type,
        /// Source type.
        from: Type,
        /// Destination.
        dst: RegId,
        /// Source.
        src: Operand,
    },
    /// `bar.sync a[, b]`
    BarSync {
        /// Barrier number.
        barrier: Operand,
        /// Expected thread count, if given.
        threads: Option<Operand>,
    },
    /// `bar.warp.sync mask`
    BarWarpSync {
        /// Participating lanes.
        mask: Operand,
    },
    /// `shfl.sync.mode.b32 d[|p], a, b, c, membermask`
    Shfl {
        /// Mode.
        mode: ShuffleMode,
        /// Destination.
        dst: RegId,
        /// Optional predicate destination: the source lane was in range.
        pred_dst: Option<RegId>,
        /// Value to exchange.
        src: Operand,
        /// Source lane or lane offset.
        lane: Operand,
        /// Clamp value and segment mask (`c[4:0]`, `c[12:8]`).
        clamp: Operand,
        /// Participating lanes.
        member_mask: Operand,
    },
    /// `atom.global.add.type d, [a], b` (with `dst`) or `red.global.add.type [a], b` (without).
    AtomAdd {
        /// Type (`u32` or `f32`).
        ty: Type,
        /// Old value destination (`atom`), or none (`red`).
        dst: Option<RegId>,
        /// Address.
        addr: Address,
        /// Addend.
        src: Operand,
    },
    /// `membar.*` / `fence.*`: ordering only; sequentially consistent here.
    Fence,
    /// `bra[.uni] target`
    Bra {
        /// Index of the target instruction.
        target: usize,
    },
    /// `ret` / `exit`
    Exit,
}

/// `@p` or `@!p`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Guard {
    /// The predicate register.
    pub reg: RegId,
    /// `@!p`
    pub negated: bool,
}

/// One decoded instruction, with where it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Instruction {
    /// Execute only where the guard holds.
    pub guard: Option<Guard>,
    /// The operation.
    pub op: Op,
    /// 1-based source line.
    pub line: usize,
    /// The opcode as written (for messages).
    pub opcode: String,
}

/// A `.param` of an entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Param {
    /// Name.
    pub name: String,
    /// Type.
    pub ty: Type,
    /// Byte offset in the parameter block (naturally aligned).
    pub offset: u32,
}

/// A `.shared` variable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedVar {
    /// Name.
    pub name: String,
    /// Byte offset in the CTA's shared memory.
    pub offset: u32,
    /// Size in bytes (0 for the dynamic `extern` array, which takes the launch's size).
    pub size: u32,
    /// Alignment in bytes.
    pub align: u32,
}

/// A register as declared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegDecl {
    /// Name, e.g. `%r3`.
    pub name: String,
    /// Declared type.
    pub ty: Type,
}

/// A `.entry` kernel, fully decoded.
#[derive(Clone, Debug, PartialEq)]
pub struct Kernel {
    /// Name.
    pub name: String,
    /// Parameters in order.
    pub params: Vec<Param>,
    /// Bytes of the parameter block.
    pub param_bytes: u32,
    /// Registers, indexed by [`RegId`].
    pub registers: Vec<RegDecl>,
    /// Static shared variables, then the dynamic one (if any) at the end.
    pub shared: Vec<SharedVar>,
    /// Bytes of static shared memory (the dynamic array starts here, aligned).
    pub static_shared_bytes: u32,
    /// Instructions; branch targets index into this.
    pub instructions: Vec<Instruction>,
}

/// A parsed PTX module.
#[derive(Clone, Debug, PartialEq)]
pub struct Module {
    /// `.version`
    pub version: String,
    /// `.target`
    pub target: String,
    /// The entries.
    pub kernels: Vec<Kernel>,
}

impl Module {
    /// The kernel named `name`.
    pub fn kernel(&self, name: &str) -> Option<&Kernel> {
        self.kernels.iter().find(|kernel| kernel.name == name)
    }
}
