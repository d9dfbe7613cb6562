//! PTX text to [`Module`]: a small lexer, a statement parser, and a strict decoder.
//!
//! Parsing happens once. Registers, labels, parameters and shared variables are resolved to
//! indices and offsets, and every opcode is decoded with its modifiers checked. A directive,
//! opcode, modifier or type this simulator does not implement is an error naming its line,
//! never a silent no-op.

use std::collections::{HashMap, HashSet};

use crate::error::{Result, parse_error};
use crate::ir::*;
use crate::limits::{
    MAX_KERNEL_REGISTERS, MAX_MODULE_REGISTERS, MAX_MODULE_SHARED_VARIABLES, MAX_PARAM_BYTES,
};

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    /// Identifiers, directives (`.reg`), registers (`%r1`, `%tid.x`), labels, opcodes
    /// (`ld.global.f32`).
    Word(String),
    /// A number, with its text (for `.version`).
    Number(Immediate, String),
    Punct(char),
}

#[derive(Clone, Debug)]
struct Token {
    tok: Tok,
    line: usize,
}

fn is_word_start(c: char) -> bool {
    c.is_ascii_alphabetic() || matches!(c, '_' | '$' | '%' | '.')
}

fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '$' | '.')
}

fn number(text: &str, line: usize) -> Result<Immediate> {
    let lower = text.to_ascii_lowercase();
    let digits = lower.trim_end_matches('u');
    let bad = || parse_error(line, format!("malformed number {text:?}"));
    if let Some(hex) = lower.strip_prefix("0f").filter(|h| h.len() == 8) {
        return u32::from_str_radix(hex, 16)
            .map(Immediate::F32Bits)
            .or_else(|_| bad());
    }
    if let Some(hex) = lower.strip_prefix("0d").filter(|h| h.len() == 16) {
        return u64::from_str_radix(hex, 16)
            .map(Immediate::F64Bits)
            .or_else(|_| bad());
    }
    if let Some(hex) = digits.strip_prefix("0x") {
        return u64::from_str_radix(hex, 16)
            .map(|v| Immediate::Int(i128::from(v)))
            .or_else(|_| bad());
    }
    if digits.contains(['.', 'e']) {
        return digits
            .parse::<f64>()
            .map(Immediate::Float)
            .or_else(|_| bad());
    }
    digits
        .parse::<u64>()
        .map(|v| Immediate::Int(i128::from(v)))
        .or_else(|_| bad())
}

fn lex(text: &str) -> Result<Vec<Token>> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let (mut i, mut line) = (0, 1);
    while i < chars.len() {
        let c = chars[i];
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c == '/' && chars.get(i + 1) == Some(&'/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && chars.get(i + 1) == Some(&'*') {
            let start = line;
            i += 2;
            while i < chars.len() && !(chars[i] == '*' && chars.get(i + 1) == Some(&'/')) {
                line += usize::from(chars[i] == '\n');
                i += 1;
            }
            if i >= chars.len() {
                return parse_error(start, "unterminated /* comment");
            }
            i += 2;
        } else if c.is_ascii_digit() {
            let start = i;
            while i < chars.len()
                && (is_word_char(chars[i])
                    || (matches!(chars[i], '+' | '-')
                        && matches!(chars[i - 1], 'e' | 'E')
                        && !chars[start..i]
                            .iter()
                            .any(|&d| matches!(d, 'x' | 'X' | 'f' | 'F' | 'd' | 'D'))))
            {
                i += 1;
            }
            let text: String = chars[start..i].iter().collect();
            tokens.push(Token {
                tok: Tok::Number(number(&text, line)?, text),
                line,
            });
        } else if is_word_start(c) {
            let start = i;
            i += 1;
            while i < chars.len() && is_word_char(chars[i]) {
                i += 1;
            }
            tokens.push(Token {
                tok: Tok::Word(chars[start..i].iter().collect()),
                line,
            });
        } else if ",;:[]{}()<>+-|@!".contains(c) {
            tokens.push(Token {
                tok: Tok::Punct(c),
                line,
            });
            i += 1;
        } else {
            return parse_error(line, format!("unexpected character {c:?}"));
        }
    }
    Ok(tokens)
}

/// An operand as written, before names are resolved.
#[derive(Clone, Debug)]
enum Raw {
    Word(String),
    Not(String),
    Imm(Immediate),
    Address { base: String, offset: i64 },
    Vector(Vec<Raw>),
    Pair(String, String),
}

#[derive(Clone, Debug)]
struct RawInstruction {
    guard: Option<(String, bool)>,
    opcode: String,
    operands: Vec<Raw>,
    line: usize,
}

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
}

impl Parser {
    fn line(&self) -> usize {
        self.tokens
            .get(self.pos)
            .or(self.tokens.last())
            .map_or(1, |t| t.line)
    }

    fn peek(&self) -> Option<&Tok> {
        self.tokens.get(self.pos).map(|t| &t.tok)
    }

    fn peek_punct(&self, c: char) -> bool {
        self.peek() == Some(&Tok::Punct(c))
    }

    fn next(&mut self) -> Result<Tok> {
        let token = self.tokens.get(self.pos).cloned();
        match token {
            Some(token) => {
                self.pos += 1;
                Ok(token.tok)
            }
            None => parse_error(self.line(), "unexpected end of input"),
        }
    }

    fn expect_punct(&mut self, c: char) -> Result<()> {
        let line = self.line();
        match self.next()? {
            Tok::Punct(p) if p == c => Ok(()),
            other => parse_error(line, format!("expected {c:?}, found {other:?}")),
        }
    }

    fn word(&mut self) -> Result<String> {
        let line = self.line();
        match self.next()? {
            Tok::Word(w) => Ok(w),
            other => parse_error(line, format!("expected a name, found {other:?}")),
        }
    }

    fn expect_word(&mut self, expected: &str) -> Result<()> {
        let line = self.line();
        let word = self.word()?;
        if word == expected {
            Ok(())
        } else {
            parse_error(line, format!("expected {expected}, found {word}"))
        }
    }

    fn integer(&mut self) -> Result<u64> {
        let line = self.line();
        match self.next()? {
            Tok::Number(Immediate::Int(v), _) => {
                u64::try_from(v).or_else(|_| parse_error(line, "integer out of range"))
            }
            other => parse_error(line, format!("expected an integer, found {other:?}")),
        }
    }

    fn type_directive(&mut self) -> Result<Type> {
        let line = self.line();
        let word = self.word()?;
        word.strip_prefix('.')
            .and_then(Type::from_name)
            .map_or_else(
                || parse_error(line, format!("expected a type, found {word}")),
                Ok,
            )
    }

    /// An operand; a `{a, b, ...}` vector holds scalar operands only, so the parser never
    /// recurses more than one level, whatever the text.
    fn operand(&mut self) -> Result<Raw> {
        if !self.peek_punct('{') {
            return self.scalar_operand();
        }
        self.pos += 1;
        let mut elements = vec![self.scalar_operand()?];
        while self.peek_punct(',') {
            self.pos += 1;
            elements.push(self.scalar_operand()?);
        }
        self.expect_punct('}')?;
        Ok(Raw::Vector(elements))
    }

    fn scalar_operand(&mut self) -> Result<Raw> {
        let line = self.line();
        match self.next()? {
            Tok::Word(w) => {
                if self.peek_punct('|') {
                    self.pos += 1;
                    return Ok(Raw::Pair(w, self.word()?));
                }
                Ok(Raw::Word(w))
            }
            Tok::Number(value, _) => Ok(Raw::Imm(value)),
            Tok::Punct('-') => match self.next()? {
                Tok::Number(Immediate::Int(v), _) => Ok(Raw::Imm(Immediate::Int(-v))),
                Tok::Number(Immediate::Float(v), _) => Ok(Raw::Imm(Immediate::Float(-v))),
                other => parse_error(line, format!("cannot negate {other:?}")),
            },
            Tok::Punct('!') => Ok(Raw::Not(self.word()?)),
            Tok::Punct('[') => {
                let base = self.word()?;
                let mut offset = 0i64;
                if self.peek_punct('+') || self.peek_punct('-') {
                    let negative = self.peek_punct('-');
                    self.pos += 1;
                    let magnitude = i64::try_from(self.integer()?)
                        .or_else(|_| parse_error(line, "address offset out of range"))?;
                    offset = if negative { -magnitude } else { magnitude };
                }
                self.expect_punct(']')?;
                Ok(Raw::Address { base, offset })
            }
            Tok::Punct('{') => parse_error(line, "a { } vector cannot hold another vector"),
            other => parse_error(line, format!("unexpected {other:?} in an operand")),
        }
    }
}

/// Names visible while decoding one kernel.
struct Scope {
    registers: HashMap<String, RegId>,
    register_types: Vec<Type>,
    params: HashMap<String, u32>,
    shared: HashMap<String, u32>,
    labels: HashMap<String, usize>,
}

impl Scope {
    fn register(&self, name: &str, line: usize) -> Result<RegId> {
        match self.registers.get(name) {
            Some(&id) => Ok(id),
            None => parse_error(line, format!("undeclared register {name}")),
        }
    }

    fn predicate(&self, name: &str, line: usize) -> Result<RegId> {
        let id = self.register(name, line)?;
        if self.register_types[id.0 as usize] != Type::Pred {
            return parse_error(line, format!("{name} is not a .pred register"));
        }
        Ok(id)
    }

    fn special(name: &str) -> Option<Special> {
        let dim = |suffix: &str| match suffix {
            "x" => Some(Dim::X),
            "y" => Some(Dim::Y),
            "z" => Some(Dim::Z),
            _ => None,
        };
        if name == "%laneid" {
            return Some(Special::LaneId);
        }
        let (base, suffix) = name.rsplit_once('.')?;
        let dim = dim(suffix)?;
        Some(match base {
            "%tid" => Special::Tid(dim),
            "%ntid" => Special::Ntid(dim),
            "%ctaid" => Special::Ctaid(dim),
            "%nctaid" => Special::Nctaid(dim),
            _ => return None,
        })
    }

    fn operand(&self, raw: &Raw, line: usize) -> Result<Operand> {
        match raw {
            Raw::Imm(value) => Ok(Operand::Imm(*value)),
            Raw::Not(name) => Ok(Operand::NotReg(self.predicate(name, line)?)),
            Raw::Word(name) if name.starts_with('%') => match Self::special(name) {
                Some(special) => Ok(Operand::Special(special)),
                None => Ok(Operand::Reg(self.register(name, line)?)),
            },
            Raw::Word(name) => {
                if let Some(&offset) = self.params.get(name) {
                    Ok(Operand::Param(offset))
                } else if let Some(&offset) = self.shared.get(name) {
                    Ok(Operand::Shared(offset))
                } else {
                    parse_error(line, format!("unknown symbol {name}"))
                }
            }
            other => parse_error(line, format!("expected a value, found {other:?}")),
        }
    }

    fn destination(&self, raw: &Raw, line: usize) -> Result<RegId> {
        match raw {
            Raw::Word(name) if name.starts_with('%') && Self::special(name).is_none() => {
                self.register(name, line)
            }
            other => parse_error(
                line,
                format!("expected a destination register, found {other:?}"),
            ),
        }
    }

    fn address(&self, raw: &Raw, space: Space, line: usize) -> Result<Address> {
        let Raw::Address { base, offset } = raw else {
            return parse_error(line, format!("expected an address [..], found {raw:?}"));
        };
        let base = if base.starts_with('%') {
            AddressBase::Reg(self.register(base, line)?)
        } else if let (Space::Param, Some(&at)) = (space, self.params.get(base)) {
            AddressBase::Param(at)
        } else if let (Space::Shared, Some(&at)) = (space, self.shared.get(base)) {
            AddressBase::Shared(at)
        } else {
            return parse_error(
                line,
                format!("unknown symbol {base} in a {space:?} address"),
            );
        };
        Ok(Address {
            base,
            offset: *offset,
        })
    }
}

/// The modifiers of an opcode, consumed as they are recognised; leftovers are errors.
struct Modifiers<'a> {
    opcode: &'a str,
    line: usize,
    parts: Vec<&'a str>,
}

impl<'a> Modifiers<'a> {
    fn take(&mut self, name: &str) -> bool {
        match self.parts.iter().position(|p| *p == name) {
            Some(at) => {
                self.parts.remove(at);
                true
            }
            None => false,
        }
    }

    fn take_one_of(&mut self, names: &[&'a str]) -> Option<&'a str> {
        let at = self.parts.iter().position(|p| names.contains(p))?;
        Some(self.parts.remove(at))
    }

    fn require(&mut self, name: &str) -> Result<()> {
        if self.take(name) {
            Ok(())
        } else {
            parse_error(self.line, format!("{} needs .{name}", self.opcode))
        }
    }

    fn take_type(&mut self) -> Result<Type> {
        match self.parts.iter().position(|p| Type::from_name(p).is_some()) {
            Some(at) => Ok(Type::from_name(self.parts.remove(at)).expect("checked above")),
            None => parse_error(self.line, format!("{} needs a type", self.opcode)),
        }
    }

    fn finish(self) -> Result<()> {
        match self.parts.first() {
            None => Ok(()),
            Some(extra) => parse_error(
                self.line,
                format!("unsupported modifier .{extra} in {}", self.opcode),
            ),
        }
    }
}

fn expect_count(raw: &RawInstruction, count: usize) -> Result<()> {
    if raw.operands.len() == count {
        Ok(())
    } else {
        parse_error(
            raw.line,
            format!(
                "{} takes {count} operands, found {}",
                raw.opcode,
                raw.operands.len()
            ),
        )
    }
}

fn check_type(ok: bool, ty: Type, raw: &RawInstruction) -> Result<()> {
    if ok {
        Ok(())
    } else {
        parse_error(
            raw.line,
            format!("type {ty} is not supported by {}", raw.opcode),
        )
    }
}

/// The input types of `mul.wide` and `mad.wide`, whose results are twice as wide.
fn is_widenable(ty: Type) -> bool {
    matches!(ty, Type::U16 | Type::U32 | Type::S16 | Type::S32)
}

fn decode(raw: &RawInstruction, scope: &Scope) -> Result<Op> {
    let line = raw.line;
    let mut parts = raw.opcode.split('.');
    let base = parts.next().unwrap_or_default();
    let mut m = Modifiers {
        opcode: &raw.opcode,
        line,
        parts: parts.collect(),
    };
    let ops = &raw.operands;
    let operand = |i: usize| scope.operand(&ops[i], line);
    let destination = |i: usize| scope.destination(&ops[i], line);
    let op = match base {
        "ld" | "st" => {
            let space = match m.take_one_of(&["param", "global", "shared"]) {
                Some("param") => Space::Param,
                Some("global") => Space::Global,
                Some(_) => Space::Shared,
                None => {
                    return parse_error(
                        line,
                        format!("{} needs .param, .global or .shared", raw.opcode),
                    );
                }
            };
            let non_coherent = base == "ld" && space == Space::Global && m.take("nc");
            let lanes = match m.take_one_of(&["v2", "v4"]) {
                Some("v2") => 2,
                Some(_) => 4,
                None => 1,
            };
            let ty = m.take_type()?;
            check_type(ty != Type::Pred, ty, raw)?;
            m.finish()?;
            expect_count(raw, 2)?;
            let (value, address) = if base == "ld" {
                (&ops[0], &ops[1])
            } else {
                (&ops[1], &ops[0])
            };
            let values: Vec<&Raw> = match value {
                Raw::Vector(elements) => elements.iter().collect(),
                single => vec![single],
            };
            if values.len() != lanes {
                return parse_error(
                    line,
                    format!(
                        "{} moves {lanes} values, found {}",
                        raw.opcode,
                        values.len()
                    ),
                );
            }
            let addr = scope.address(address, space, line)?;
            if base == "ld" {
                let dst = values
                    .iter()
                    .map(|v| scope.destination(v, line))
                    .collect::<Result<_>>()?;
                Op::Ld {
                    space,
                    non_coherent,
                    ty,
                    dst,
                    addr,
                }
            } else {
                let src = values
                    .iter()
                    .map(|v| scope.operand(v, line))
                    .collect::<Result<_>>()?;
                Op::St {
                    space,
                    ty,
                    addr,
                    src,
                }
            }
        }
        "mov" => {
            let ty = m.take_type()?;
            m.finish()?;
            expect_count(raw, 2)?;
            Op::Mov {
                ty,
                dst: destination(0)?,
                src: operand(1)?,
            }
        }
        "cvta" => {
            m.require("to")?;
            m.require("global")?;
            let ty = m.take_type()?;
            check_type(ty == Type::U64, ty, raw)?;
            m.finish()?;
            expect_count(raw, 2)?;
            Op::CvtaToGlobal {
                dst: destination(0)?,
                src: operand(1)?,
            }
        }
        "add" | "sub" | "mul" | "div" | "rem" | "shl" | "shr" | "and" | "or" | "xor" | "min"
        | "max" => {
            let mul_mode = if base == "mul" {
                m.take_one_of(&["lo", "hi", "wide"])
            } else {
                None
            };
            let op = match base {
                "add" => BinaryOp::Add,
                "sub" => BinaryOp::Sub,
                "mul" => match mul_mode {
                    Some("hi") => BinaryOp::MulHi,
                    Some("wide") => BinaryOp::MulWide,
                    _ => BinaryOp::Mul,
                },
                "div" => BinaryOp::Div,
                "rem" => BinaryOp::Rem,
                "shl" => BinaryOp::Shl,
                "shr" => BinaryOp::Shr,
                "and" => BinaryOp::And,
                "or" => BinaryOp::Or,
                "xor" => BinaryOp::Xor,
                "min" => BinaryOp::Min,
                _ => BinaryOp::Max,
            };
            let ty = m.take_type()?;
            let float_ok = matches!(ty, Type::F32 | Type::F64);
            let supported = match op {
                BinaryOp::Add | BinaryOp::Sub | BinaryOp::Mul | BinaryOp::Min | BinaryOp::Max => {
                    ty.is_integer() || float_ok
                }
                BinaryOp::Div => ty.is_integer() || float_ok,
                BinaryOp::MulHi | BinaryOp::Rem => {
                    ty.is_integer() && !matches!(ty, Type::B8 | Type::B16 | Type::B32 | Type::B64)
                }
                // The product is twice as wide as the inputs, so at most 64 bits.
                BinaryOp::MulWide => is_widenable(ty),
                BinaryOp::Shl | BinaryOp::Shr => ty.is_integer(),
                BinaryOp::And | BinaryOp::Or | BinaryOp::Xor => {
                    matches!(ty, Type::B16 | Type::B32 | Type::B64 | Type::Pred)
                }
            };
            check_type(supported, ty, raw)?;
            if ty.is_float() {
                // Float add/sub/mul/min/max round to nearest by default; div must say so.
                let rounded = m.take("rn");
                if op == BinaryOp::Div && !rounded {
                    return parse_error(
                        line,
                        format!(
                            "{} needs .rn (other divisions are not supported)",
                            raw.opcode
                        ),
                    );
                }
            } else if base == "mul" && mul_mode.is_none() {
                return parse_error(line, format!("{} needs .lo, .hi or .wide", raw.opcode));
            }
            if ty.is_float() && mul_mode.is_some() {
                return parse_error(line, format!("unsupported form {}", raw.opcode));
            }
            m.finish()?;
            expect_count(raw, 3)?;
            Op::Binary {
                op,
                ty,
                dst: destination(0)?,
                a: operand(1)?,
                b: operand(2)?,
            }
        }
        "mad" | "fma" => {
            let wide = m.take_one_of(&["lo", "wide"]).map(|mode| mode == "wide");
            let rounded = m.take("rn");
            let ty = m.take_type()?;
            m.finish()?;
            expect_count(raw, 4)?;
            let (dst, a, b, c) = (destination(0)?, operand(1)?, operand(2)?, operand(3)?);
            match (ty.is_float(), wide) {
                (true, None) if rounded && matches!(ty, Type::F32 | Type::F64) => {
                    Op::Fma { ty, dst, a, b, c }
                }
                (false, Some(wide))
                    if base == "mad"
                        && !rounded
                        && !matches!(ty, Type::B8 | Type::B16 | Type::B32 | Type::B64)
                        && (!wide || is_widenable(ty)) =>
                {
                    Op::Mad {
                        wide,
                        ty,
                        dst,
                        a,
                        b,
                        c,
                    }
                }
                _ => return parse_error(line, format!("unsupported form {}", raw.opcode)),
            }
        }
        "neg" | "abs" | "not" | "sqrt" | "rsqrt" | "rcp" => {
            let op = match base {
                "neg" => UnaryOp::Neg,
                "abs" => UnaryOp::Abs,
                "not" => UnaryOp::Not,
                _ => match (base, m.take_one_of(&["rn", "approx"])) {
                    ("sqrt", Some("rn")) => UnaryOp::SqrtRn,
                    ("sqrt", Some(_)) => UnaryOp::SqrtApprox,
                    ("rsqrt", Some("approx")) => UnaryOp::RsqrtApprox,
                    ("rcp", Some("rn")) => UnaryOp::RcpRn,
                    ("rcp", Some(_)) => UnaryOp::RcpApprox,
                    _ => return parse_error(line, format!("unsupported form {}", raw.opcode)),
                },
            };
            let ty = m.take_type()?;
            let supported = match op {
                UnaryOp::Neg | UnaryOp::Abs => {
                    ty.is_signed() || matches!(ty, Type::F32 | Type::F64)
                }
                UnaryOp::Not => matches!(ty, Type::B16 | Type::B32 | Type::B64 | Type::Pred),
                UnaryOp::SqrtRn => matches!(ty, Type::F32 | Type::F64),
                _ => ty == Type::F32,
            };
            check_type(supported, ty, raw)?;
            m.finish()?;
            expect_count(raw, 2)?;
            Op::Unary {
                op,
                ty,
                dst: destination(0)?,
                a: operand(1)?,
            }
        }
        "setp" => {
            let names = [
                "eq", "ne", "lt", "le", "gt", "ge", "lo", "ls", "hi", "hs", "equ", "neu", "ltu",
                "leu", "gtu", "geu", "num", "nan",
            ];
            let cmp = match m.take_one_of(&names) {
                Some("eq") => Compare::Eq,
                Some("ne") => Compare::Ne,
                Some("lt") => Compare::Lt,
                Some("le") => Compare::Le,
                Some("gt") => Compare::Gt,
                Some("ge") => Compare::Ge,
                Some("lo") => Compare::Lo,
                Some("ls") => Compare::Ls,
                Some("hi") => Compare::Hi,
                Some("hs") => Compare::Hs,
                Some("equ") => Compare::Equ,
                Some("neu") => Compare::Neu,
                Some("ltu") => Compare::Ltu,
                Some("leu") => Compare::Leu,
                Some("gtu") => Compare::Gtu,
                Some("geu") => Compare::Geu,
                Some("num") => Compare::Num,
                Some(_) => Compare::Nan,
                None => return parse_error(line, format!("{} needs a comparison", raw.opcode)),
            };
            let ty = m.take_type()?;
            let float_only = matches!(
                cmp,
                Compare::Equ
                    | Compare::Neu
                    | Compare::Ltu
                    | Compare::Leu
                    | Compare::Gtu
                    | Compare::Geu
                    | Compare::Num
                    | Compare::Nan
            );
            let unsigned_only =
                matches!(cmp, Compare::Lo | Compare::Ls | Compare::Hi | Compare::Hs);
            let supported = ty != Type::Pred
                && !matches!(ty, Type::F16 | Type::Bf16)
                && (!float_only || ty.is_float())
                && (!unsigned_only || !ty.is_float());
            check_type(supported, ty, raw)?;
            m.finish()?;
            expect_count(raw, 3)?;
            let dst = match &ops[0] {
                Raw::Word(name) => scope.predicate(name, line)?,
                other => {
                    return parse_error(
                        line,
                        format!("setp writes one predicate, found {other:?}"),
                    );
                }
            };
            Op::Setp {
                cmp,
                ty,
                dst,
                a: operand(1)?,
                b: operand(2)?,
            }
        }
        "selp" => {
            let ty = m.take_type()?;
            check_type(ty != Type::Pred, ty, raw)?;
            m.finish()?;
            expect_count(raw, 4)?;
            let pred = match &ops[3] {
                Raw::Word(name) => Operand::Reg(scope.predicate(name, line)?),
                Raw::Not(name) => Operand::NotReg(scope.predicate(name, line)?),
                other => {
                    return parse_error(line, format!("selp needs a predicate, found {other:?}"));
                }
            };
            Op::Selp {
                ty,
                dst: destination(0)?,
                a: operand(1)?,
                b: operand(2)?,
                pred,
            }
        }
        "cvt" => {
            let rounding = match m.take_one_of(&["rn", "rni", "rzi"]) {
                Some("rn") => Some(Rounding::Rn),
                Some("rni") => Some(Rounding::Rni),
                Some("rzi") => Some(Rounding::Rzi),
                _ => None,
            };
            let to = m.take_type()?;
            let from = m.take_type()?;
            m.finish()?;
            expect_count(raw, 2)?;
            let exact_widening = matches!(
                (to, from),
                (Type::F32, Type::F16 | Type::Bf16) | (Type::F64, Type::F32)
            );
            let valid = match (to.is_float(), from.is_float()) {
                (false, false) => rounding.is_none() && to != Type::Pred && from != Type::Pred,
                (true, true) if exact_widening => rounding.is_none(),
                (true, true) => rounding == Some(Rounding::Rn),
                (true, false) => rounding == Some(Rounding::Rn) && from != Type::Pred,
                (false, true) => {
                    matches!(rounding, Some(Rounding::Rni | Rounding::Rzi)) && to != Type::Pred
                }
            };
            if !valid {
                return parse_error(line, format!("unsupported conversion {}", raw.opcode));
            }
            Op::Cvt {
                rounding,
                to,
                from,
                dst: destination(0)?,
                src: operand(1)?,
            }
        }
        "bar" => {
            if m.take("warp") {
                m.require("sync")?;
                m.finish()?;
                expect_count(raw, 1)?;
                Op::BarWarpSync { mask: operand(0)? }
            } else {
                m.require("sync")?;
                m.finish()?;
                match ops.len() {
                    1 => Op::BarSync {
                        barrier: operand(0)?,
                        threads: None,
                    },
                    2 => Op::BarSync {
                        barrier: operand(0)?,
                        threads: Some(operand(1)?),
                    },
                    n => {
                        return parse_error(
                            line,
                            format!("bar.sync takes 1 or 2 operands, found {n}"),
                        );
                    }
                }
            }
        }
        "shfl" => {
            m.require("sync")?;
            let mode = match m.take_one_of(&["up", "down", "bfly", "idx"]) {
                Some("up") => ShuffleMode::Up,
                Some("down") => ShuffleMode::Down,
                Some("bfly") => ShuffleMode::Bfly,
                Some(_) => ShuffleMode::Idx,
                None => {
                    return parse_error(
                        line,
                        format!("{} needs .up, .down, .bfly or .idx", raw.opcode),
                    );
                }
            };
            m.require("b32")?;
            m.finish()?;
            expect_count(raw, 5)?;
            let (dst, pred_dst) = match &ops[0] {
                Raw::Pair(value, predicate) => (
                    scope.register(value, line)?,
                    Some(scope.predicate(predicate, line)?),
                ),
                single => (scope.destination(single, line)?, None),
            };
            Op::Shfl {
                mode,
                dst,
                pred_dst,
                src: operand(1)?,
                lane: operand(2)?,
                clamp: operand(3)?,
                member_mask: operand(4)?,
            }
        }
        "atom" | "red" => {
            m.require("global")?;
            m.require("add")?;
            let ty = m.take_type()?;
            check_type(matches!(ty, Type::U32 | Type::F32), ty, raw)?;
            m.finish()?;
            if base == "atom" {
                expect_count(raw, 3)?;
                Op::AtomAdd {
                    ty,
                    dst: Some(destination(0)?),
                    addr: scope.address(&ops[1], Space::Global, line)?,
                    src: operand(2)?,
                }
            } else {
                expect_count(raw, 2)?;
                Op::AtomAdd {
                    ty,
                    dst: None,
                    addr: scope.address(&ops[0], Space::Global, line)?,
                    src: operand(1)?,
                }
            }
        }
        "membar" => {
            if m.take_one_of(&["cta", "gl", "sys"]).is_none() {
                return parse_error(line, "membar needs .cta, .gl or .sys");
            }
            m.finish()?;
            expect_count(raw, 0)?;
            Op::Fence
        }
        "fence" => {
            if m.take_one_of(&["sc", "acq_rel"]).is_none()
                || m.take_one_of(&["cta", "gpu", "sys"]).is_none()
            {
                return parse_error(line, "fence needs .sc or .acq_rel and a scope");
            }
            m.finish()?;
            expect_count(raw, 0)?;
            Op::Fence
        }
        "bra" => {
            m.take("uni");
            m.finish()?;
            expect_count(raw, 1)?;
            let Raw::Word(label) = &ops[0] else {
                return parse_error(line, "bra needs a label");
            };
            match scope.labels.get(label) {
                Some(&target) => Op::Bra { target },
                None => return parse_error(line, format!("unknown label {label}")),
            }
        }
        "ret" | "exit" => {
            m.finish()?;
            expect_count(raw, 0)?;
            Op::Exit
        }
        _ => return parse_error(line, format!("unknown opcode {}", raw.opcode)),
    };
    Ok(op)
}

/// `value` rounded up to a multiple of `align` (a power of two), or `None` past `u32`.
fn align_up(value: u32, align: u32) -> Option<u32> {
    value.checked_next_multiple_of(align)
}

/// The shared variables of a module or kernel declared so far, and where the next one goes.
#[derive(Clone, Default)]
struct SharedLayout {
    /// Static variables, in declaration order.
    vars: Vec<SharedVar>,
    /// The `extern` (dynamic) array, if declared: placed after every static variable.
    dynamic: Option<SharedVar>,
    /// Every name declared, static or dynamic.
    names: HashSet<String>,
    /// Bytes of the static variables, with their alignment padding.
    end: u32,
}

impl SharedLayout {
    /// `.shared [.align N] .type name[SIZE];` or, with `dynamic` (after `.extern .shared`),
    /// `name[]`. Offsets are 32-bit: a layout past 4 GiB is an error naming the line (a launch
    /// checks the much smaller per-CTA limit).
    fn declare(&mut self, parser: &mut Parser, dynamic: bool) -> Result<()> {
        let line = parser.line();
        let mut align = 1;
        if parser.peek() == Some(&Tok::Word(".align".into())) {
            parser.pos += 1;
            align = u32::try_from(parser.integer()?)
                .or_else(|_| parse_error(line, "alignment out of range"))?;
            if !align.is_power_of_two() {
                return parse_error(line, format!("alignment {align} is not a power of two"));
            }
        }
        let ty = parser.type_directive()?;
        align = align.max(ty.bytes());
        let name = parser.word()?;
        parser.expect_punct('[')?;
        let size = if dynamic {
            0
        } else {
            let count = u32::try_from(parser.integer()?)
                .or_else(|_| parse_error(line, "array too large"))?;
            if count == 0 {
                // Size 0 marks the dynamic array in the decoded kernel.
                return parse_error(line, format!("shared array {name} has no elements"));
            }
            count
                .checked_mul(ty.bytes())
                .map_or_else(|| parse_error(line, "array too large"), Ok)?
        };
        parser.expect_punct(']')?;
        parser.expect_punct(';')?;
        if self.names.contains(&name) {
            return parse_error(line, format!("shared variable {name} declared twice"));
        }
        if dynamic {
            if self.dynamic.is_some() {
                return parse_error(line, "only one extern .shared array is supported");
            }
            self.names.insert(name.clone());
            // Its offset is known once every static variable is: see `finish`.
            self.dynamic = Some(SharedVar {
                name,
                offset: 0,
                size: 0,
                align,
            });
            return Ok(());
        }
        let Some((offset, end)) =
            align_up(self.end, align).and_then(|offset| Some((offset, offset.checked_add(size)?)))
        else {
            return parse_error(
                line,
                format!("shared variable {name} would end past 4 GiB of shared memory"),
            );
        };
        self.end = end;
        self.names.insert(name.clone());
        self.vars.push(SharedVar {
            name,
            offset,
            size,
            align,
        });
        Ok(())
    }

    /// Entries a kernel's list will hold.
    fn len(&self) -> usize {
        self.vars.len() + usize::from(self.dynamic.is_some())
    }

    /// The kernel's shared variables (the static ones, then the dynamic one aligned to at
    /// least 16) and its bytes of static shared memory.
    fn finish(self, line: usize) -> Result<(Vec<SharedVar>, u32)> {
        let mut vars = self.vars;
        if let Some(mut var) = self.dynamic {
            var.offset = align_up(self.end, var.align.max(16)).map_or_else(
                || {
                    parse_error(
                        line,
                        format!(
                            "the extern .shared array {} would start past 4 GiB",
                            var.name
                        ),
                    )
                },
                Ok,
            )?;
            vars.push(var);
        }
        Ok((vars, self.end))
    }
}

/// What the kernels of a module hold together so far, against the module-wide limits.
#[derive(Default)]
struct ModuleTotals {
    registers: u64,
    shared_variables: u64,
}

fn parse_entry(
    parser: &mut Parser,
    module_shared: &SharedLayout,
    totals: &mut ModuleTotals,
) -> Result<Kernel> {
    let entry_line = parser.line();
    let name = parser.word()?;
    parser.expect_punct('(')?;
    let (mut params, mut param_bytes) = (Vec::new(), 0u32);
    let mut param_names = HashSet::new();
    while !parser.peek_punct(')') {
        if !params.is_empty() {
            parser.expect_punct(',')?;
        }
        parser.expect_word(".param")?;
        let ty = parser.type_directive()?;
        let line = parser.line();
        let param_name = parser.word()?;
        if !param_names.insert(param_name.clone()) {
            return parse_error(line, format!("parameter {param_name} declared twice"));
        }
        // Cannot overflow: param_bytes <= MAX_PARAM_BYTES before, and a type is <= 8 bytes.
        let offset = param_bytes.next_multiple_of(ty.bytes());
        param_bytes = offset + ty.bytes();
        if param_bytes > MAX_PARAM_BYTES {
            return parse_error(
                line,
                format!(
                    "the parameters of {name} take more than {MAX_PARAM_BYTES} bytes (CUDA's limit)"
                ),
            );
        }
        params.push(Param {
            name: param_name,
            ty,
            offset,
        });
    }
    parser.expect_punct(')')?;
    let line = parser.line();
    match parser.peek() {
        Some(Tok::Punct('{')) => parser.pos += 1,
        Some(Tok::Word(word)) => {
            return parse_error(line, format!("unsupported entry directive {word}"));
        }
        _ => return parse_error(line, "expected the kernel body"),
    }

    let mut registers: Vec<RegDecl> = Vec::new();
    let mut register_ids: HashMap<String, RegId> = HashMap::new();
    // Every kernel holds its own copy of the module's shared variables: bound their product.
    if totals.shared_variables + module_shared.len() as u64 > MAX_MODULE_SHARED_VARIABLES {
        return parse_error(
            entry_line,
            format!(
                "the module's kernels would hold more than {MAX_MODULE_SHARED_VARIABLES} shared variables in all"
            ),
        );
    }
    // The module's variables come first, at the offsets the module gave them.
    let mut shared = module_shared.clone();
    let mut labels: HashMap<String, usize> = HashMap::new();
    let mut raws: Vec<RawInstruction> = Vec::new();
    loop {
        let line = parser.line();
        match parser.next()? {
            Tok::Punct('}') => break,
            Tok::Punct('{') => return parse_error(line, "nested { } scopes are not supported"),
            Tok::Word(word) if word == ".reg" => {
                let ty = parser.type_directive()?;
                loop {
                    let line = parser.line();
                    let base = parser.word()?;
                    let count = if parser.peek_punct('<') {
                        parser.pos += 1;
                        let count = parser.integer()?;
                        parser.expect_punct('>')?;
                        Some(count)
                    } else {
                        None
                    };
                    // Checked before a single name is made.
                    let total = (registers.len() as u64).saturating_add(count.unwrap_or(1));
                    if total > MAX_KERNEL_REGISTERS {
                        return parse_error(
                            line,
                            format!(
                                "{base}<{}> would give kernel {name} {total} registers, over the limit of {MAX_KERNEL_REGISTERS} registers per kernel",
                                count.unwrap_or(1)
                            ),
                        );
                    }
                    if totals.registers + total > MAX_MODULE_REGISTERS {
                        return parse_error(
                            line,
                            format!(
                                "the module's kernels would declare more than {MAX_MODULE_REGISTERS} registers in all"
                            ),
                        );
                    }
                    if !base.starts_with('%') {
                        return parse_error(line, format!("bad register name {base}"));
                    }
                    let names: Box<dyn Iterator<Item = String>> = match count {
                        Some(count) => Box::new((0..count).map(|i| format!("{base}{i}"))),
                        None => Box::new(std::iter::once(base)),
                    };
                    for name in names {
                        // At most MAX_KERNEL_REGISTERS (checked above): fits a u32.
                        let id = RegId(registers.len() as u32);
                        if register_ids.insert(name.clone(), id).is_some() {
                            return parse_error(
                                line,
                                format!("bad or repeated register name {name}"),
                            );
                        }
                        registers.push(RegDecl { name, ty });
                    }
                    if parser.peek_punct(',') {
                        parser.pos += 1;
                    } else {
                        break;
                    }
                }
                parser.expect_punct(';')?;
            }
            Tok::Word(word) if word == ".shared" => shared.declare(parser, false)?,
            Tok::Word(word) if word == ".extern" => {
                parser.expect_word(".shared")?;
                shared.declare(parser, true)?;
            }
            Tok::Word(word) if word.starts_with('.') => {
                return parse_error(line, format!("unsupported directive {word}"));
            }
            Tok::Word(word) if parser.peek_punct(':') => {
                parser.pos += 1;
                if labels.insert(word.clone(), raws.len()).is_some() {
                    return parse_error(line, format!("label {word} defined twice"));
                }
            }
            first @ (Tok::Word(_) | Tok::Punct('@')) => {
                let guard = if first == Tok::Punct('@') {
                    let negated = parser.peek_punct('!');
                    if negated {
                        parser.pos += 1;
                    }
                    Some((parser.word()?, negated))
                } else {
                    None
                };
                let opcode = match first {
                    Tok::Word(word) => word,
                    _ => parser.word()?,
                };
                let mut operands = Vec::new();
                while !parser.peek_punct(';') {
                    if !operands.is_empty() {
                        parser.expect_punct(',')?;
                    }
                    operands.push(parser.operand()?);
                }
                parser.expect_punct(';')?;
                raws.push(RawInstruction {
                    guard,
                    opcode,
                    operands,
                    line,
                });
            }
            other => return parse_error(line, format!("unexpected {other:?}")),
        }
    }

    totals.registers += registers.len() as u64;
    totals.shared_variables += shared.len() as u64;
    if totals.shared_variables > MAX_MODULE_SHARED_VARIABLES {
        return parse_error(
            entry_line,
            format!(
                "the module's kernels would hold more than {MAX_MODULE_SHARED_VARIABLES} shared variables in all"
            ),
        );
    }
    let (shared, static_shared_bytes) = shared.finish(entry_line)?;
    let scope = Scope {
        registers: register_ids,
        register_types: registers.iter().map(|r| r.ty).collect(),
        params: params.iter().map(|p| (p.name.clone(), p.offset)).collect(),
        shared: shared.iter().map(|s| (s.name.clone(), s.offset)).collect(),
        labels,
    };
    let instructions = raws
        .iter()
        .map(|raw| {
            let guard = match &raw.guard {
                Some((name, negated)) => Some(Guard {
                    reg: scope.predicate(name, raw.line)?,
                    negated: *negated,
                }),
                None => None,
            };
            Ok(Instruction {
                guard,
                op: decode(raw, &scope)?,
                line: raw.line,
                opcode: raw.opcode.clone(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Kernel {
        name,
        params,
        param_bytes,
        registers,
        shared,
        static_shared_bytes,
        instructions,
    })
}

/// Parses and decodes a PTX module.
///
/// ```
/// let module = ptx_sim::parse(
///     ".version 7.0\n.target sm_80\n.address_size 64\n\
///      .visible .entry nop() { ret; }",
/// )?;
/// assert_eq!(module.kernels[0].name, "nop");
/// # Ok::<(), ptx_sim::SimError>(())
/// ```
pub fn parse(text: &str) -> Result<Module> {
    let mut parser = Parser {
        tokens: lex(text)?,
        pos: 0,
    };
    let (mut version, mut target) = (None, None);
    let mut kernels = Vec::new();
    let mut module_shared = SharedLayout::default();
    let mut totals = ModuleTotals::default();
    while parser.peek().is_some() {
        let line = parser.line();
        let directive = parser.word()?;
        match directive.as_str() {
            ".version" => match parser.next()? {
                Tok::Number(_, text) => version = Some(text),
                other => {
                    return parse_error(
                        line,
                        format!("expected a version number, found {other:?}"),
                    );
                }
            },
            ".target" => {
                let mut targets = vec![parser.word()?];
                while parser.peek_punct(',') {
                    parser.pos += 1;
                    targets.push(parser.word()?);
                }
                target = Some(targets.join(", "));
            }
            ".address_size" => {
                if parser.integer()? != 64 {
                    return parse_error(line, "only .address_size 64 is supported");
                }
            }
            ".visible" => {
                parser.expect_word(".entry")?;
                kernels.push(parse_entry(&mut parser, &module_shared, &mut totals)?);
            }
            ".entry" => kernels.push(parse_entry(&mut parser, &module_shared, &mut totals)?),
            ".shared" => module_shared.declare(&mut parser, false)?,
            ".extern" => {
                parser.expect_word(".shared")?;
                module_shared.declare(&mut parser, true)?;
            }
            other => return parse_error(line, format!("unsupported directive {other}")),
        }
    }
    let line = parser.line();
    Ok(Module {
        version: version.map_or_else(|| parse_error(line, "missing .version"), Ok)?,
        target: target.map_or_else(|| parse_error(line, "missing .target"), Ok)?,
        kernels,
    })
}
